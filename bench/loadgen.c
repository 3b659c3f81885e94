/* bench/loadgen.c - the `schedules` section's HTTP client (run.sh builds it into its scratch dir).
 *
 *   loadgen [-c CONNS] [-d SECS] [-n REQUESTS] [-s SLOW_FRACTION] [-H HEADER] [-S SOURCES]
 *           [-t TIMEOUT_MS] [-o FILE] [-r SEED] [-R RATE] [-O OFFSET] PORT
 *
 * A closed loop of CONNS connections to 127.0.0.1:PORT, one `GET / HTTP/1.1` with
 * `Connection: close` per connection (a fresh TCP connection per request, as `wrk -H
 * 'Connection: close'`), for SECS seconds or REQUESTS requests, whichever ends first.
 *
 *   -s F   each request goes to /slow with probability F (random, seeded by -r), else to /;
 *          latencies are kept apart: fast_* is the requests to /, slow_* those to /slow.
 *   -H X   count the answers per value of response header X (e.g. X-Worker, X-Seat); printed as
 *          `value <v> <count>` lines (`value - N`: answers without the header).
 *   -S N   request number i binds its socket to source address index i % N before connect:
 *          127.0.0.0/8 address 127.(1 + k / 62500).(k / 250 % 250).(1 + k % 250) for index k
 *          (so N = 1000 gives 1000 client IPs); -O K starts at index K instead of 0 (another
 *          order of the same IPs, so that round-robin does not repeat a previous pass's mapping).
 *   -R R   open loop: start requests at R per second on average (Poisson arrivals), on at most
 *          CONNS connections at a time (a request that finds all CONNS busy waits, and its
 *          latency counts from its arrival time), instead of the closed loop.
 *   -o F   one line per finished request: `<unix time s.us at completion> <source index> <value>`
 *          (value of -H, `ERR:<kind>` for a failure).
 *
 * Failures are counted by kind (at the client, like wrk's socket errors but apart):
 *   connect  connect() refused / failed (no listener, SYN refused)
 *   reset    ECONNRESET/EPIPE before a full response (e.g. a listener closed with the connection
 *            in its accept queue)
 *   eof      the server closed without a (full) response
 *   timeout  no full response within -t ms (default 2000)
 *   non200   a full response with a status other than 200
 * Prints key=value lines on stdout (see the end of main). Bounded: -d, and a hard alarm().
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { ERR_CONNECT, ERR_RESET, ERR_EOF, ERR_TIMEOUT, ERR_NON200, ERR_OTHER, NERR };
static const char *ERR_NAME[NERR] = {"connect", "reset", "eof", "timeout", "non200", "other"};

struct slot {
    int fd;
    int slow;
    int sent;
    long src;
    size_t len;
    double t0;
    char buf[2048];
};

struct lat {
    uint32_t *v;
    size_t n, cap;
};

static void lat_add(struct lat *l, double us) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 65536;
        l->v = realloc(l->v, l->cap * sizeof *l->v);
        if (!l->v) { perror("realloc"); exit(1); }
    }
    l->v[l->n++] = us > 4e9 ? 4000000000u : (uint32_t)us;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static void lat_print(const char *name, struct lat *l) {
    qsort(l->v, l->n, sizeof *l->v, cmp_u32);
    printf("%s_n=%zu\n", name, l->n);
    if (!l->n) return;
    double sum = 0;
    for (size_t i = 0; i < l->n; i++) sum += l->v[i];
    static const double P[] = {50, 90, 99, 99.9};
    static const char *PN[] = {"p50", "p90", "p99", "p999"};
    for (int i = 0; i < 4; i++) {
        size_t k = (size_t)((P[i] / 100.0) * (double)(l->n - 1) + 0.5);
        printf("%s_%s_us=%u\n", name, PN[i], l->v[k]);
    }
    printf("%s_mean_us=%.0f\n%s_max_us=%u\n", name, sum / (double)l->n, name, l->v[l->n - 1]);
}

/* header value counts: a small open list (a few hundred distinct values at most) */
#define MAXV 4096
static char g_vname[MAXV][40];
static long g_vcount[MAXV];
static int g_nv;

static void count_value(const char *v) {
    for (int i = 0; i < g_nv; i++)
        if (!strcmp(g_vname[i], v)) { g_vcount[i]++; return; }
    if (g_nv < MAXV) {
        snprintf(g_vname[g_nv], sizeof g_vname[0], "%s", v);
        g_vcount[g_nv++] = 1;
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double wall_s(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

static int g_port, g_epfd;
static long g_sources, g_offset;
static const char *g_header;
static double g_slow_frac;
static FILE *g_out;
static long g_err[NERR], g_ok, g_started;
static struct lat g_fast, g_slow;

static void src_addr(long k, struct sockaddr_in *sa) {
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_addr.s_addr = htonl((127u << 24) | ((unsigned)(1 + k / 62500) << 16) |
                                ((unsigned)(k / 250 % 250) << 8) | (unsigned)(1 + k % 250));
}

static void finish(struct slot *s, int err, const char *value) {
    double t1 = now_s();
    if (err < 0) {
        g_ok++;
        lat_add(s->slow ? &g_slow : &g_fast, (t1 - s->t0) * 1e6);
        if (g_header) count_value(value ? value : "-");
    } else {
        g_err[err]++;
    }
    if (g_out) {
        if (err < 0) fprintf(g_out, "%.6f %ld %s\n", wall_s(), s->src, value ? value : "-");
        else fprintf(g_out, "%.6f %ld ERR:%s\n", wall_s(), s->src, ERR_NAME[err]);
    }
    if (s->fd >= 0) {
        close(s->fd); /* also removes it from epoll */
        s->fd = -1;
    }
}

static void start(struct slot *s, int idx, double t0) {
    s->slow = g_slow_frac > 0 && drand48() < g_slow_frac;
    s->sent = 0;
    s->len = 0;
    s->src = g_sources > 0 ? (g_started + g_offset) % g_sources : -1;
    g_started++;
    s->t0 = t0 > 0 ? t0 : now_s();
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) { perror("socket"); exit(1); }
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (s->src >= 0) {
        struct sockaddr_in b;
        src_addr(s->src, &b);
        setsockopt(s->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(s->fd, (struct sockaddr *)&b, sizeof b) < 0) { perror("bind source"); exit(1); }
    }
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)g_port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int r = connect(s->fd, (struct sockaddr *)&sa, sizeof sa);
    if (r < 0 && errno != EINPROGRESS) {
        finish(s, errno == ECONNRESET ? ERR_RESET : ERR_CONNECT, NULL);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(g_epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) { perror("epoll_ctl"); exit(1); }
}

/* a complete response in buf? returns 1 and sets status/value when the head and the
 * Content-Length body are there */
static int parse(struct slot *s, int *status, char *value, size_t vcap) {
    char *end = memmem(s->buf, s->len, "\r\n\r\n", 4);
    if (!end) return 0;
    *end = 0;
    *status = 0;
    sscanf(s->buf, "HTTP/1.%*d %d", status);
    long clen = 0;
    value[0] = 0;
    size_t hl = g_header ? strlen(g_header) : 0;
    for (char *line = strstr(s->buf, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        char *h = line + 2;
        if (!strncasecmp(h, "content-length:", 15)) clen = atol(h + 15);
        if (hl && !strncasecmp(h, g_header, hl) && h[hl] == ':') {
            char *v = h + hl + 1;
            while (*v == ' ') v++;
            size_t n = strcspn(v, "\r\n");
            if (n >= vcap) n = vcap - 1;
            memcpy(value, v, n);
            value[n] = 0;
        }
    }
    size_t have = s->len - (size_t)(end + 4 - s->buf);
    *end = '\r';
    return have >= (size_t)clen;
}

static void on_event(struct slot *s, int idx, uint32_t evs) {
    if (!s->sent && (evs & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            finish(s, err == ECONNRESET ? ERR_RESET : ERR_CONNECT, NULL);
            return;
        }
        char req[128];
        int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                         s->slow ? "/slow" : "/");
        ssize_t w = send(s->fd, req, (size_t)n, MSG_NOSIGNAL);
        if (w != n) {
            finish(s, (w < 0 && errno != ECONNRESET && errno != EPIPE) ? ERR_OTHER : ERR_RESET, NULL);
            return;
        }
        s->sent = 1;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)idx};
        epoll_ctl(g_epfd, EPOLL_CTL_MOD, s->fd, &ev);
    }
    if (!(evs & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
    for (;;) {
        if (s->len >= sizeof s->buf - 1) { finish(s, ERR_OTHER, NULL); return; }
        ssize_t r = recv(s->fd, s->buf + s->len, sizeof s->buf - 1 - s->len, 0);
        if (r > 0) {
            s->len += (size_t)r;
            int status;
            char value[40];
            if (parse(s, &status, value, sizeof value)) {
                finish(s, status == 200 ? -1 : ERR_NON200, value[0] ? value : NULL);
                return;
            }
            continue;
        }
        if (r == 0) { finish(s, ERR_EOF, NULL); return; }
        if (errno == EAGAIN || errno == EINTR) return;
        if (!s->sent && errno == ECONNREFUSED) { finish(s, ERR_CONNECT, NULL); return; }
        finish(s, (errno == ECONNRESET || errno == EPIPE) ? ERR_RESET : ERR_OTHER, NULL);
        return;
    }
}

int main(int argc, char **argv) {
    int conns = 50, opt;
    double dur = 10, timeout_ms = 2000;
    long max_req = -1, seed = 1;
    double rate = 0;
    const char *out = NULL;
    while ((opt = getopt(argc, argv, "c:d:n:s:H:S:t:o:r:R:O:")) != -1) {
        switch (opt) {
        case 'c': conns = atoi(optarg); break;
        case 'd': dur = atof(optarg); break;
        case 'n': max_req = atol(optarg); break;
        case 's': g_slow_frac = atof(optarg); break;
        case 'H': g_header = optarg; break;
        case 'S': g_sources = atol(optarg); break;
        case 't': timeout_ms = atof(optarg); break;
        case 'o': out = optarg; break;
        case 'r': seed = atol(optarg); break;
        case 'R': rate = atof(optarg); break;
        case 'O': g_offset = atol(optarg); break;
        default:
            fprintf(stderr, "usage: loadgen [-c N] [-d S] [-n N] [-s F] [-H X] [-S N] [-t MS] [-o F] [-r SEED] PORT\n");
            return 2;
        }
    }
    if (optind >= argc || conns < 1) { fprintf(stderr, "loadgen: PORT missing\n"); return 2; }
    g_port = atoi(argv[optind]);
    srand48(seed);
    signal(SIGPIPE, SIG_IGN);
    alarm((unsigned)(dur + timeout_ms / 1000 + 30));
    if (out && !(g_out = fopen(out, "w"))) { perror(out); return 1; }
    g_epfd = epoll_create1(EPOLL_CLOEXEC);
    struct slot *slots = calloc((size_t)conns, sizeof *slots);
    struct epoll_event *evs = calloc((size_t)conns, sizeof *evs);
    if (!slots || !evs) return 1;
    double t_start = now_s(), t_end = t_start + dur;
    int active = 0;
    double next_arrival = t_start; /* open loop: the next request's arrival time */
    for (int i = 0; i < conns; i++) slots[i].fd = -1;
    for (;;) {
        double t = now_s();
        int more = t < t_end && (max_req < 0 || g_started < max_req);
        active = 0;
        for (int i = 0; i < conns; i++) {
            struct slot *s = &slots[i];
            if (s->fd >= 0 && (t - s->t0) * 1000 > timeout_ms) finish(s, ERR_TIMEOUT, NULL);
            /* a slot finished synchronously (connect refused) is restarted at once, bounded by
             * the loop: at most one start per slot per pass */
            if (s->fd < 0 && more && (max_req < 0 || g_started < max_req)) {
                if (rate <= 0) start(s, i, 0);
                else if (next_arrival <= t && next_arrival < t_end) {
                    start(s, i, next_arrival);
                    next_arrival += -log(1.0 - drand48()) / rate;
                }
            }
            if (s->fd >= 0) active++;
        }
        if (!active && (!more || (rate > 0 && next_arrival >= t_end))) break;
        int wait_ms = 10;
        if (rate > 0) {
            double dt = (next_arrival - now_s()) * 1000;
            wait_ms = dt <= 0 ? 0 : dt < 10 ? (int)dt + 1 : 10;
        }
        if (!active) {
            if (wait_ms > 0) usleep((useconds_t)wait_ms * 1000);
            continue;
        }
        int n = epoll_wait(g_epfd, evs, conns, wait_ms);
        for (int k = 0; k < n; k++) {
            struct slot *s = &slots[evs[k].data.u32];
            if (s->fd < 0) continue;
            on_event(s, (int)evs[k].data.u32, evs[k].events);
        }
    }
    double wall = now_s() - t_start;
    long err_total = 0;
    for (int e = 0; e < NERR; e++) err_total += g_err[e];
    printf("wall_s=%.3f\nrequests=%ld\nok=%ld\nrps=%.0f\nerrors=%ld\n", wall, g_ok + err_total, g_ok,
           (double)g_ok / wall, err_total);
    for (int e = 0; e < NERR; e++) printf("err_%s=%ld\n", ERR_NAME[e], g_err[e]);
    lat_print("fast", &g_fast);
    lat_print("slow", &g_slow);
    for (int i = 0; i < g_nv; i++) printf("value %s %ld\n", g_vname[i], g_vcount[i]);
    if (g_out) fclose(g_out);
    return 0;
}
