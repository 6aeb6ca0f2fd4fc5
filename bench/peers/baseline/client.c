/*
 * A lean client for bench/storm.sh: the counterpart of server.c, so that at a million
 * connections on two cores the client's own cost does not decide which server wins.
 * `c1m bench` is the measuring instrument of this project (latency histograms, causes,
 * reconnects, JSON reports); this program measures only what the live storm needs, with
 * about 64 bytes per connection and no per-message allocation:
 *
 *   baseline-client [--ws] [--procs P] [--rate R] [--timeout-ms T] [--duration-s D]
 *                   [--rounds K] --sources FIRST-LAST HOST PORT N
 *
 * N connections from P processes (N/P each, R/P connects per second each), bound to the
 * IPv4 source addresses FIRST..LAST in turn with IP_BIND_ADDRESS_NO_PORT. With --ws each
 * sends a WebSocket upgrade (a fixed key: the 101 is not checked beyond its status) and
 * reads unmasked frames; without, raw TCP lines. Every message must be a decimal stamp in
 * milliseconds since the Unix epoch (c1m's clock and server.c both send that).
 *
 * A process ends when all its connections were tried and K rounds stamped after its last
 * connection opened were received by every connection open at their stamp, or after D
 * seconds. Each prints one JSON line: established, failures by cause, a connect-time
 * histogram (connect call to 101, or to connect for raw, in ms), the first and last
 * establishment times, and per round (stamp): connections that were open at the stamp
 * (their 101 read before it, by this clock, so none is expected too early), how many of
 * them received it, and the last arrival. A connection received a round or missed it:
 * servers send one connection's messages in order. bench/storm_client.py merges the
 * lines. Connects only to the HOST given (storm.sh: 127.0.0.1).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_ROUNDS 64
#define HIST_MS 120000 /* connect times up to 120 s, 1 ms buckets */
#define BUF 40         /* a frame header and a stamp; larger frames are skipped */

enum { FREE, CONNECTING, UPGRADING, OPEN, DEAD };

struct conn {
    int fd;
    uint8_t state;
    uint8_t have;     /* bytes in buf */
    uint8_t matched;  /* of "\r\n\r\n" while upgrading */
    uint8_t pad;
    uint32_t skip;    /* bytes of an oversized frame still to skip */
    int64_t started;  /* connect call, ms */
    int64_t opened;   /* 101 read (or connected, raw), ms */
    uint64_t rounds;  /* bit r: round r received */
    char buf[BUF];
};

struct round {
    int64_t stamp, last;
    long expected, received;
};

static int ws, procs = 1, rounds_wanted = 3, proc_index;
static long rate = 10000, timeout_ms = 10000, duration_s = 600, total;
static uint32_t src_first, src_last;
static struct sockaddr_in dest;
static char request[512];
static size_t request_len;

static struct conn *conns;
static long count, started, pending, established;
static long oldest_pending; /* every connection before it has settled: open or dead */
static int64_t first_open = -1, last_open = -1, last_done = -1;
static struct round rounds[MAX_ROUNDS];
static int nrounds;
static uint32_t *hist;
static long errors[8];
static const char *error_names[8] = {"connect.refused", "connect.timeout", "connect.other",
                                     "handshake.timeout", "handshake.closed", "handshake.status",
                                     "closed.after_open", "socket"};
enum { E_REFUSED, E_CONNECT_TIMEOUT, E_CONNECT_OTHER, E_HS_TIMEOUT, E_HS_CLOSED, E_HS_STATUS,
       E_CLOSED, E_SOCKET };

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void finish(struct conn *c, int error) {
    if (c->state == CONNECTING || c->state == UPGRADING) {
        pending--;
        last_done = now_ms();
    }
    if (c->state == OPEN) established--;
    if (error >= 0) errors[error]++;
    close(c->fd);
    c->state = DEAD;
}

static void on_open(struct conn *c, int64_t t) {
    c->state = OPEN;
    c->opened = t;
    pending--;
    established++;
    last_done = t;
    if (first_open < 0) first_open = t;
    last_open = t;
    int64_t ms = t - c->started;
    hist[ms < 0 ? 0 : ms >= HIST_MS ? HIST_MS - 1 : ms]++;
}

static void on_stamp(struct conn *c, int64_t stamp, int64_t t) {
    int r;
    for (r = 0; r < nrounds && rounds[r].stamp != stamp; r++) {}
    if (r == nrounds) {
        if (nrounds == MAX_ROUNDS) return;
        /* A new round: who was open when it was stamped (every one of them was open
         * before this message could be sent, so the count is final). */
        rounds[r].stamp = stamp;
        rounds[r].last = t;
        for (long i = 0; i < count; i++)
            if (conns[i].state == OPEN && conns[i].opened < stamp) rounds[r].expected++;
        nrounds++;
    }
    if (c->opened < stamp && !(c->rounds & (1ULL << r))) {
        c->rounds |= 1ULL << r;
        rounds[r].received++;
        if (t > rounds[r].last) rounds[r].last = t;
    }
}

/* Frames (or lines) in c->buf: handle each complete one, keep the rest. */
static void parse(struct conn *c, const char *data, size_t n, int64_t t) {
    while (n > 0) {
        if (c->skip) {
            size_t k = n < c->skip ? n : c->skip;
            c->skip -= k, data += k, n -= k;
            continue;
        }
        size_t room = BUF - c->have, k = n < room ? n : room;
        memcpy(c->buf + c->have, data, k);
        c->have += k, data += k, n -= k;
        for (;;) {
            size_t used;
            int64_t stamp = 0;
            if (ws) {
                if (c->have < 2) break;
                uint8_t *b = (uint8_t *)c->buf;
                uint64_t len = b[1] & 0x7f;
                size_t head = 2;
                if (len == 126) {
                    if (c->have < 4) break;
                    len = (uint64_t)b[2] << 8 | b[3], head = 4;
                } else if (len == 127) {
                    if (c->have < 10) break;
                    len = 0;
                    for (int i = 2; i < 10; i++) len = len << 8 | b[i];
                    head = 10;
                }
                if (head + len > BUF) { /* not a stamp: skip it */
                    c->skip = (uint32_t)(head + len - c->have);
                    c->have = 0;
                    break;
                }
                if (c->have < head + len) break;
                if ((b[0] & 0x0f) == 1)
                    for (size_t i = head; i < head + len && c->buf[i] >= '0' && c->buf[i] <= '9'; i++)
                        stamp = stamp * 10 + (c->buf[i] - '0');
                used = head + len;
            } else {
                char *nl = memchr(c->buf, '\n', c->have);
                if (!nl) {
                    if (c->have == BUF) c->have = 0; /* a line too long: drop it */
                    break;
                }
                for (char *p = c->buf; p < nl && *p >= '0' && *p <= '9'; p++) stamp = stamp * 10 + (*p - '0');
                used = (size_t)(nl - c->buf) + 1;
            }
            if (stamp > 0) on_stamp(c, stamp, t);
            memmove(c->buf, c->buf + used, c->have - used);
            c->have -= used;
        }
    }
}

static void on_readable(struct conn *c, char *scratch, size_t size) {
    for (;;) {
        ssize_t n = read(c->fd, scratch, size);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            finish(c, c->state == UPGRADING ? E_HS_CLOSED : E_CLOSED);
            return;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            return;
        }
        int64_t t = now_ms();
        char *p = scratch;
        if (c->state == UPGRADING) {
            /* The status line's first 12 bytes, then up to the blank line. */
            size_t i = 0;
            for (; i < (size_t)n && c->matched < 4; i++) {
                if (c->have < 12) c->buf[c->have++] = p[i];
                char want = "\r\n\r\n"[c->matched];
                c->matched = p[i] == want ? c->matched + 1 : (p[i] == '\r' ? 1 : 0);
            }
            if (c->matched < 4) continue;
            if (c->have < 12 || memcmp(c->buf, "HTTP/1.1 101", 12) != 0) {
                finish(c, E_HS_STATUS);
                return;
            }
            c->have = 0;
            on_open(c, t);
            p += i, n -= (ssize_t)i;
        }
        if (n > 0 && c->state == OPEN) parse(c, p, (size_t)n, t);
    }
}

static int start_one(int ep, long i) {
    struct conn *c = &conns[i];
    memset(c, 0, sizeof *c);
    c->started = now_ms();
    pending++;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->fd = -1, c->state = DEAD, pending--, errors[E_SOCKET]++;
        return -1;
    }
    c->fd = fd;
    c->state = CONNECTING;
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint32_t span = src_last - src_first + 1;
    struct sockaddr_in src = {.sin_family = AF_INET,
                              .sin_addr.s_addr = htonl(src_first + (uint32_t)((proc_index + i * procs) % span))};
    if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0 ||
        (connect(fd, (struct sockaddr *)&dest, sizeof dest) != 0 && errno != EINPROGRESS)) {
        finish(c, errno == ECONNREFUSED ? E_REFUSED : E_CONNECT_OTHER);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.u64 = (uint64_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static void on_writable(struct conn *c) {
    if (c->state != CONNECTING) return;
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        finish(c, err == ECONNREFUSED ? E_REFUSED : err == ETIMEDOUT ? E_CONNECT_TIMEOUT : E_CONNECT_OTHER);
        return;
    }
    if (!ws) {
        on_open(c, now_ms());
        return;
    }
    /* A fresh socket's buffer takes the whole request. */
    if (write(c->fd, request, request_len) != (ssize_t)request_len) {
        finish(c, E_HS_CLOSED);
        return;
    }
    c->state = UPGRADING;
}

static int done(int64_t t, int64_t start) {
    if (t - start >= duration_s * 1000) return 1;
    if (started < count || pending > 0) return 0;
    /* K complete rounds stamped after the last connection settled. */
    int complete = 0;
    for (int r = 0; r < nrounds; r++)
        if (rounds[r].stamp > last_done && rounds[r].received == rounds[r].expected) complete++;
    return complete >= rounds_wanted || established == 0;
}

static void report(int index, int64_t start) {
    size_t size = 4 << 20; /* room for every histogram bucket */
    char *out = malloc(size);
    if (!out) exit(1);
    int n = snprintf(out, size, "{\"proc\":%d,\"connections\":%ld,\"start\":%lld,\"end\":%lld,\"established\":%ld,"
                     "\"first_open\":%lld,\"last_open\":%lld,\"errors\":{",
                     index, count, (long long)start, (long long)now_ms(), established, (long long)first_open, (long long)last_open);
    for (int e = 0; e < 8; e++)
        n += snprintf(out + n, size - n, "%s\"%s\":%ld", e ? "," : "", error_names[e], errors[e]);
    n += snprintf(out + n, size - n, "},\"rounds\":[");
    for (int r = 0; r < nrounds; r++)
        n += snprintf(out + n, size - n, "%s[%lld,%ld,%ld,%lld]", r ? "," : "", (long long)rounds[r].stamp,
                      rounds[r].expected, rounds[r].received, (long long)rounds[r].last);
    n += snprintf(out + n, size - n, "],\"connect_ms\":{");
    int first = 1;
    for (int ms = 0; ms < HIST_MS; ms++)
        if (hist[ms]) n += snprintf(out + n, size - n, "%s\"%d\":%u", first ? "" : ",", ms, hist[ms]), first = 0;
    n += snprintf(out + n, size - n, "}}\n");
    /* One write per line: the processes share stdout's file offset, and stdio would
     * split a long line into buffer-sized writes that interleave with the others'. */
    for (char *p = out; n > 0;) {
        ssize_t w = write(1, p, (size_t)n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        p += w, n -= (int)w;
    }
    free(out);
}

static void run(int index) {
    conns = calloc((size_t)count, sizeof *conns);
    hist = calloc(HIST_MS, sizeof *hist);
    if (!conns || !hist) {
        perror("calloc");
        exit(1);
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    static char scratch[65536];
    struct epoll_event events[256];
    double per_ms = (double)rate / 1000.0;
    int64_t start = now_ms(), next_sweep = start + 100;
    for (;;) {
        int64_t t = now_ms();
        long due = (long)((t - start) * per_ms) + 1;
        while (started < count && started < due) start_one(ep, started++);
        if (t >= next_sweep) {
            next_sweep = t + 100;
            /* Connections start in index order and settle in any order, so only those from
             * the oldest unsettled one on can time out: the sweep costs the connects in
             * flight, not all N (a sweep of all of them, 10 times a second in 53 processes,
             * took ~10 % of the machine at a million). */
            while (oldest_pending < started && conns[oldest_pending].state != CONNECTING &&
                   conns[oldest_pending].state != UPGRADING)
                oldest_pending++;
            for (long i = oldest_pending; i < started; i++) {
                struct conn *c = &conns[i];
                if ((c->state == CONNECTING || c->state == UPGRADING) && t - c->started >= timeout_ms)
                    finish(c, c->state == CONNECTING ? E_CONNECT_TIMEOUT : E_HS_TIMEOUT);
            }
            if (done(t, start)) break;
        }
        /* Sleep until the next connect is due (connect i is due at start + i / per_ms),
         * not 1 ms at a time: at ~100 connects/s per process that is a tenth of the wake-ups. */
        int wait_ms = 100;
        if (started < count) {
            int64_t next_due = start + (int64_t)((double)started / per_ms) + 1;
            wait_ms = next_due - t < 1 ? 1 : next_due - t > 100 ? 100 : (int)(next_due - t);
        }
        int n = epoll_wait(ep, events, 256, wait_ms);
        for (int k = 0; k < n; k++) {
            struct conn *c = &conns[events[k].data.u64];
            if (c->state == DEAD) continue;
            if (events[k].events & (EPOLLOUT | EPOLLERR)) on_writable(c);
            if (c->state != DEAD && c->state != CONNECTING && (events[k].events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)))
                on_readable(c, scratch, sizeof scratch);
        }
    }
    report(index, start);
}

static uint32_t parse_ip(const char *s) {
    struct in_addr a;
    if (inet_pton(AF_INET, s, &a) != 1) {
        fprintf(stderr, "not an IPv4 address: %s\n", s);
        exit(2);
    }
    return ntohl(a.s_addr);
}

int main(int argc, char **argv) {
    int i = 1;
    char *sources = NULL;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--ws")) ws = 1;
        else if (!strcmp(argv[i], "--procs") && i + 1 < argc) procs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = atol(argv[++i]);
        else if (!strcmp(argv[i], "--timeout-ms") && i + 1 < argc) timeout_ms = atol(argv[++i]);
        else if (!strcmp(argv[i], "--duration-s") && i + 1 < argc) duration_s = atol(argv[++i]);
        else if (!strcmp(argv[i], "--rounds") && i + 1 < argc) rounds_wanted = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--sources") && i + 1 < argc) sources = argv[++i];
        else break;
    }
    if (argc - i != 3 || !sources || !strchr(sources, '-') || procs < 1 || rate < 1 || rounds_wanted < 1 ||
        rounds_wanted > MAX_ROUNDS / 2) {
        fprintf(stderr, "usage: %s [--ws] [--procs P] [--rate R] [--timeout-ms T] [--duration-s D] "
                        "[--rounds K] --sources FIRST-LAST HOST PORT N\n", argv[0]);
        return 2;
    }
    char *dash = strchr(sources, '-');
    *dash = 0;
    src_first = parse_ip(sources), src_last = parse_ip(dash + 1);
    if (src_last < src_first) {
        fprintf(stderr, "--sources: FIRST must not come after LAST\n");
        return 2;
    }
    dest.sin_family = AF_INET;
    dest.sin_addr.s_addr = htonl(parse_ip(argv[i]));
    int port = atoi(argv[i + 1]);
    total = atol(argv[i + 2]);
    if (port <= 0 || port > 65535 || total < 1) {
        fprintf(stderr, "bad PORT or N\n");
        return 2;
    }
    dest.sin_port = htons((uint16_t)port);
    request_len = (size_t)snprintf(request, sizeof request,
                                   "GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                                   argv[i], port);
    signal(SIGPIPE, SIG_IGN);
    rate = rate / procs > 0 ? rate / procs : 1;
    for (int p = 0; p < procs; p++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            count = total / procs + (p < total % procs ? 1 : 0);
            proc_index = p; /* processes take the addresses in turn */
            run(p);
            return 0;
        }
    }
    int failed = 0, status;
    while (wait(&status) > 0)
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed = 1;
    return failed;
}
