/* startup_probe.c - time from launch until EVERY worker of a prefork HTTP server answers.
 *
 *   startup_probe [-n RUNS] [-w WORKERS] [-c CONC] [-i POLL_US] [-t TIMEOUT_MS]
 *                 [-r READY_TEXT] PORT -- CMD [ARGS...]
 *
 * RUNS times (default 10): t0 = now; fork+exec CMD (stdout to /dev/null; stderr to
 * /dev/null, or to a pipe that is watched for READY_TEXT with -r); then, in a loop:
 *   open CONC (default WORKERS, at most 64) connections to 127.0.0.1:PORT at once, send
 *   "GET / HTTP/1.1 ... Connection: close" on each, read each response to EOF;
 *   every "HTTP/1.x 200" response counts, and its body is remembered. Workers are told
 *   apart by their body (hello answers "hello from worker <id> (pid <pid>)"), so
 *   "all" is the time when WORKERS distinct bodies have been seen. A server whose workers
 *   all answer the same body can only be timed to its first 200 (use -w 1).
 *   If an attempt got no 200, sleep POLL_US (default 200) and try again.
 * Concurrent connections matter for a shared listener: with EPOLLEXCLUSIVE the kernel wakes
 * one idle worker per connection, so one connection at a time may keep landing on the same
 * worker.
 * Then SIGTERM to CMD, reap CMD and (as child subreaper) every orphaned descendant; after
 * 5 s anything left gets SIGKILL by pid. Each run is bounded by TIMEOUT_MS (default 10000).
 *
 * Output: one line per run, then (machine-readable; "NA" when no run reached it):
 *   first_200_ms min=.. median=.. max=.. ok=K/RUNS
 *   all_workers_ms min=.. median=.. max=.. ok=K/RUNS workers=W
 *   ready_text_ms min=.. median=.. max=.. ok=K/RUNS            (with -r)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONC 64
#define MAX_BODIES 1024
#define BODY_MAX 128

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_us(long us) {
    struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static char bodies[MAX_BODIES][BODY_MAX];
static int nbodies;

/* Remembers body b (truncated); returns 1 if it is new. */
static int add_body(const char *b, size_t len) {
    if (len >= BODY_MAX) len = BODY_MAX - 1;
    for (int i = 0; i < nbodies; i++)
        if (strlen(bodies[i]) == len && !memcmp(bodies[i], b, len)) return 0;
    if (nbodies == MAX_BODIES) return 0;
    memcpy(bodies[nbodies], b, len);
    bodies[nbodies][len] = 0;
    nbodies++;
    return 1;
}

/* One attempt with conc concurrent connections; returns the number of 200s. */
static int attempt(int port, int conc) {
    int fds[MAX_CONC];
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    static const char req[] = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    struct timeval tv = {.tv_sec = 2, .tv_usec = 0};
    int n = 0;
    for (int i = 0; i < conc; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) break;
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
            close(fd);
            break; /* not listening yet */
        }
        fds[n++] = fd;
    }
    for (int i = 0; i < n; i++)
        if (write(fds[i], req, sizeof req - 1) != (ssize_t)(sizeof req - 1)) {
            close(fds[i]);
            fds[i] = -1;
        }
    int ok = 0;
    for (int i = 0; i < n; i++) {
        if (fds[i] < 0) continue;
        char buf[2048];
        size_t have = 0;
        for (;;) {
            ssize_t r = read(fds[i], buf + have, sizeof buf - 1 - have);
            if (r <= 0) break;
            have += (size_t)r;
            if (have == sizeof buf - 1) break;
        }
        buf[have] = 0;
        close(fds[i]);
        if (have >= 12 && !strncmp(buf, "HTTP/1.", 7) && !strncmp(buf + 9, "200", 3)) {
            ok++;
            char *body = strstr(buf, "\r\n\r\n");
            if (body) {
                body += 4;
                add_body(body, have - (size_t)(body - buf));
            }
        }
    }
    return ok;
}

/* SIGKILL (by pid) every current child of this process. */
static void kill_my_children(void) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", (int)getpid());
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char cp[384];
        snprintf(cp, sizeof cp, "%s/%s/children", path, e->d_name);
        FILE *f = fopen(cp, "r");
        if (!f) continue;
        int pid;
        while (fscanf(f, "%d", &pid) == 1) kill(pid, SIGKILL);
        fclose(f);
    }
    closedir(d);
}

/* Reap everything below us; SIGKILL leftovers after 5 s. Drains fd (if >= 0) meanwhile. */
static void reap_all(int drain_fd) {
    uint64_t deadline = now_ns() + 5000000000ull;
    int killed = 0;
    for (;;) {
        pid_t r = waitpid(-1, NULL, WNOHANG);
        if (r < 0 && errno == ECHILD) return;
        if (r > 0) continue;
        if (!killed && now_ns() > deadline) {
            fprintf(stderr, "startup_probe: descendants still alive after 5 s, SIGKILL\n");
            kill_my_children();
            killed = 1;
        }
        if (drain_fd >= 0) {
            char b[4096];
            while (read(drain_fd, b, sizeof b) > 0) {}
        }
        sleep_us(2000);
    }
}

static void summary(const char *name, uint64_t *v, int runs, const char *extra) {
    uint64_t s[runs > 0 ? runs : 1];
    int k = 0;
    for (int i = 0; i < runs; i++)
        if (v[i]) s[k++] = v[i];
    if (!k) {
        printf("%s min=NA median=NA max=NA ok=0/%d%s\n", name, runs, extra);
        return;
    }
    qsort(s, (size_t)k, sizeof *s, cmp_u64);
    printf("%s min=%.2f median=%.2f max=%.2f ok=%d/%d%s\n", name, s[0] / 1e6, s[k / 2] / 1e6,
           s[k - 1] / 1e6, k, runs, extra);
}

int main(int argc, char **argv) {
    int runs = 10, workers = 1, conc = 0;
    long poll_us = 200, timeout_ms = 10000;
    const char *ready = NULL;
    int i = 1;
    signal(SIGPIPE, SIG_IGN);
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "-n") && i + 1 < argc) runs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-w") && i + 1 < argc) workers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-c") && i + 1 < argc) conc = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-i") && i + 1 < argc) poll_us = atol(argv[++i]);
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) timeout_ms = atol(argv[++i]);
        else if (!strcmp(argv[i], "-r") && i + 1 < argc) ready = argv[++i];
        else break;
    }
    if (i + 2 >= argc || strcmp(argv[i + 1], "--") != 0) {
        fprintf(stderr, "usage: startup_probe [-n RUNS] [-w WORKERS] [-c CONC] [-i POLL_US] "
                        "[-t TIMEOUT_MS] [-r READY_TEXT] PORT -- CMD [ARGS...]\n");
        return 2;
    }
    int port = atoi(argv[i]);
    char **cmd = &argv[i + 2];
    if (runs < 1) runs = 1;
    if (workers < 1) workers = 1;
    if (conc < 1) conc = workers;
    if (conc > MAX_CONC) conc = MAX_CONC;
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    if (attempt(port, 1)) {
        fprintf(stderr, "startup_probe: something already answers on port %d\n", port);
        return 1;
    }
    uint64_t *first = calloc((size_t)runs, sizeof *first);
    uint64_t *all = calloc((size_t)runs, sizeof *all);
    uint64_t *rdy = calloc((size_t)runs, sizeof *rdy);
    for (int r = 0; r < runs; r++) {
        int pfd[2] = {-1, -1};
        if (ready && pipe2(pfd, O_CLOEXEC) != 0) {
            perror("pipe2");
            return 1;
        }
        nbodies = 0;
        uint64_t t0 = now_ns();
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            int dn = open("/dev/null", O_RDWR);
            if (dn >= 0) {
                dup2(dn, 1);
                dup2(ready ? pfd[1] : dn, 2);
            }
            execvp(cmd[0], cmd);
            _exit(127);
        }
        if (ready) {
            close(pfd[1]);
            fcntl(pfd[0], F_SETFL, O_NONBLOCK);
        }
        char tail[8192];
        size_t tlen = 0;
        uint64_t t_first = 0, t_all = 0, t_ready = 0, limit = t0 + (uint64_t)timeout_ms * 1000000ull;
        int exited = 0;
        while (now_ns() < limit) {
            if (ready && !t_ready) {
                ssize_t k;
                while ((k = read(pfd[0], tail + tlen, sizeof tail - 1 - tlen)) > 0) {
                    tlen += (size_t)k;
                    tail[tlen] = 0;
                    if (strstr(tail, ready)) {
                        t_ready = now_ns();
                        break;
                    }
                    if (tlen > sizeof tail / 2) { /* keep the last half */
                        memmove(tail, tail + tlen - sizeof tail / 4, sizeof tail / 4);
                        tlen = sizeof tail / 4;
                    }
                }
            }
            int got = t_all ? 0 : attempt(port, conc);
            uint64_t t = now_ns();
            if (got && !t_first) t_first = t;
            if (got && !t_all && nbodies >= workers) t_all = t;
            if (t_all && (!ready || t_ready)) break;
            if (waitpid(pid, NULL, WNOHANG) == pid) {
                fprintf(stderr, "startup_probe: server exited before answering\n");
                exited = 1;
                break;
            }
            if (!got) sleep_us(poll_us);
        }
        if (!exited) kill(pid, SIGTERM);
        reap_all(ready ? pfd[0] : -1);
        if (ready) close(pfd[0]);
        first[r] = t_first ? t_first - t0 : 0;
        all[r] = t_all ? t_all - t0 : 0;
        rdy[r] = t_ready ? t_ready - t0 : 0;
        printf("run %2d: first_200 %.2f ms  all_%d_workers %s%.2f ms (distinct bodies %d)", r + 1,
               first[r] / 1e6, workers, t_all ? "" : "NA ", all[r] / 1e6, nbodies);
        if (ready) printf("  ready_text %.2f ms", rdy[r] / 1e6);
        printf("\n");
        fflush(stdout);
        sleep_us(200000); /* let the port and the machine settle */
    }
    char extra[64];
    summary("first_200_ms", first, runs, "");
    snprintf(extra, sizeof extra, " workers=%d", workers);
    summary("all_workers_ms", all, runs, extra);
    if (ready) summary("ready_text_ms", rdy, runs, "");
    return 0;
}
