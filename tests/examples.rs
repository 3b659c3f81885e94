//! The examples, run as real processes: their output, exit status and clean-up.
//!
//! `cargo test --test examples` does not build examples, so `main` first runs
//! `cargo build --examples` for this test binary's profile, target directory and `--target`
//! triple; the binaries are then found next to it (`target/[<triple>/]<profile>/examples/`) and
//! run through the triple's runner when `CARGO_TARGET_<TRIPLE>_RUNNER` names one (qemu-user).

mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn main() {
    if !std::env::args().any(|a| a == "--list") {
        util::Examples::locate().build(&[]);
    }
    util::run(tests![
        lifecycle,
        jobs => 60,
        count_requests,
        hello_sigterm => 30,
        hello_sigint => 30,
        hello_user_cpu_affinity_nofile => 30,
    ]);
}

// ----- helpers ---------------------------------------------------------------------------------

/// Starts example `name` (built for this binary's target, through its runner) with its stdout
/// and stderr piped.
fn start(name: &str, args: &[&str]) -> Child {
    let ex = util::Examples::locate();
    ex.command(name)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", ex.path(name).display()))
}

/// Waits for the example to exit within `limit` and returns its output; on timeout kills it
/// (SIGKILL to its pid; its workers die with it) and fails.
fn finish(mut child: Child, limit: Duration) -> Output {
    let end = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "example did not exit within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("wait")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local_addr").port()
}

/// Connects, retrying while the example is still binding.
fn connect(port: u16) -> TcpStream {
    let mut s = None;
    assert!(
        util::wait_until(Duration::from_secs(5), || {
            s = TcpStream::connect(("127.0.0.1", port)).ok();
            s.is_some()
        }),
        "nothing listens on port {port}"
    );
    let s = s.expect("connected");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

/// Sends one GET and reads one response: (status line and headers, body).
fn get(s: &mut TcpStream, extra_headers: &str) -> (String, String) {
    write!(s, "GET / HTTP/1.1\r\nHost: test\r\n{extra_headers}\r\n").expect("send request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk).expect("read response");
        assert!(n > 0, "connection closed mid-response: {:?}", text(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = text(&buf[..head_end]);
    let len: usize = util::content_length(&head).expect("content-length");
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).expect("read body");
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(buf.len(), head_end + len, "bytes after the body");
    (head, text(&buf[head_end..]))
}

/// The lines of `out` that start with `prefix`.
fn lines_with<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(prefix)).collect()
}

// ----- lifecycle -------------------------------------------------------------------------------

fn lifecycle() {
    let out = finish(start("lifecycle", &[]), Duration::from_secs(10));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{:?}\n{stdout}", out.status);
    let expected = [
        (1, "code 0", false),
        (2, "code 7", false),
        (3, "SIGTERM", false),
        (4, "SIGKILL", false),
        (5, "code 0", true),
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    for (id, how, after) in expected {
        let pos = |prefix: &str| {
            let found: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].starts_with(prefix))
                .collect();
            assert_eq!(found.len(), 1, "one line {prefix:?} in:\n{stdout}");
            found[0]
        };
        let fork = pos(&format!("worker {id} forked (pid "));
        let online = pos(&format!("worker {id} online"));
        let disconnect = pos(&format!("worker {id} disconnected"));
        let exit = pos(&format!("worker {id} (pid "));
        assert!(
            fork < online && online < disconnect && disconnect < exit,
            "{stdout}"
        );
        let want = format!("died ({how}), exitedAfterDisconnect: {after}");
        assert!(
            lines[exit].ends_with(&want),
            "{:?}: want {want:?}",
            lines[exit]
        );
        let pid: i32 = lines[fork]
            .trim_start_matches(&format!("worker {id} forked (pid "))
            .trim_end_matches(')')
            .parse()
            .expect("pid");
        assert!(!util::alive(pid), "worker {id} (pid {pid}) is still alive");
        let voluntary = lines_with(&stdout, &format!("worker {id}: Oh, it was just voluntary"));
        assert_eq!(voluntary.len(), after as usize, "{stdout}");
    }
    assert_eq!(lines.last(), Some(&"all workers gone"));
}

// ----- jobs ------------------------------------------------------------------------------------

/// Prime factors, computed here without the example's code: divide by every d from 2 up.
fn factors(mut n: u64) -> String {
    let mut f = Vec::new();
    let mut d = 2u64;
    while d <= n / d {
        if n % d == 0 {
            f.push(d.to_string());
            n /= d;
        } else {
            d += 1;
        }
    }
    f.push(n.to_string());
    f.join(" * ")
}

fn jobs() {
    let numbers: [u64; 12] = [
        2,
        97,
        360,
        65_536,
        716_539,
        4_294_967_297,
        600_851_475_143,
        999_985_999_949,
        281_479_271_350_267,
        9_007_199_254_740_993,
        u64::MAX - 1,
        u64::MAX,
    ];
    let args: Vec<String> = ["--workers".to_string(), "3".to_string()]
        .into_iter()
        .chain(numbers.iter().map(u64::to_string))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = finish(start("jobs", &args), Duration::from_secs(45));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let mut got: Vec<&str> = stdout
        .lines()
        .map(|l| {
            let (who, result) = l.split_once(": ").expect("worker N: result");
            let id: u32 = who.trim_start_matches("worker ").parse().expect("id");
            assert!((1..=3).contains(&id), "{l}");
            result
        })
        .collect();
    got.sort();
    let mut want: Vec<String> = numbers
        .iter()
        .map(|&n| format!("{n} = {}", factors(n)))
        .collect();
    want.sort();
    assert_eq!(got, want);

    // The built-in list: every line's factors multiply to its number.
    let out = finish(start("jobs", &["--workers", "2"]), Duration::from_secs(45));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.lines().count() >= 4, "{stdout}");
    for l in stdout.lines() {
        let (_, result) = l.split_once(": ").expect("worker N: result");
        let (n, f) = result.split_once(" = ").expect("n = factors");
        let n: u64 = n.parse().expect("n");
        assert_eq!(f, factors(n), "{l}");
    }
}

// ----- count_requests --------------------------------------------------------------------------

fn count_requests() {
    const N: usize = 25;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = start(
        "count_requests",
        &["--listen", &listen, "--workers", "2", "--seconds", "3"],
    );
    for _ in 0..N {
        let mut s = connect(port);
        let (head, body) = get(&mut s, "");
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(body, "hello world\n");
    }
    let out = finish(child, Duration::from_secs(15));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{:?}\n{stdout}", out.status);
    let counts: Vec<usize> = lines_with(&stdout, "numReqs = ")
        .iter()
        .map(|l| {
            l.trim_start_matches("numReqs = ")
                .trim_end_matches(" (final)")
                .parse()
                .expect("count")
        })
        .collect();
    assert!(
        counts.len() >= 2,
        "a line every second, and the total:\n{stdout}"
    );
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{stdout}");
    assert_eq!(
        stdout.lines().last(),
        Some(format!("numReqs = {N} (final)").as_str())
    );
}

// ----- hello -----------------------------------------------------------------------------------

/// `hello from worker <id> (pid <pid>)\n` → (id, pid).
fn parse_hello(body: &str) -> (u32, i32) {
    let rest = body
        .strip_prefix("hello from worker ")
        .and_then(|r| r.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("body {body:?}"));
    let (id, pid) = rest
        .split_once(" (pid ")
        .unwrap_or_else(|| panic!("body {body:?}"));
    (
        id.parse().expect("worker id"),
        pid.parse().expect("worker pid"),
    )
}

const CURL: &str = "/usr/bin/curl";

fn curl(args: &[&str]) -> String {
    let out = Command::new(CURL)
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl {args:?}: {:?}", out.status);
    text(&out.stdout)
}

fn hello(signal: i32) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}/");
    let child = start("hello", &["--listen", &listen, "--workers", "2"]);
    let primary = child.id() as i32;
    drop(connect(port));

    // One request: the body names a worker of this primary.
    let body = if Path::new(CURL).exists() {
        curl(&[&url])
    } else {
        get(&mut connect(port), "").1
    };
    let (id, pid) = parse_hello(&body);
    assert!((1..=2).contains(&id), "{body}");
    assert!(util::children_of(primary).contains(&pid), "{body}");

    // Keep-alive: two requests on one connection, both answered by the same worker.
    let mut s = connect(port);
    let (head1, body1) = get(&mut s, "");
    let (head2, body2) = get(&mut s, "");
    assert!(head1.starts_with("HTTP/1.1 200 ") && head2.starts_with("HTTP/1.1 200 "));
    parse_hello(&body1);
    assert_eq!(body1, body2);
    drop(s);
    if Path::new(CURL).exists() {
        // curl reuses its connection for the second URL: one connect, then none.
        let out = curl(&["-w", "%{num_connects}\\n", &url, &url]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!((lines[1], lines[3]), ("1", "0"), "{out}");
        assert_eq!(lines[0], lines[2], "{out}");
        parse_hello(&format!("{}\n", lines[0]));
    }

    assert_eq!(unsafe { libc::kill(primary, signal) }, 0);
    let out = finish(child, Duration::from_secs(20));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");

    // One line per lifecycle event of each of the two workers, and no third worker.
    let mut pids = Vec::new();
    for id in 1..=2 {
        let one = |prefix: String| {
            let l = lines_with(&stderr, &prefix);
            assert_eq!(l.len(), 1, "one line {prefix:?} in:\n{stderr}");
            l[0]
        };
        let fork = one(format!("worker {id} forked (pid "));
        one(format!("worker {id} online"));
        one(format!("worker {id} listening on {listen}"));
        one(format!("worker {id} disconnected"));
        let exit = one(format!("worker {id} (pid "));
        assert!(exit.contains(" exited: "), "{exit}");
        assert!(!exit.ends_with("(unexpected)"), "{exit}");
        if signal == libc::SIGTERM {
            assert!(exit.ends_with("exited: exit status: 0"), "{exit}");
        }
        let pid: i32 = fork
            .trim_start_matches(&format!("worker {id} forked (pid "))
            .trim_end_matches(')')
            .parse()
            .expect("pid");
        pids.push(pid);
    }
    assert!(lines_with(&stderr, "worker 3 ").is_empty(), "{stderr}");
    let stopping = if signal == libc::SIGTERM {
        "stopping gracefully"
    } else {
        "stopping fast"
    };
    assert_eq!(lines_with(&stderr, stopping).len(), 1, "{stderr}");
    assert!(pids.contains(&pid), "{pid} not in {pids:?}");

    // No worker is left behind.
    for pid in pids {
        assert!(!util::alive(pid), "worker pid {pid} is still alive");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid}");
    }
}

fn hello_sigterm() {
    hello(libc::SIGTERM);
}

fn hello_sigint() {
    hello(libc::SIGINT);
}

/// A line of `/proc/PID/status`, tabs as spaces.
fn status_of(pid: i32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `hello --user nobody --cpu-affinity auto --nofile N`: the workers run as nobody (when this
/// runs as root and the machine has `nobody`), each on its CPU, named `fc-worker-<id>`, and the
/// primary says which open-file limit it set.
fn hello_user_cpu_affinity_nofile() {
    // nobody's uid, when this runs as root and the machine has that user.
    // SAFETY: geteuid has no preconditions.
    let nobody: Option<String> = (unsafe { libc::geteuid() } == 0)
        .then(|| Command::new("id").args(["-u", "nobody"]).output().ok())
        .flatten()
        .filter(|o| o.status.success())
        .map(|o| text(&o.stdout).trim().to_string());
    let as_nobody = nobody.is_some();
    if !as_nobody {
        println!("    (not root, or no user nobody: --user is not tried)");
    }
    let set = rustix::thread::sched_getaffinity(None).expect("sched_getaffinity");
    let cpus: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect();
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    let want_nofile = rl.rlim_cur.max(8192.min(rl.rlim_max));

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--listen",
        &listen,
        "--workers",
        "2",
        "--cpu-affinity",
        "auto",
        "--nofile",
        "8192",
    ];
    if as_nobody {
        args.extend(["--user", "nobody"]);
    }
    let child = start("hello", &args);
    let primary = child.id() as i32;
    // Both workers answer (round-robin), each from the pid it names.
    let mut seen = std::collections::BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 && Instant::now() < end {
        let (_, body) = get(&mut connect(port), "Connection: close\r\n");
        let (id, pid) = parse_hello(&body);
        seen.insert(id, pid);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (&id, &pid) in &seen {
        assert!(util::children_of(primary).contains(&pid), "{pid}");
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
        assert_eq!(comm.trim_end(), format!("fc-worker-{id}"));
        let cpu = cpus[(id as usize - 1) % cpus.len()];
        assert_eq!(
            status_of(pid, "Cpus_allowed_list"),
            cpu.to_string(),
            "worker {id}"
        );
        if let Some(u) = &nobody {
            assert_eq!(
                status_of(pid, "Uid"),
                format!("{u} {u} {u} {u}"),
                "worker {id}"
            );
        }
    }
    if as_nobody {
        // The primary is still root.
        assert!(status_of(primary, "Uid").starts_with("0 0 0"));
    }
    // SAFETY: kill has no memory preconditions; the pid is this test's child.
    assert_eq!(unsafe { libc::kill(primary, libc::SIGTERM) }, 0);
    let out = finish(child, Duration::from_secs(20));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        lines_with(&stderr, "open files: up to "),
        vec![format!("open files: up to {want_nofile} per process").as_str()],
        "{stderr}"
    );
}
