/*
 * The baselines of bench/compare and bench/storm.sh: the seed's push (the time in ms,
 * to every connection, every interval) with as little as possible around the kernel's
 * TCP path, so every server's figures read as a ratio to a physical limit.
 *
 *   baseline-server [--ws] [--procs N] [--shared] [--total N] PORT INTERVAL_MS
 *
 * Without --ws: raw TCP, no handshake; messages are "1764110000000\n" (`c1m bench --url
 * tcp://...` reads them). With --ws: a minimal WebSocket server: it reads the upgrade
 * request, answers 101 with the accept key (SHA-1 and base64 from OpenSSL's libcrypto),
 * pushes unmasked text frames and does nothing else (no pings, no close handshake, no
 * validation): the limit of a WebSocket setup and fan-out on this machine.
 *
 * --procs N forks N processes (like c1m's workers: one per 19,000 connections where
 * nofile is 20,000), each with its own SO_REUSEPORT listener and epoll set; --shared
 * makes them share one listener registered with EPOLLEXCLUSIVE instead (c1m's way).
 * Pushes happen at wall-clock multiples of INTERVAL_MS and carry that instant, so every
 * process stamps a round alike and `c1m bench` sees one round, not one per process.
 * --total N holds pushes until N connections are up in all processes together (counted
 * in shared memory): the seed's gate, as `c1m serve --total`.
 *
 * Prints "listening on 127.0.0.1:PORT". Listens on 127.0.0.1 only. SIGINT/SIGTERM stop
 * every process.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_FD (1 << 20)
#define HEAD_MAX 4096

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static long long clock_ms(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Options and shared state. */
static int ws, procs = 1, shared_listener;
static long long total, interval;
static long *connected; /* upgraded connections, all processes (shared memory) */

/* Per descriptor: 0 free, 1 handshaking (head[] holds what arrived), 2 open. */
static unsigned char *state;
static char **head;
static unsigned short *head_len;

static int listen_on(int port, int reuse_port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuse_port) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 65535)) {
        perror("bind/listen");
        exit(1);
    }
    return fd;
}

static void drop(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    if (state[fd] == 2) __atomic_fetch_sub(connected, 1, __ATOMIC_RELAXED);
    free(head[fd]);
    head[fd] = NULL;
    state[fd] = 0;
}

/* The value of header `name` (case-insensitive) in a request head, or NULL. */
static const char *header(const char *req, const char *name, int *len) {
    size_t n = strlen(name);
    for (const char *line = strstr(req, "\r\n"); line && line[2] != '\r'; line = strstr(line + 2, "\r\n")) {
        const char *at = line + 2;
        if (strncasecmp(at, name, n) == 0 && at[n] == ':') {
            at += n + 1;
            while (*at == ' ') at++;
            const char *end = strstr(at, "\r\n");
            *len = (int)(end - at);
            return at;
        }
    }
    return NULL;
}

/* Reads a handshaking connection; answers 101 once the head is complete. */
static void handshake(int ep, int fd) {
    if (!head[fd]) head[fd] = malloc(HEAD_MAX + 1);
    ssize_t r = read(fd, head[fd] + head_len[fd], HEAD_MAX - head_len[fd]);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) return drop(ep, fd);
    if (r < 0) return;
    head_len[fd] += r;
    head[fd][head_len[fd]] = 0;
    if (!strstr(head[fd], "\r\n\r\n")) {
        if (head_len[fd] == HEAD_MAX) drop(ep, fd);
        return;
    }
    int key_len;
    const char *key = header(head[fd], "Sec-WebSocket-Key", &key_len);
    if (!key || key_len > 64) return drop(ep, fd);
    char input[128];
    int n = snprintf(input, sizeof input, "%.*s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key_len, key);
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1((unsigned char *)input, n, digest);
    char accept[64];
    EVP_EncodeBlock((unsigned char *)accept, digest, SHA_DIGEST_LENGTH);
    char answer[256];
    n = snprintf(answer, sizeof answer,
                 "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", accept);
    if (write(fd, answer, n) != n) return drop(ep, fd);
    free(head[fd]);
    head[fd] = NULL;
    state[fd] = 2;
    __atomic_fetch_add(connected, 1, __ATOMIC_RELAXED);
}

static void accept_all(int ep, int listener) {
    for (;;) {
        int c = accept4(listener, NULL, NULL, SOCK_NONBLOCK);
        if (c < 0) {
            if (errno == EMFILE || errno == ENFILE) {
                /* Full: leave new connections to the other processes. */
                epoll_ctl(ep, EPOLL_CTL_DEL, listener, NULL);
            }
            return;
        }
        if (c >= MAX_FD) { close(c); continue; }
        int one = 1;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
        head_len[c] = 0;
        if (ws) {
            state[c] = 1;
        } else {
            state[c] = 2;
            __atomic_fetch_add(connected, 1, __ATOMIC_RELAXED);
        }
    }
}

static void serve(int listener) {
    state = calloc(MAX_FD, 1);
    head = calloc(MAX_FD, sizeof *head);
    head_len = calloc(MAX_FD, sizeof *head_len);
    int ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN | (shared_listener ? EPOLLEXCLUSIVE : 0), .data.fd = -1};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &lev);
    long long sent = 0, dropped = 0;
    struct epoll_event events[256];
    long long next = (clock_ms(CLOCK_REALTIME) / interval + 1) * interval;
    while (!stop) {
        long long wait = next - clock_ms(CLOCK_REALTIME);
        int n = epoll_wait(ep, events, 256, wait < 0 ? 0 : (int)wait);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == -1) {
                accept_all(ep, listener);
            } else if (state[fd] == 1) {
                handshake(ep, fd);
            } else {
                /* Input is ignored; EOF or an error ends the connection. */
                char buf[512];
                ssize_t r = read(fd, buf, sizeof buf);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) drop(ep, fd);
            }
        }
        long long now = clock_ms(CLOCK_REALTIME);
        if (now < next) continue;
        long long stamp = next;
        next = (now / interval + 1) * interval;
        if (__atomic_load_n(connected, __ATOMIC_RELAXED) < total) continue;
        char msg[40];
        int len;
        if (ws) {
            len = snprintf(msg + 2, sizeof msg - 2, "%lld", stamp);
            msg[0] = (char)0x81; /* FIN, text */
            msg[1] = (char)len;  /* unmasked, < 126 bytes */
            len += 2;
        } else {
            len = snprintf(msg, sizeof msg, "%lld\n", stamp);
        }
        long long started = clock_ms(CLOCK_MONOTONIC), reached = 0;
        for (int fd = 0; fd < MAX_FD; fd++) {
            if (state[fd] != 2) continue;
            if (write(fd, msg, len) == len) sent++, reached++; else dropped++;
        }
        fprintf(stderr, "pid=%d stamp=%lld reached=%lld fanout_ms=%lld sent=%lld dropped=%lld\n",
                getpid(), stamp, reached, clock_ms(CLOCK_MONOTONIC) - started, sent, dropped);
    }
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--ws")) ws = 1;
        else if (!strcmp(argv[i], "--shared")) shared_listener = 1;
        else if (!strcmp(argv[i], "--procs") && i + 1 < argc) procs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--total") && i + 1 < argc) total = atoll(argv[++i]);
        else break;
    }
    if (argc - i != 2 || procs < 1 || procs > 1000) {
        fprintf(stderr, "usage: %s [--ws] [--procs N] [--shared] [--total N] PORT INTERVAL_MS\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[i]);
    interval = atoll(argv[i + 1]);
    if (port <= 0 || port > 65535 || interval <= 0) {
        fprintf(stderr, "bad PORT or INTERVAL_MS\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    connected = mmap(NULL, sizeof *connected, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (connected == MAP_FAILED) { perror("mmap"); return 1; }
    /* Every listener exists before the first fork, so "listening" means it. */
    int *listeners = calloc(procs, sizeof *listeners);
    for (int p = 0; p < procs; p++)
        listeners[p] = shared_listener && p > 0 ? listeners[0] : listen_on(port, procs > 1 && !shared_listener);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    if (procs == 1) {
        printf("listening on 127.0.0.1:%d\n", port);
        fflush(stdout);
        serve(listeners[0]);
        return 0;
    }
    pid_t *children = calloc(procs, sizeof *children);
    for (int p = 0; p < procs; p++) {
        children[p] = fork();
        if (children[p] == 0) {
            for (int q = 0; q < procs; q++)
                if (listeners[q] != listeners[p]) close(listeners[q]);
            serve(listeners[p]);
            return 0;
        }
    }
    printf("listening on 127.0.0.1:%d\n", port);
    fflush(stdout);
    while (!stop) pause();
    for (int p = 0; p < procs; p++) kill(children[p], SIGTERM);
    while (wait(NULL) > 0) {}
    return 0;
}
