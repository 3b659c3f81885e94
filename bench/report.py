#!/usr/bin/env python3
"""bench/report.py OUTDIR: the markdown report of one bench/run.sh run (stdout).

Reads what run.sh wrote in OUTDIR (http/results.tsv, ipc/wire.txt, scale/scale.tsv,
mem/mem.tsv, startup/startup.tsv, size/size.tsv, syscalls/*, schedules/*, meta.txt); sections whose files
are missing are left out. Ratios are forkcluster / reference for rates (higher is better) and
compare medians over the rounds; "per round" lists the same ratio inside each round, where
both servers ran minutes apart under the same machine load.
"""
import csv
import os
import re
import statistics
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
GOALS = []  # (goal, measured, target, status)


def path(*p):
    return os.path.join(OUT, *p)


def read_tsv(*p):
    f = path(*p)
    if not os.path.isfile(f):
        return None
    with open(f, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def med(vs):
    vs = [v for v in vs if v is not None]
    return statistics.median(vs) if vs else None


def fi(v, prec=0):
    if v is None:
        return "NA"
    s = f"{v:,.{prec}f}"
    return s.replace(",", " ")


def fr(v):
    return "NA" if v is None else f"{v:.2f}"


def goal(name, measured, target, ok):
    status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
    GOALS.append((name, measured, target, status))


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


sections = []

# ---------------------------------------------------------------------------------------------
# 1. HTTP
http = read_tsv("http", "results.tsv")
if http:
    order, by = [], {}
    for r in http:
        k = (r["server"], r["mode"])
        if k not in by:
            by[k] = []
            order.append(k)
        rps, cores = num(r["req_s"]), num(r["server_cores"])
        r["_rps"] = rps
        r["_eff"] = rps / cores if rps is not None and cores else None
        by[k].append(r)

    def m(server, mode, key):
        rs = by.get((server, mode))
        if not rs:
            return None
        return med(r[key] if key.startswith("_") else num(r[key]) for r in rs)

    rows = []
    for (s, mode) in order:
        rs = by[(s, mode)]
        rows.append([
            s, mode, fi(m(s, mode, "_rps")), " / ".join(fi(r["_rps"]) for r in rs),
            fi(m(s, mode, "p50_us")), fi(m(s, mode, "p99_us")),
            fr(m(s, mode, "server_cores")), fr(m(s, mode, "primary_cores")),
            fi(m(s, mode, "_eff")),
            sum(int(num(r["sock_errors"]) or 0) + int(num(r["non2xx"]) or 0) for r in rs),
            " ; ".join(r.get("per_process_cores") or "-" for r in rs),
        ])
    txt = ["## 1. HTTP: wrk -t1 -c50, 2 workers (medians over the rounds)", "",
           table(["server", "mode", "req/s", "req/s each round", "p50 us", "p99 us",
                  "server cores", "primary cores", "req per server core-s", "errors",
                  "per-process cores (primary,workers) each round"], rows), ""]

    def ratio_row(label, a, b, mode_a, mode_b, key, target=None):
        va, vb = m(a, mode_a, key), m(b, mode_b, key)
        if va is None or vb is None or not vb:
            return None
        r = va / vb
        rounds = {}
        for x in by[(a, mode_a)]:
            rounds.setdefault(x["round"], [None, None])[0] = x[key] if key.startswith("_") else num(x[key])
        for x in by[(b, mode_b)]:
            rounds.setdefault(x["round"], [None, None])[1] = x[key] if key.startswith("_") else num(x[key])
        per = " / ".join(fr(p / q) if p is not None and q else "NA" for p, q in rounds.values())
        what = "req/s" if key == "_rps" else "req per server core-s"
        ok = None if target is None else r >= target
        if target is not None:
            goal(f"{label} {what}", fr(r), f">= {target}", ok)
        return [label, what, fr(r), per, fi(va), fi(vb), "" if target is None else f">= {target}",
                "" if ok is None else ("PASS" if ok else "FAIL")]

    specs = [
        ("hello-rr close / c-rr close", "hello-rr", "c-rr", "close", "close", "_rps", 0.95),
        ("hello-rr close / c-rr close", "hello-rr", "c-rr", "close", "close", "_eff", 0.9),
        ("hello-rr close / node-rr close", "hello-rr", "node-rr", "close", "close", "_rps", 2.3),
        ("hello-rr close / node-rr close", "hello-rr", "node-rr", "close", "close", "_eff", 5),
        ("hello-rr ka / c-rr ka", "hello-rr", "c-rr", "ka", "ka", "_rps", 0.95),
        ("hello-rr ka / c-rr ka", "hello-rr", "c-rr", "ka", "ka", "_eff", None),
        ("hello-shared ka / c-shared ka", "hello-shared", "c-shared", "ka", "ka", "_rps", 0.95),
        ("hello-shared ka / c-shared ka", "hello-shared", "c-shared", "ka", "ka", "_eff", None),
        ("hello-shared close / c-shared close", "hello-shared", "c-shared", "close", "close", "_rps", 0.95),
        ("hello-shared close / c-shared close", "hello-shared", "c-shared", "close", "close", "_eff", None),
        ("hello-rr close / node-none close", "hello-rr", "node-none", "close", "close", "_rps", None),
        ("hello-rr close / nginx-reuseport close", "hello-rr", "nginx-reuseport", "close", "close", "_rps", None),
        ("hello-rr close / nginx-reuseport close", "hello-rr", "nginx-reuseport", "close", "close", "_eff", None),
    ]
    rrows = [r for r in (ratio_row(*s) for s in specs) if r]
    if rrows:
        txt += ["### HTTP ratios (forkcluster / reference, from the medians)", "",
                table(["ratio", "of", "value", "per round", "forkcluster", "reference", "goal", "status"], rrows), ""]
    sections.append("\n".join(txt))

# ---------------------------------------------------------------------------------------------
# 2. IPC
wire = path("ipc", "wire.txt")
if os.path.isfile(wire):
    rows, vals, node = [], {}, {}
    pat = re.compile(r"^(\S+)\s+([\d.]+)\s+c=([\d.]+)\s+ratio=([\d.]+)\s+paired=([\d.]+)")
    for line in open(wire, errors="replace"):
        mm = pat.match(line)
        if mm:
            name, ours, c, ratio, paired = mm.groups()
            vals[name] = (float(ours), float(c), float(ratio))
            prec = 2 if "_us" in name else 0
            rows.append([name, fi(float(ours), prec), fi(float(c), prec), ratio, paired])
            continue
        mn = re.match(r"^(node_\S+)\s+([\d.]+)", line)
        if mn:
            node[mn.group(1)] = float(mn.group(2))
    txt = ["## 2. IPC: cargo bench --bench wire (ratio = ours/C for rates, C/ours for latencies)", ""]
    if rows:
        txt += [table(["figure", "forkcluster", "C limit", "ratio", "paired (median of per-rep ratios)"], rows), ""]
    else:
        txt += ["(no figures parsed: see ipc/wire.txt)", ""]
    nodefile = path("ipc", "node.txt")
    if not node and os.path.isfile(nodefile):
        for line in open(nodefile):
            mw = re.match(r"^(w2p|p2w)\s.*msgs/s=(\d+)", line)
            if mw:
                node.setdefault(f"node_{mw.group(1)}_msgs_per_s", float(mw.group(2)))
            mp = re.match(r"^pingpong\s.*median=([\d.]+) p99=([\d.]+)", line)
            if mp:
                node.setdefault("node_rtt_p50_us", float(mp.group(1)))
                node.setdefault("node_rtt_p99_us", float(mp.group(2)))
    if node:
        nrows = []
        for k, v in node.items():
            ours = None
            if k in ("node_w2p_msgs_per_s", "node_p2w_msgs_per_s") and "oneway_frames_per_s" in vals:
                ours = fr(vals["oneway_frames_per_s"][0] / v) + " (oneway_frames_per_s / node)"
            if k == "node_rtt_p50_us" and "rtt_p50_us" in vals:
                ours = fr(v / vals["rtt_p50_us"][0]) + " (node / rtt_p50_us)"
            nrows.append([k, fi(v, 2 if "_us" in k else 0), ours or ""])
        txt += ["Node cluster IPC (ipc_bench.js, json; reference):", "",
                table(["figure", "node", "forkcluster vs node"], nrows), ""]
    for name, label in (("oneway_frames_per_s", "IPC one way (unpinned, 80 B frames) vs C seq-oneway"),
                        ("pinned_oneway_frames_per_s", "IPC one way pinned vs C seq-oneway"),
                        ("fds_per_s_new", "fd passing (new fd each) vs C oneway-new"),
                        ("pinned_fds_per_s_new", "fd passing pinned vs C oneway-new")):
        if name in vals:
            r = vals[name][2]
            goal(label, fr(r), ">= 0.9", r >= 0.9)
    sections.append("\n".join(txt))

# ---------------------------------------------------------------------------------------------
# 3. Scale
sc = read_tsv("scale", "scale.tsv")
if sc:
    rows, per = [], {}
    for r in sc:
        req, wall = num(r["requests"]), num(r["wall_s"])
        pt, pn, tn = num(r["primary_ticks"]), num(r["primary_ns"]), num(r["tree_ns"])
        hz = os.sysconf("SC_CLK_TCK")
        us_t = pt / hz * 1e6 / req if req and pt is not None else None
        us_n = pn / 1e3 / req if req and pn is not None else None
        us_tree = tn / 1e3 / req if req and tn is not None else None
        per[(r["impl"], int(r["workers"]))] = (us_t, us_n)
        rows.append([r["impl"], r["workers"], fi(num(r["req_s"])), fi(req), r["p50_us"], r["p99_us"],
                     r["errors"], fr(us_t), fr(us_n),
                     fr(tn / 1e9 / wall) if wall and tn is not None else "NA", fr(us_tree), r["procs"]])
    txt = ["## 3. Round-robin dispatch as workers grow (wrk close load; 1 connection per request)", "",
           table(["server", "workers", "conn/s", "connections", "p50 us", "p99 us", "errors",
                  "primary us/conn (utime+stime)", "primary us/conn (schedstat)", "server cores (schedstat)",
                  "server tree us/conn (schedstat)", "processes"], rows), ""]
    hello = sorted(w for (i, w) in per if i == "hello-rr")
    if len(hello) >= 2:
        lo, hi = hello[0], hello[-1]
        a, b = per[("hello-rr", lo)], per[("hello-rr", hi)]
        rt = b[0] / a[0] if a[0] and b[0] is not None else None
        rn = b[1] / a[1] if a[1] and b[1] is not None else None
        txt += [f"Primary CPU per connection, {hi} / {lo} workers: **{fr(rt)}** (utime+stime), "
                f"**{fr(rn)}** (schedstat). Flat = about 1.00.", ""]
        goal(f"primary CPU/conn {hi}/{lo} workers (schedstat)", fr(rn), "~1.0 (flat; bench's bar: <= 1.2)",
             None if rn is None else rn <= 1.2)
    c2 = [w for (i, w) in per if i == "c-rr"]
    if c2 and hello:
        w = min(c2)
        if ("hello-rr", w) in per and per[("c-rr", w)][1]:
            txt += [f"Primary CPU per connection at {w} workers, hello-rr / c-rr: "
                    f"**{fr(per[('hello-rr', w)][1] / per[('c-rr', w)][1])}** (schedstat).", ""]
    sections.append("\n".join(txt))

# ---------------------------------------------------------------------------------------------
# 4. Memory
mem = read_tsv("mem", "mem.tsv")
if mem:
    order, by = [], {}
    for r in mem:
        k = (r["server"], r["phase"])
        if k not in by:
            by[k] = []
            order.append(k)
        by[k].append(r)
    rows = []
    for k in order:
        rs = by[k]
        prim = [r for r in rs if r["role"] == "primary"]
        work = [r for r in rs if r["role"] == "worker"]

        def one(r):
            return f"{r['rss_kb']} / {r['pss_kb']} / {r['uss_kb']}"
        rows.append([k[0], k[1], one(prim[0]) if prim else "-",
                     " ; ".join(one(r) for r in work) or "-",
                     fi(sum(num(r["pss_kb"]) or 0 for r in rs)),
                     fi(sum(num(r["uss_kb"]) or 0 for r in rs)),
                     ",".join(r["threads"] for r in rs)])
    txt = ["## 4. Memory (kB, /proc/PID/smaps_rollup; USS = Private_Clean + Private_Dirty)", "",
           table(["server", "phase", "primary RSS / PSS / USS", "workers RSS / PSS / USS (each)",
                  "total PSS", "total USS", "threads per process"], rows), ""]
    sections.append("\n".join(txt))
    for srv in sorted({s for s, _ in order if s.startswith("hello")}):
        rs = [r for r in mem if r["server"] == srv]
        wk = [num(r["uss_kb"]) for r in rs if r["role"] == "worker"]
        if wk:
            mx = max(wk)
            goal(f"{srv} worker USS (max, idle and after load)", f"{fi(mx)} kB", "<= 300 kB", mx <= 300)
        th = {r["threads"] for r in rs}
        goal(f"{srv} threads per process", ",".join(sorted(th)), "1", th == {"1"})

# ---------------------------------------------------------------------------------------------
# 5. Startup
st = read_tsv("startup", "startup.tsv")
if st:
    what = {"first_200": "first 200", "all_workers": "every worker answered (distinct bodies)",
            "ready_text": "'ready' line on stderr (all workers listening)", "process": "process start+exit"}
    rows = [[r["server"], what.get(r["metric"], r["metric"]), r["min_ms"], r["median_ms"], r["max_ms"], r["ok"]]
            for r in st]
    txt = ["## 5. Startup: launch until answered (ms; fork+exec, 200 us polls, Connection: close)", "",
           table(["server", "until", "min", "median", "max", "ok runs"], rows), "",
           "Only hello's body names the worker, so only hello gets 'every worker answered'; the C and "
           "nginx peers are timed to their first 200, Node also to its 'ready' line.", ""]
    sections.append("\n".join(txt))
    for r in st:
        if r["server"].startswith("hello") and r["metric"] == "all_workers":
            v = num(r["median_ms"])
            goal(f"{r['server']} all workers answering (median)", f"{r['median_ms']} ms", "<= 5 ms",
                 None if v is None else v <= 5)

# ---------------------------------------------------------------------------------------------
# 6. Size
sz = read_tsv("size", "size.tsv")
if sz:
    b = {r["binary"]: r for r in sz}
    rows = [[r["binary"], fi(num(r["bytes"])), r["file"]] for r in sz]
    txt = ["## 6. Binary size (bytes, `ls -l`)", "", table(["binary", "bytes", "file"], rows), ""]
    if "hello-musl-small" in b and "floor-musl" in b:
        h, f = num(b["hello-musl-small"]["bytes"]), num(b["floor-musl"]["bytes"])
        d = h - f
        txt += [f"hello (static musl, profile small) - std-only floor (same settings) = **{fi(d)} bytes** "
                f"({d / 1024:.1f} KiB); goal <= 100 KiB (102 400 bytes).", ""]
        goal("static musl hello - floor", f"{fi(d)} B", "<= 102 400 B", d <= 102400)
    meta = path("size", "size.tsv.meta")
    if os.path.isfile(meta):
        txt += ["Static hello: " + open(meta).read().strip(), ""]
    sections.append("\n".join(txt))

# ---------------------------------------------------------------------------------------------
# 7. Syscalls (optional section)
req = read_tsv("syscalls", "requests.tsv")


def strace_counts(f):
    calls = {}
    for line in open(f):
        p = line.split()
        if len(p) >= 5 and re.match(r"^[\d.]+$", p[0]) and p[-1] != "total":
            calls[p[-1]] = (int(p[3]), int(p[4]) if len(p) == 6 else 0)
    return calls


if req:
    cols, data = [], {}
    for r in req:
        n = num(r["requests"])
        for role in ("primary", "workers"):
            f = path("syscalls", f"strace-{r['server']}-{role}.txt")
            if n and os.path.isfile(f):
                cols.append((f"{r['server']} {role}", n))
                data[cols[-1][0]] = strace_counts(f)
    names = sorted({k for c in data.values() for k in c},
                   key=lambda k: -max(data[c].get(k, (0, 0))[0] / n for c, n in cols))

    def cell(c, n, k):
        v = data[c].get(k)
        if not v:
            return ""
        return f"{v[0] / n:.2f}" + (f" ({v[1] / n:.2f} err)" if v[1] else "")
    rows = [[k] + [cell(c, n, k) for c, n in cols] for k in names]
    rows.append(["**total**"] + [f"**{sum(v[0] for v in data[c].values()) / n:.2f}**" for c, n in cols])
    txt = ["## 7. System calls per request under the close load (strace -c; err = failed, mostly EAGAIN)", "",
           "Requests: " + ", ".join(f"{r['server']} {fi(num(r['requests']))}" for r in req)
           + " (strace slows the servers: compare counts, not rates).", "",
           table(["syscall"] + [c for c, _ in cols], rows), ""]
    sections.append("\n".join(txt))

# ---------------------------------------------------------------------------------------------
# 8. Schedules (issue 11): evenness, queue at restart, skew, sticky, cost, like for like, chaos
def sched_section():
    base = os.path.join("schedules")
    if not os.path.isdir(path(base)):
        return
    txt = ["## 8. Schedules (issue 11)", ""]
    smeta = {}
    if os.path.isfile(path(base, "meta.txt")):
        for line in open(path(base, "meta.txt")):
            k, _, v = line.strip().partition("=")
            smeta[k] = v
        txt += ["Settings: " + "; ".join(f"{k} {v}" for k, v in smeta.items()), ""]

    ev = read_tsv(base, "even", "even.tsv")
    if ev:
        rows = []
        for r in ev:
            vals = [int(x.split("=")[1]) for x in r["values"].split(",") if "=" in x]
            want = int(num(r["workers"]) or 0)
            counts = sorted(vals, reverse=True) + [0] * max(0, want - len(vals))
            tot = sum(counts)
            mm = (counts[0] / counts[-1]) if counts and counts[-1] else None
            shares = " ".join(f"{100 * c / tot:.1f}" for c in counts) if tot else ""
            target = ""
            name = r["server"]
            if name in ("hello-rr", "hello-lc", "hello-reuseport"):
                target = "<= 1.2"
                goal(f"evenness {name} ({want} workers, close) max/min", "inf" if mm is None else fr(mm),
                     "<= 1.2", mm is not None and mm <= 1.2)
            rows.append([name, f"{len(vals)}/{want}", fi(num(r["requests"])), fi(num(r["rps"])), r["errors"],
                         "inf" if mm is None else fr(mm), target, shares])
        txt += ["### 8.1 Evenness: each worker's share of the answers (close load; X-Worker header)", "",
                table(["server", "workers answering", "requests", "req/s", "errors", "max/min", "target",
                       "shares % (largest first)"], rows), ""]

    qu = read_tsv(base, "queue", "queue.tsv")
    if qu:
        rows = []
        for r in qu:
            lost = sum(int(num(r[k]) or 0) for k in ("reset", "eof", "connect"))
            rows.append([r["server"], fi(num(r["requests"])), fi(num(r["ok"])), r["reset"], r["eof"], r["connect"],
                         r["timeout"], r["non200"], r["other"], f"**{lost}**", r.get("windows", ""),
                         f"{r['hups']} HUP, {r['kills']} KILL"])
            if r["server"] == "hello-reuseport":
                goal("no queue lost at restart: hello-reuseport reset+eof+connect (SIGHUP + 2 SIGKILL)", str(lost),
                     "0", lost == 0)
        txt += ["### 8.2 Connections lost at restart (full backlog, SIGHUP then 2 SIGKILLs, under load)", "",
                "Failures at the client by kind (loadgen); lost = reset + eof + connect; windows: lost before the "
                "first signal / from the SIGHUP to the first SIGKILL / after it. The C peer gets no SIGHUP (it has "
                "no reload) and does not respawn. A SIGKILL also fails what the dead worker had accepted and not "
                "answered (rr: the requests it was serving), so `kill:` mixes in-flight and queued losses.", "",
                table(["server", "requests", "ok", "reset", "eof", "connect", "timeout", "non200", "other", "lost",
                       "windows", "signals"], rows), ""]

    sk = read_tsv(base, "skew", "skew.tsv")
    if sk:
        rows, p99 = [], {}
        for r in sk:
            p99[r["server"]] = num(r["fast_p99_us"])
            rows.append([r["server"], r["rate"], r["slow_fraction"], r["slow_ms"], fi(num(r["requests"])), r["errors"],
                         fi(num(r["fast_n"])), fi(num(r["fast_p50_us"])), fi(num(r["fast_p90_us"])),
                         f"**{fi(num(r['fast_p99_us']))}**", fi(num(r["fast_p999_us"])), fi(num(r["slow_n"])),
                         fi(num(r["slow_p50_us"])), fi(num(r["slow_p99_us"]))])
        txt += ["### 8.3 Skewed work: latency of the fast requests when 10% block their worker", "",
                "Open loop (Poisson arrivals), each request to /slow with the given probability (chosen at random "
                "by the client); the slow ones block their worker for slow_ms. Latencies in us, from arrival.", "",
                table(["server", "req/s", "slow fraction", "slow ms", "requests", "errors", "fast n", "fast p50",
                       "fast p90", "fast p99", "fast p99.9", "slow n", "slow p50", "slow p99"], rows), ""]
        a, b = p99.get("hello-rr"), p99.get("hello-lc")
        if a and b:
            txt += [f"Fast p99, rr / lc: **{fr(a / b)}** (above 1.00: lc keeps fast requests away from blocked workers).", ""]
            goal("skew: fast p99 rr / lc (4 workers, 10% slow)", fr(a / b), "> 1 (lc better)", a / b > 1.0)

    st = read_tsv(base, "sticky", "sticky.tsv")
    if st:
        rows = [[r["server"], r["phase"], fi(num(r["requests"])), fi(num(r["same_seat"])), f"**{r['fraction']}**",
                 r["note"]] for r in st]
        for r in st:
            if r["server"] == "hello-sticky" and r["phase"] == "during" and num(r["fraction"]) is not None:
                goal("sticky: fraction of IPs on their old seat while one of 8 is replaced", r["fraction"], ">= 0.875",
                     num(r["fraction"]) >= 0.875)
            if r["server"] == "hello-sticky" and r["phase"].startswith("during, IPs of the live") \
                    and num(r["fraction"]) is not None:
                goal("sticky: same, the live seats' IPs (the dead seat's must move)", r["fraction"], "1.0",
                     num(r["fraction"]) >= 0.999)
            if r["server"] == "hello-sticky" and r["phase"] == "after (new pass)" and num(r["fraction"]) is not None:
                goal("sticky: fraction on their old seat after the replacement listens", r["fraction"], "1.0",
                     num(r["fraction"]) >= 0.999)
        txt += ["### 8.4 Sticky: client IPs on their old seat across a worker's SIGKILL and replacement", "",
                "1000 client IPs (127.x.y.z); the baseline pass gives each IP's seat (X-Seat: `Worker::seat`; with a "
                "hello from before `seat()`, X-Seat was the worker id and the replacement's id is mapped to the killed one's). Then a pass of "
                "3000 requests in another IP order across the kill (phases by completion time against the kill "
                "and the replacement's `listening` line), and a new pass after it listens.", "",
                table(["server", "phase", "requests", "same seat", "fraction", "note"], rows), ""]

    co = read_tsv(base, "cost", "results.tsv")
    if co:
        by = {}
        for r in co:
            rps, cores = num(r["req_s"]), num(r["server_cores"])
            by.setdefault(r["server"], []).append((r["round"], rps, rps / cores if rps and cores else None, r))
        rows = []
        for s, rs in by.items():
            rows.append([s, fi(med(x[1] for x in rs)), " / ".join(fi(x[1]) for x in rs), fi(med(x[2] for x in rs)),
                         fr(med(num(x[3]["server_cores"]) for x in rs)), fi(med(num(x[3]["p99_us"]) for x in rs)),
                         sum(int(num(x[3]["sock_errors"]) or 0) + int(num(x[3]["non2xx"]) or 0) for x in rs)])
        txt += ["### 8.5 Cost: reuseport against C reuseport and nginx reuseport (wrk close, 2 workers)", "",
                table(["server", "req/s", "each round", "req per server core-s", "server cores", "p99 us", "errors"], rows), ""]
        h = by.get("hello-reuseport")
        for ref in ("c-reuseport", "nginx-reuseport"):
            if h and by.get(ref):
                r1 = med(x[1] for x in h) / med(x[1] for x in by[ref])
                e_h, e_r = med(x[2] for x in h), med(x[2] for x in by[ref])
                r2 = e_h / e_r if e_h and e_r else None
                txt += [f"hello-reuseport / {ref}: req/s **{fr(r1)}**, req per server core-s **{fr(r2)}**."]
        txt += [""]
    cs = read_tsv(base, "cost", "scale.tsv")
    if cs:
        per, rows = {}, []
        for r in cs:
            req, pn, tn = num(r["requests"]), num(r["primary_ns"]), num(r["tree_ns"])
            us = pn / 1e3 / req if req and pn is not None else None
            per[(r["impl"], int(r["workers"]))] = us
            rows.append([r["impl"], r["workers"], fi(num(r["req_s"])), r["errors"], fr(us),
                         fr(tn / 1e3 / req if req and tn is not None else None)])
        txt += ["Primary CPU per connection (schedstat) by schedule and workers (wrk close load, one client IP; "
                "`@Nips`: loadgen close load from N client IPs, since from one IP sticky serves from one seat):", "",
                table(["schedule", "workers", "conn/s", "errors", "primary us/conn", "server tree us/conn"], rows), ""]
        ws = sorted({w for (_, w) in per})
        lines = []
        ips = sorted({i.split("@", 1)[1] for (i, _) in per if "@" in i})
        for w in ws:
            rr = per.get(("hello-rr", w))
            for impl in ("hello-lc", "hello-sticky"):
                v = per.get((impl, w))
                if rr and v:
                    lines.append(f"{impl} / hello-rr at {w} workers: **{fr(v / rr)}**")
            for sfx in ips:
                rr, v = per.get((f"hello-rr@{sfx}", w)), per.get((f"hello-sticky@{sfx}", w))
                if rr and v:
                    lines.append(f"hello-sticky / hello-rr from {sfx} at {w} workers: **{fr(v / rr)}**")
        if len(ws) >= 2:
            for impl in ("hello-rr", "hello-lc"):
                a, b = per.get((impl, ws[0])), per.get((impl, ws[-1]))  # wrk rows
                if a and b:
                    lines.append(f"{impl} {ws[-1]} / {ws[0]} workers: **{fr(b / a)}**")
                    goal(f"primary CPU/conn {impl} {ws[-1]}/{ws[0]} workers", fr(b / a), "<= 1.2", b / a <= 1.2)
        txt += ["; ".join(lines) + ".", ""]

    ll = read_tsv(base, "l4l", "results.tsv")
    if ll:
        by = {}
        for r in ll:
            rps, cores = num(r["req_s"]), num(r["server_cores"])
            by.setdefault(r["server"], {})[r["round"]] = (rps, rps / cores if rps and cores else None, r)
        rows = []
        for s, rs in by.items():
            rows.append([s, fi(med(x[0] for x in rs.values())), " / ".join(fi(x[0]) for x in rs.values()),
                         fi(med(x[1] for x in rs.values())), " / ".join(fi(x[1]) for x in rs.values()),
                         " ; ".join(x[2].get("per_process_cores", "") for x in rs.values())])
        txt += ["### 8.6 Like for like: hello rr --defer-accept 0 against C rr (close, alternating rounds)", "",
                table(["server", "req/s", "each round", "req per server core-s", "each round",
                       "per-process cores each round"], rows), ""]
        h, c = by.get("hello-rr-nodefer"), by.get("c-rr")
        if h and c:
            rounds = sorted(set(h) & set(c))
            rr_ = [h[k][0] / c[k][0] for k in rounds if h[k][0] and c[k][0]]
            re_ = [h[k][1] / c[k][1] for k in rounds if h[k][1] and c[k][1]]
            txt += [f"hello / C, per round: req/s {' / '.join(fr(x) for x in rr_)} (median **{fr(med(rr_))}**); "
                    f"req per server core-s {' / '.join(fr(x) for x in re_)} (median **{fr(med(re_))}**).", ""]
            if re_:
                goal("hello rr nodefer / C rr, req per server core-s (median of rounds)", fr(med(re_)), ">= 0.9",
                     med(re_) >= 0.9)
    pf = read_tsv(base, "l4l", "perf.tsv")
    if pf:
        rows = []
        for r in pf:
            n = num(r["requests"])
            rows.append([r["server"], r["role"], fi(n), fr(num(r["task_clock_ms"]) * 1e3 / n if n and num(r["task_clock_ms"]) else None),
                         fr(num(r["context_switches"]) / n if n and num(r["context_switches"]) is not None else None),
                         fr(num(r["cpu_migrations"]) / n if n and num(r["cpu_migrations"]) is not None else None)])
        txt += ["perf stat per role (per request):", "",
                table(["server", "role", "requests", "task-clock us/req", "context switches/req", "migrations/req"], rows), ""]

    ch = read_tsv(base, "chaos", "chaos.tsv")
    if ch:
        rows = [[r["schedule"], fi(num(r["requests"])), f"**{r['failed']}**", r["kills"], r["detail"]] for r in ch]
        for r in ch:
            f = num(r["failed"])
            goal(f"chaos.sh close, {r['schedule']}: failed requests", r["failed"], "0", None if f is None else f == 0)
        txt += ["### 8.7 chaos.sh per schedule (MODE=close, SIGKILL of a random worker every 0.2 s)", "",
                table(["schedule", "requests", "failed", "kills", "detail"], rows), ""]
    sections.append("\n".join(txt))


sched_section()

# ---------------------------------------------------------------------------------------------
meta = {}
if os.path.isfile(path("meta.txt")):
    for line in open(path("meta.txt")):
        k, _, v = line.strip().partition("=")
        meta[k] = v
print(f"# forkcluster bench {meta.get('date_utc', '')}")
print()
print(f"{meta.get('host', '')}; git {meta.get('git', '')}; {meta.get('rustc', '')}; node {meta.get('node', '')}; "
      f"wrk {meta.get('wrk', '')}; {meta.get('settings', '')}")
loads = [f"{k[len('loadavg_'):]} {v}" for k, v in meta.items() if k.startswith("loadavg")]
if loads:
    print()
    print("Load average (1/5/15 min) " + "; ".join(loads) + ". Anything above ~0.5 before a section "
          "means other work shared the 2 cores: compare within a round, not across runs.")
print()
if GOALS:
    print("## Goals")
    print()
    print(table(["goal", "measured", "target", "status"], [list(g) for g in GOALS]))
    print()
print("\n\n".join(sections))
