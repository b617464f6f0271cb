/*
 * mpbench: the fast backend and load generators of miniproxy's benchmarks.
 *
 * One epoll loop per process, non-blocking sockets, no threads.  Built by
 * benchmarks/native.py with the system C compiler.
 *
 *   mpbench server PORT GREET REQUEST REPLY
 *       Listen on 127.0.0.1:PORT.  On accept, send GREET bytes.  Once
 *       REQUEST bytes have arrived (REQUEST > 0), send REPLY bytes and
 *       close.  Close on EOF or error.  Prints "ready PORT" once listening.
 *
 *   mpbench burst HOST PORT N TIMEOUT_MS
 *       Start N connects at once; per connection print
 *       "conn INDEX CONNECT_US FIRSTBYTE_US STATUS" (times from that
 *       connection's connect(2); STATUS ok, refused, reset, closed,
 *       timeout, error), then "done".
 *
 *   mpbench flows HOST PORT CONCURRENCY DURATION_MS REQUEST REPLY TIMEOUT_MS
 *       CONCURRENCY clients, each in a loop: connect, send REQUEST bytes,
 *       read REPLY bytes and the server's EOF, close.  Prints one JSON
 *       object: flows, errors by kind, elapsed seconds, flow latency.
 *
 *   mpbench hold HOST PORT N TIMEOUT_MS
 *       Open N connections (at most 64 connecting at once), each waiting for
 *       one byte from the far end; print "held OK FAILED", then keep them
 *       open until stdin closes, then close them all and print "released".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t nowUs(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void raiseNoFile(void) {
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
        r.rlim_cur = r.rlim_max;
        setrlimit(RLIMIT_NOFILE, &r);
    }
}

static struct sockaddr_in addressOf(const char *host, int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        exit(2);
    }
    return a;
}

static char payload[1 << 16];

/* ---------------------------------------------------------------- server */

struct serverConn {
    long got;
};

static int runServer(int port, long greet, long request, long reply) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (ls < 0) die("socket");
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = addressOf("127.0.0.1", port);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    socklen_t alen = sizeof a;
    getsockname(ls, (struct sockaddr *)&a, &alen);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    int maxFds = 1 << 20;
    struct serverConn *conns = calloc((size_t)maxFds, sizeof *conns);
    if (!conns) die("calloc");
    printf("ready %d\n", ntohs(a.sin_port));
    fflush(stdout);
    struct epoll_event events[512];
    char buf[1 << 16];
    for (;;) {
        int n = epoll_wait(ep, events, 512, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    if (c >= maxFds) {
                        close(c);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conns[c].got = 0;
                    if (greet > 0 && send(c, payload, (size_t)greet, MSG_NOSIGNAL) < 0) {
                        close(c);
                        continue;
                    }
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            int closeIt = 0;
            for (;;) {
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                if (r > 0) {
                    conns[fd].got += r;
                    if (request > 0 && conns[fd].got >= request) {
                        long left = reply;
                        while (left > 0) {
                            ssize_t w = send(fd, payload,
                                             (size_t)(left > (long)sizeof payload ? (long)sizeof payload : left),
                                             MSG_NOSIGNAL);
                            if (w <= 0) break;
                            left -= w;
                        }
                        closeIt = 1;
                        break;
                    }
                    continue;
                }
                if (r == 0) closeIt = 1;
                else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) closeIt = 1;
                break;
            }
            if (closeIt) close(fd); /* closing removes it from the epoll set */
        }
    }
    return 0;
}

/* ----------------------------------------------------------------- burst */

static const char *errnoStatus(int e) {
    switch (e) {
    case ECONNREFUSED: return "refused";
    case ECONNRESET: return "reset";
    case ETIMEDOUT: return "timeout";
    default: return "error";
    }
}

struct burstConn {
    int fd;
    uint64_t start, connected, firstByte;
    const char *status;
};

/*
 * Handle what epoll reports for the burst's connections, waiting at most
 * waitMs; returns how many connections ended.
 */
static int burstEvents(int ep, struct burstConn *c, int waitMs) {
    struct epoll_event events[512];
    char buf[4096];
    int ended = 0;
    int k = epoll_wait(ep, events, 512, waitMs);
    if (k < 0) {
        if (errno == EINTR) return 0;
        die("epoll_wait");
    }
    uint64_t t = nowUs();
    for (int j = 0; j < k; j++) {
        struct burstConn *b = &c[events[j].data.u32];
        if (b->fd < 0) continue;
        if (!b->connected) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(b->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                b->status = errnoStatus(err);
                close(b->fd);
                b->fd = -1;
                ended++;
                continue;
            }
            if (!(events[j].events & EPOLLOUT)) continue;
            b->connected = t;
            struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = events[j].data.u32};
            epoll_ctl(ep, EPOLL_CTL_MOD, b->fd, &ev);
        }
        if (events[j].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
            ssize_t r = recv(b->fd, buf, sizeof buf, 0);
            if (r > 0) {
                b->firstByte = t;
                b->status = "ok";
            } else if (r == 0) {
                b->status = "closed";
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                continue;
            } else {
                b->status = errnoStatus(errno);
            }
            close(b->fd);
            b->fd = -1;
            ended++;
        }
    }
    return ended;
}

static int runBurst(const char *host, int port, int n, long timeoutMs, int yield) {
    struct sockaddr_in a = addressOf(host, port);
    struct burstConn *c = calloc((size_t)n, sizeof *c);
    int ep = epoll_create1(0);
    int open = 0;
    for (int i = 0; i < n; i++) {
        c[i].fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (c[i].fd < 0) die("socket");
    }
    /*
     * All connects back to back: the simultaneous attempts.  What has
     * happened is collected between two connects without waiting, so that
     * a connection's times are not those of issuing the later connects.
     */
    for (int i = 0; i < n; i++) {
        c[i].start = nowUs();
        if (connect(c[i].fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
            c[i].status = errnoStatus(errno);
            close(c[i].fd);
            c[i].fd = -1;
            continue;
        }
        /* Watched once connecting: an unconnected socket reports a hang-up. */
        struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
        open++;
        open -= burstEvents(ep, c, 0);
        if (yield) sched_yield();
    }
    uint64_t spread = nowUs() - c[0].start;
    uint64_t deadline = nowUs() + (uint64_t)timeoutMs * 1000u;
    while (open > 0) {
        uint64_t now = nowUs();
        if (now >= deadline) break;
        open -= burstEvents(ep, c, (int)((deadline - now) / 1000u) + 1);
    }
    for (int i = 0; i < n; i++) {
        if (c[i].fd >= 0) {
            c[i].status = "timeout";
            close(c[i].fd);
        }
        printf("conn %d %lld %lld %s\n", i,
               c[i].connected ? (long long)(c[i].connected - c[i].start) : -1LL,
               c[i].firstByte ? (long long)(c[i].firstByte - c[i].start) : -1LL,
               c[i].status ? c[i].status : "error");
    }
    printf("spread %llu\n", (unsigned long long)spread);
    printf("done\n");
    return 0;
}

/* ----------------------------------------------------------------- flows */

enum { CONNECTING, READING };

struct flowSlot {
    int fd;
    int state;
    long got;
    uint64_t start;
};

#define HIST_BUCKETS 100000 /* 10 us buckets up to 1 s */
static uint32_t hist[HIST_BUCKETS + 1];

static int startFlow(int ep, struct flowSlot *s, uint32_t index, struct sockaddr_in *a) {
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s->fd < 0) return -1;
    s->state = CONNECTING;
    s->got = 0;
    s->start = nowUs();
    if (connect(s->fd, (struct sockaddr *)a, sizeof *a) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u32 = index};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
    return 0;
}

static int runFlows(const char *host, int port, int conc, long durationMs, long request,
                    long reply, long timeoutMs) {
    struct sockaddr_in a = addressOf(host, port);
    struct flowSlot *slots = calloc((size_t)conc, sizeof *slots);
    int ep = epoll_create1(0);
    long flows = 0, errConnect = 0, errReset = 0, errShort = 0, errTimeout = 0, errOther = 0;
    uint64_t begin = nowUs();
    uint64_t end = begin + (uint64_t)durationMs * 1000u;
    for (int i = 0; i < conc; i++) {
        if (startFlow(ep, &slots[i], (uint32_t)i, &a) < 0) errConnect++;
    }
    struct epoll_event events[512];
    char buf[1 << 16];
    double latencySum = 0;
    int active = conc;
    uint64_t lastTimeoutScan = begin;
    while (active > 0) {
        uint64_t now = nowUs();
        if (now >= end + (uint64_t)timeoutMs * 1000u) break;
        int k = epoll_wait(ep, events, 512, 10);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        now = nowUs();
        for (int j = 0; j < k; j++) {
            uint32_t idx = events[j].data.u32;
            struct flowSlot *s = &slots[idx];
            if (s->fd < 0) continue;
            int finished = 0, failed = 0;
            if (s->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    if (err == ECONNRESET) errReset++;
                    else errConnect++;
                    failed = 1;
                } else {
                    if (send(s->fd, payload, (size_t)request, MSG_NOSIGNAL) != request) {
                        errOther++;
                        failed = 1;
                    } else {
                        s->state = READING;
                        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = idx};
                        epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                    }
                }
            } else {
                for (;;) {
                    ssize_t r = recv(s->fd, buf, sizeof buf, 0);
                    if (r > 0) {
                        s->got += r;
                        continue;
                    }
                    if (r == 0) {
                        if (s->got >= reply) finished = 1;
                        else {
                            errShort++;
                            failed = 1;
                        }
                    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                        if (errno == ECONNRESET) errReset++;
                        else errOther++;
                        failed = 1;
                    }
                    break;
                }
            }
            if (finished || failed) {
                close(s->fd);
                s->fd = -1;
                if (finished) {
                    flows++;
                    uint64_t lat = now - s->start;
                    latencySum += (double)lat;
                    uint64_t b = lat / 10u;
                    hist[b > HIST_BUCKETS ? HIST_BUCKETS : b]++;
                }
                if (now < end) {
                    if (startFlow(ep, s, idx, &a) < 0) {
                        errConnect++;
                        active--;
                    }
                } else {
                    active--;
                }
            }
        }
        /* Bound every flow's time. */
        now = nowUs();
        if (now - lastTimeoutScan > 50000u) {
            lastTimeoutScan = now;
            for (int i = 0; i < conc; i++) {
                struct flowSlot *s = &slots[i];
                if (s->fd >= 0 && now > s->start && now - s->start > (uint64_t)timeoutMs * 1000u) {
                    close(s->fd);
                    s->fd = -1;
                    errTimeout++;
                    if (now < end && startFlow(ep, s, (uint32_t)i, &a) == 0) continue;
                    active--;
                }
            }
        }
    }
    uint64_t stop = nowUs();
    for (int i = 0; i < conc; i++) {
        if (slots[i].fd >= 0) {
            close(slots[i].fd);
            errTimeout++;
        }
    }
    /* The rate counts flows finished within the duration window. */
    long p50 = -1, p99 = -1;
    long seen = 0;
    for (int b = 0; b <= HIST_BUCKETS && flows > 0; b++) {
        seen += hist[b];
        if (p50 < 0 && seen * 2 >= flows) p50 = b * 10L;
        if (p99 < 0 && seen * 100 >= flows * 99) {
            p99 = b * 10L;
            break;
        }
    }
    printf("{\"flows\": %ld, \"elapsed\": %.6f, \"duration\": %.6f, "
           "\"errors\": {\"connect\": %ld, \"reset\": %ld, \"short\": %ld, \"timeout\": %ld, "
           "\"other\": %ld}, \"latencyMeanUs\": %.1f, \"latencyP50Us\": %ld, "
           "\"latencyP99Us\": %ld}\n",
           flows, (double)(stop - begin) / 1e6, (double)durationMs / 1e3, errConnect, errReset,
           errShort, errTimeout, errOther, flows ? latencySum / (double)flows : 0.0, p50, p99);
    return 0;
}

/* ------------------------------------------------------------------ hold */

static int runHold(const char *host, int port, int n, long timeoutMs) {
    struct sockaddr_in a = addressOf(host, port);
    int *fds = calloc((size_t)n, sizeof *fds);
    char *done = calloc((size_t)n, 1);
    int ep = epoll_create1(0);
    int next = 0, pending = 0, ok = 0, failed = 0;
    uint64_t deadline = nowUs() + (uint64_t)timeoutMs * 1000u;
    struct epoll_event events[256];
    char buf[256];
    while ((next < n || pending > 0) && nowUs() < deadline) {
        while (next < n && pending < 64) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (fd < 0) die("socket");
            fds[next] = fd;
            if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
                failed++;
                done[next] = 1;
                next++;
                continue;
            }
            struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)next};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            next++;
            pending++;
        }
        int k = epoll_wait(ep, events, 256, 10);
        for (int j = 0; j < k; j++) {
            uint32_t i = events[j].data.u32;
            if (done[i]) continue;
            ssize_t r = recv(fds[i], buf, sizeof buf, 0);
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;
            done[i] = 1;
            pending--;
            epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
            if (r > 0) ok++;
            else failed++;
        }
    }
    failed += (n - ok - failed);
    printf("held %d %d\n", ok, failed);
    fflush(stdout);
    while (read(0, buf, sizeof buf) > 0) {
    }
    for (int i = 0; i < next; i++) close(fds[i]);
    printf("released\n");
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    raiseNoFile();
    memset(payload, 'x', sizeof payload);
    if (argc >= 6 && strcmp(argv[1], "server") == 0) {
        return runServer(atoi(argv[2]), atol(argv[3]), atol(argv[4]), atol(argv[5]));
    }
    if (argc >= 6 && strcmp(argv[1], "burst") == 0) {
        return runBurst(argv[2], atoi(argv[3]), atoi(argv[4]), atol(argv[5]),
                        argc >= 7 ? atoi(argv[6]) : 0);
    }
    if (argc >= 9 && strcmp(argv[1], "flows") == 0) {
        return runFlows(argv[2], atoi(argv[3]), atoi(argv[4]), atol(argv[5]), atol(argv[6]),
                        atol(argv[7]), atol(argv[8]));
    }
    if (argc >= 6 && strcmp(argv[1], "hold") == 0) {
        return runHold(argv[2], atoi(argv[3]), atoi(argv[4]), atol(argv[5]));
    }
    fprintf(stderr,
            "usage: mpbench server PORT GREET REQUEST REPLY\n"
            "       mpbench burst HOST PORT N TIMEOUT_MS\n"
            "       mpbench flows HOST PORT CONCURRENCY DURATION_MS REQUEST REPLY TIMEOUT_MS\n"
            "       mpbench hold HOST PORT N TIMEOUT_MS\n");
    return 2;
}
