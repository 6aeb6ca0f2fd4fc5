/*
 * The raw-TCP baseline of bench/compare: the seed's push (the time in ms, to every
 * connection, every interval) with no WebSocket at all. One thread, one epoll set,
 * one write(2) per connection per push: what the kernel's TCP path costs on its own,
 * so every WebSocket server's figures can be read as a ratio to this limit.
 *
 * Usage: rawtcp-server PORT INTERVAL_MS   (prints "listening on 127.0.0.1:PORT")
 * Messages are newline-terminated ("1764110000000\n"); `c1m bench --url tcp://...`
 * reads them. Stops on SIGINT/SIGTERM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static long long mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PORT INTERVAL_MS\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    long long interval = atoll(argv[2]);
    if (port <= 0 || port > 65535 || interval <= 0) {
        fprintf(stderr, "bad PORT or INTERVAL_MS\n");
        return 2;
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);

    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 65535)) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = -1};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);

    /* open[fd] says whether fd is a client connection; fds are small integers. */
    int cap = 1 << 20;
    char *open = calloc(cap, 1);
    int max_fd = 0, clients = 0;
    long long sent = 0, dropped = 0;
    printf("listening on 127.0.0.1:%d\n", port);
    fflush(stdout);

    struct epoll_event events[256];
    long long next = mono_ms() + interval;
    while (!stop) {
        long long wait = next - mono_ms();
        int n = epoll_wait(ep, events, 256, wait < 0 ? 0 : (int)wait);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == -1) {
                for (;;) {
                    int c = accept4(listener, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    if (c >= cap) { close(c); continue; }
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                    open[c] = 1;
                    clients++;
                    if (c > max_fd) max_fd = c;
                }
                continue;
            }
            /* Input is ignored; EOF or an error ends the connection. */
            char buf[512];
            ssize_t r = read(fd, buf, sizeof buf);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                open[fd] = 0;
                clients--;
            }
        }
        if (mono_ms() >= next) {
            next += interval;
            char msg[32];
            int len = snprintf(msg, sizeof msg, "%lld\n", now_ms());
            for (int fd = 0; fd <= max_fd; fd++) {
                if (!open[fd]) continue;
                if (write(fd, msg, len) == len) sent++; else dropped++;
            }
            fprintf(stderr, "clients=%d sent=%lld dropped=%lld\n", clients, sent, dropped);
        }
    }
    return 0;
}
