/*
 * loadgen.c - load generator for the Foo line protocol (benchmark instrument).
 *
 * Single-threaded, epoll-based, Linux only.  The point of writing it in C
 * with one event loop is that it costs far less CPU per message than the
 * Python proxy it measures, so that the proxy (or HAProxy, for comparison)
 * is the bottleneck and not this tool.  It reports its own CPU share
 * (self_cpu) in every result so that claim can be checked run by run.
 *
 * Each connection sends "REQ <seq> <data>\n" with seq = 1, 2, 3, ... and
 * expects, in order, one "ACK <seq> ..." or "NAK <seq> ..." reply per REQ.
 *
 *   serial : one request in flight per connection (a window of 1): the next
 *            REQ is written as soon as the previous reply has been read.
 *   pipe   : a sliding window of W requests in flight per connection; after
 *            every read, all free window slots are refilled with ONE write.
 *
 * Latency (CLOCK_MONOTONIC, from the write that carried a REQ to the read
 * that returned its reply) is recorded for every reply in the measured
 * window, into a bounded log-linear histogram (< 1% relative error), in
 * both modes; in pipe mode it therefore includes time queued in the window.
 *
 * Usage:
 *   loadgen -addr HOST:PORT [-mode serial|pipe] [-c N] [-w W] [-d SECONDS]
 *           [-warmup SECONDS] [-cpu NAME=PID]... [-idle N] [-idleping 0|1]
 *           [-data TOKEN]
 *   -d / -warmup take seconds as a float ("2", "0.5", "2s", "500ms").
 *   -idle N opens N extra connections first and holds them (for memory
 *   measurements); each gets one REQ 1 and its reply first unless
 *   -idleping 0.  With -c 0 there is no warm-up and it just holds them
 *   for -d seconds.  "loadgen: READY idle=N" goes to stderr once they are
 *   all open.
 *
 * Output: exactly one line on stdout, diagnostics on stderr:
 *   RESULT mode= c= w= idle= secs=   (w=1 in serial mode)
 *     msgs=      REQs sent + replies received in the window
 *     rate=      msgs per second; req_rate= REQs per second
 *     replies= naks= polls=   (polls: epoll_wait calls that returned events)
 *     p50_us= p99_us= p999_us= max_us=   latency in microseconds
 *     errors=    bad replies + lost connections over the whole run
 *     self_cpu=  our user+sys CPU seconds / window seconds (1.0 = a core)
 *     self_cpu_per_M=  our CPU seconds per million msgs
 *     lg_cpus= lg_cpus_busy=  the CPUs we may run on and their busy share,
 *                softirq and other processes included (see aff_ticks)
 *     NAME_cpu= NAME_cpu_per_M=  the same two figures for each -cpu target
 *   A ratio that cannot be computed prints as "na".
 * Exit status 0 only if there were no errors and at least one reply.
 *
 * Build: cc -O2 -Wall -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
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
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define RBUF_SIZE 65536          /* a reply line longer than this is an error */
#define DATA_MAX 256             /* max length of the REQ data token */
#define REQ_MAX (4 + 20 + 1 + DATA_MAX + 1)  /* "REQ " seq " " data "\n" */
#define MAX_CPU 16               /* max number of -cpu NAME=PID options */
#define MAX_EVENTS 512
#define CONNECT_TIMEOUT_MS 10000 /* generous: SYN retries if a backlog overflows */
#define IDLE_PING_TIMEOUT_MS 10000
#define MAX_ERR_MSGS 10          /* print at most this many error details */

/* ------------------------------------------------------------------ */
/* Options                                                             */

static struct sockaddr_in opt_addr;
static const char *opt_addr_str = "127.0.0.1:9201";
static int opt_serial = 1;
static long opt_conns = 1;
static long opt_window = 100;
static double opt_dur = 5.0;
static double opt_warmup = 0.5;
static long opt_idle = 0;
static int opt_idle_ping = 1;
static const char *opt_data = "abcdefghij";
static size_t opt_data_len;

struct cpu_target {
    char name[64];
    int pid;
};
static struct cpu_target cpu_targets[MAX_CPU];
static int n_cpu_targets;

/* ------------------------------------------------------------------ */
/* Counters                                                            */

/* Totals since start; the measured window is the difference of two
 * snapshots, so the hot path only increments plain counters. */
struct counters {
    uint64_t reqs;      /* REQs generated (queued for the socket)          */
    uint64_t replies;   /* reply lines received                            */
    uint64_t naks;      /* of which NAK                                    */
    uint64_t bad;       /* malformed / unexpected replies                  */
    uint64_t connerr;   /* connections lost (EOF, reset, ...)              */
    uint64_t polls;     /* epoll_wait calls that returned events: msgs per */
                        /* poll shows how well our syscalls are amortised  */
};
static struct counters cnt;
static uint64_t err_msgs_printed;

static void report_error(const char *what, long conn, int64_t seq)
{
    if (err_msgs_printed++ < MAX_ERR_MSGS)
        fprintf(stderr, "loadgen: conn %ld seq %" PRId64 ": %s\n", conn, seq, what);
}

/* ------------------------------------------------------------------ */
/* Latency histogram: log-linear, 128 linear sub-buckets per power of  */
/* two, so every value is kept with < 1% relative error in a fixed     */
/* 58 KiB table, however long the run.                                 */

#define SUB_BITS 7
#define SUB (1 << SUB_BITS)
#define HIST_BUCKETS (SUB + (64 - SUB_BITS) * SUB)

static uint64_t hist[HIST_BUCKETS];
static uint64_t hist_n, hist_max;
static int measuring;   /* 1 only inside the measured window */

static int hist_index(uint64_t v)
{
    if (v < SUB)
        return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - SUB_BITS;
    return SUB + shift * SUB + (int)((v >> shift) - SUB);
}

/* Midpoint of a bucket's value range, the best single estimate. */
static double hist_value(int idx)
{
    if (idx < SUB)
        return idx;
    int shift = (idx - SUB) / SUB;
    uint64_t sub = (uint64_t)((idx - SUB) % SUB + SUB);
    uint64_t lo = sub << shift, hi = lo + ((1ULL << shift) - 1);
    return (lo + (double)hi) / 2;
}

static void hist_add(uint64_t ns)
{
    hist[hist_index(ns)]++;
    hist_n++;
    if (ns > hist_max)
        hist_max = ns;
}

/* Value (ns) at quantile q, by nearest rank. */
static double hist_quantile(double q)
{
    if (hist_n == 0)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)hist_n + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen >= rank)
            return hist_value(i);
    }
    return (double)hist_max;
}

/* ------------------------------------------------------------------ */
/* Time and CPU                                                        */

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Our own user+system CPU seconds (getrusage is far finer than ticks). */
static double self_cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* utime+stime+cutime+cstime (fields 14-17 of /proc/PID/stat) in seconds,
 * or -1 if the process is gone.  The process counts all its threads;
 * cutime/cstime only cover children it has already waited for. */
static double pid_cpu_seconds(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    /* The command name (field 2) may contain spaces and ')', so count the
     * fields from the last ')'. */
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    p++;
    long long v[4] = {0, 0, 0, 0};
    for (int field = 3; field <= 17; field++) {
        char *end;
        while (*p == ' ')
            p++;
        long long x = strtoll(p, &end, 10);
        if (end == p && field >= 14)
            return -1;
        if (field >= 14)
            v[field - 14] = x;
        /* field 3 (state) is a letter: skip whatever token is there */
        while (*p && *p != ' ')
            p++;
    }
    return (double)(v[0] + v[1] + v[2] + v[3]) / (double)sysconf(_SC_CLK_TCK);
}

/* Busy fraction of the CPUs this process may run on.  self_cpu alone
 * can hide a saturated core: time spent in softirq (where loopback TCP
 * delivery mostly runs) is accounted to no process, and a stub pinned to
 * the same core competes for it.  If these CPUs still have idle time, the
 * instruments were not what limited the run. */
static cpu_set_t aff_mask;
static int aff_ok;

/* Sum of busy and total ticks over the CPUs in aff_mask, from /proc/stat. */
static void aff_ticks(unsigned long long *busy, unsigned long long *total)
{
    *busy = *total = 0;
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        int cpu;
        unsigned long long v[8] = {0};   /* user nice system idle iowait irq softirq steal */
        if (strncmp(line, "cpu", 3) != 0 || line[3] < '0' || line[3] > '9')
            continue;
        if (sscanf(line + 3, "%d %llu %llu %llu %llu %llu %llu %llu %llu", &cpu, &v[0], &v[1],
                   &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) < 9)
            continue;
        if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &aff_mask))
            continue;
        /* Steal counts as busy: the CPU was not available to us. */
        unsigned long long b = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        *busy += b;
        *total += b + v[3] + v[4];
    }
    fclose(f);
}

/* Affinity mask as a comma list, e.g. "0" or "0,1". */
static void print_aff_list(void)
{
    int first = 1;
    for (int i = 0; i < CPU_SETSIZE; i++)
        if (CPU_ISSET(i, &aff_mask)) {
            printf("%s%d", first ? "" : ",", i);
            first = 0;
        }
}

/* ------------------------------------------------------------------ */
/* Connections                                                         */

struct conn {
    long id;
    int fd;
    int alive;
    int want_out;        /* EPOLLOUT armed because the socket was full     */
    int64_t next_send;   /* seq of the next REQ to generate                */
    int64_t next_recv;   /* seq expected in the next reply                 */
    long inflight;       /* REQs generated whose reply has not arrived     */
    char *rbuf;          /* unparsed received bytes (a partial line)       */
    size_t rlen;
    char *wbuf;          /* generated bytes the kernel has not taken yet;  */
    size_t wlen, woff;   /* bounded, since it only holds in-flight REQs    */
    int64_t *sent_ns;    /* send time of each in-flight REQ, seq % window  */
};

static int epfd = -1;
static long window;      /* effective window: 1 in serial mode */
static long alive_conns;

static void conn_fail(struct conn *c, const char *why)
{
    report_error(why, c->id, c->next_recv);
    cnt.connerr++;
    close(c->fd);   /* also removes it from the epoll set */
    c->alive = 0;
    alive_conns--;
}

static void set_out_interest(struct conn *c, int want)
{
    if (c->want_out == want)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want;
}

/* Hand pending bytes to the kernel; arm EPOLLOUT only if it is full. */
static void conn_flush(struct conn *c)
{
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n > 0) {
            c->woff += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_out_interest(c, 1);
            return;
        } else {
            conn_fail(c, n < 0 ? strerror(errno) : "send returned 0");
            return;
        }
    }
    c->woff = c->wlen = 0;
    set_out_interest(c, 0);
}

/* Fill every free window slot with a REQ, all in a single write. */
static void conn_refill(struct conn *c)
{
    long room = window - c->inflight;
    if (room <= 0)
        return;
    if (c->woff > 0) {   /* compact so the buffer bound below holds */
        memmove(c->wbuf, c->wbuf + c->woff, c->wlen - c->woff);
        c->wlen -= c->woff;
        c->woff = 0;
    }
    int64_t now = mono_ns();
    char *p = c->wbuf + c->wlen;
    for (long i = 0; i < room; i++) {
        int64_t seq = c->next_send++;
        memcpy(p, "REQ ", 4);
        p = put_i64(p + 4, seq);
        *p++ = ' ';
        memcpy(p, opt_data, opt_data_len);
        p += opt_data_len;
        *p++ = '\n';
        c->sent_ns[(uint64_t)seq % (uint64_t)window] = now;
    }
    c->wlen = (size_t)(p - c->wbuf);
    c->inflight += room;
    cnt.reqs += (uint64_t)room;
    conn_flush(c);
}

/* Check one reply line (without its '\n') against the expected seq. */
static void conn_reply(struct conn *c, const char *line, size_t len, int64_t now)
{
    if (c->inflight == 0) {
        cnt.bad++;
        report_error("reply with no request outstanding", c->id, c->next_recv);
        return;
    }
    int64_t seq = c->next_recv++;
    c->inflight--;
    cnt.replies++;
    if (measuring)
        hist_add((uint64_t)(now - c->sent_ns[(uint64_t)seq % (uint64_t)window]));

    if (len > 0 && line[len - 1] == '\r')
        len--;
    int nak;
    if (len >= 6 && memcmp(line, "ACK ", 4) == 0)
        nak = 0;
    else if (len >= 6 && memcmp(line, "NAK ", 4) == 0)
        nak = 1;
    else
        goto bad;
    /* Parse the seq digits and compare numerically; must be followed by a
     * space (data) or the end of the line. */
    size_t i = 4;
    uint64_t v = 0;
    if (line[i] < '0' || line[i] > '9')
        goto bad;
    while (i < len && line[i] >= '0' && line[i] <= '9' && i < 4 + 19)
        v = v * 10 + (uint64_t)(line[i++] - '0');
    if (i < len && line[i] != ' ')
        goto bad;
    if (v != (uint64_t)seq)
        goto bad;
    cnt.naks += (uint64_t)nak;
    return;
bad:
    cnt.bad++;
    report_error("unexpected reply (wrong type or seq)", c->id, seq);
}

static void conn_readable(struct conn *c)
{
    ssize_t n = read(c->fd, c->rbuf + c->rlen, RBUF_SIZE - c->rlen);
    if (n == 0) {
        conn_fail(c, "EOF from server");
        return;
    }
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            conn_fail(c, strerror(errno));
        return;
    }
    /* One timestamp per read: all replies in it arrived together. */
    int64_t now = mono_ns();
    c->rlen += (size_t)n;
    char *p = c->rbuf, *end = c->rbuf + c->rlen, *nl;
    while ((nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        conn_reply(c, p, (size_t)(nl - p), now);
        p = nl + 1;
    }
    size_t left = (size_t)(end - p);
    if (left == RBUF_SIZE) {
        conn_fail(c, "reply line longer than 64 KiB");
        return;
    }
    if (left && p != c->rbuf)
        memmove(c->rbuf, p, left);
    c->rlen = left;
    conn_refill(c);
}

/* Non-blocking connect with a timeout; returns a non-blocking fd or -1. */
static int connect_to(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("loadgen: socket");
        return -1;
    }
    set_nodelay(fd);
    if (connect(fd, (struct sockaddr *)&opt_addr, sizeof opt_addr) < 0) {
        if (errno != EINPROGRESS) {
            fprintf(stderr, "loadgen: connect %s: %s\n", opt_addr_str, strerror(errno));
            close(fd);
            return -1;
        }
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        int r = poll(&pfd, 1, CONNECT_TIMEOUT_MS);
        int err = 0;
        socklen_t el = sizeof err;
        if (r <= 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err) {
            fprintf(stderr, "loadgen: connect %s: %s\n", opt_addr_str,
                    r == 0 ? "timed out" : strerror(err ? err : errno));
            close(fd);
            return -1;
        }
    }
    return fd;
}

/* ------------------------------------------------------------------ */
/* Idle connections (for memory measurements)                          */

struct idle {
    int fd;
    int done;       /* reply line complete */
    int hlen;
    char head[8];   /* first bytes of the reply: "ACK 1 " or "NAK 1 " */
};
static struct idle *idles;

/* Open opt_idle connections; unless -idleping 0, send each one REQ and
 * wait for its reply, so that a proxy which connects upstream lazily has
 * set up both sides of every idle connection before memory is measured. */
static int open_idle(void)
{
    idles = calloc((size_t)opt_idle, sizeof *idles);
    if (!idles)
        return -1;
    for (long i = 0; i < opt_idle; i++) {
        idles[i].fd = connect_to();
        if (idles[i].fd < 0) {
            fprintf(stderr, "loadgen: idle connection %ld of %ld failed\n", i, opt_idle);
            return -1;
        }
    }
    if (!opt_idle_ping)
        return 0;

    char req[REQ_MAX], *p = req;
    memcpy(p, "REQ 1 ", 6);
    p += 6;
    memcpy(p, opt_data, opt_data_len);
    p += opt_data_len;
    *p++ = '\n';
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (long i = 0; i < opt_idle; i++) {
        /* A fresh socket's send buffer always takes a few bytes. */
        if (send(idles[i].fd, req, (size_t)(p - req), MSG_NOSIGNAL) != p - req) {
            report_error("idle: send failed", -1 - i, 1);
            cnt.connerr++;
            idles[i].done = 1;
            continue;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, idles[i].fd, &ev);
    }
    cnt.reqs += (uint64_t)opt_idle;

    long pending = opt_idle;
    for (long i = 0; i < opt_idle; i++)
        pending -= idles[i].done;
    int64_t deadline = mono_ns() + (int64_t)IDLE_PING_TIMEOUT_MS * 1000000;
    struct epoll_event evs[MAX_EVENTS];
    char buf[4096];
    while (pending > 0) {
        int64_t left = deadline - mono_ns();
        if (left <= 0)
            break;
        int n = epoll_wait(ep, evs, MAX_EVENTS, (int)(left / 1000000) + 1);
        for (int k = 0; k < n; k++) {
            struct idle *d = &idles[evs[k].data.u64];
            ssize_t r = read(d->fd, buf, sizeof buf);
            if (r <= 0 && !(r < 0 && (errno == EAGAIN || errno == EINTR))) {
                report_error(r == 0 ? "idle: EOF before reply" : "idle: read error",
                             -1 - (long)evs[k].data.u64, 1);
                cnt.connerr++;
            } else if (r > 0) {
                for (ssize_t j = 0; j < r && d->hlen < (int)sizeof d->head; j++)
                    d->head[d->hlen++] = buf[j];
                if (!memchr(buf, '\n', (size_t)r))
                    continue;
                cnt.replies++;
                if (d->hlen < 6 || (memcmp(d->head, "ACK 1", 5) && memcmp(d->head, "NAK 1", 5)) ||
                    (d->head[5] != ' ' && d->head[5] != '\n' && d->head[5] != '\r')) {
                    cnt.bad++;
                    report_error("idle: unexpected reply", -1 - (long)evs[k].data.u64, 1);
                }
            } else {
                continue;
            }
            d->done = 1;
            pending--;
            epoll_ctl(ep, EPOLL_CTL_DEL, d->fd, NULL);
        }
    }
    close(ep);
    if (pending > 0) {
        fprintf(stderr, "loadgen: %ld idle connections got no reply in %d ms\n",
                pending, IDLE_PING_TIMEOUT_MS);
        cnt.connerr += (uint64_t)pending;
    }
    return 0;
}

/* At the end: an idle connection that reads EOF was closed by the peer. */
static void check_idle(void)
{
    char b;
    for (long i = 0; i < opt_idle; i++) {
        ssize_t r = recv(idles[i].fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
            report_error("idle connection lost", -1 - i, 0);
            cnt.connerr++;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Command line                                                        */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen -addr HOST:PORT [-mode serial|pipe] [-c N] [-w W]\n"
            "               [-d SECONDS] [-warmup SECONDS] [-cpu NAME=PID]...\n"
            "               [-idle N] [-idleping 0|1] [-data TOKEN]\n");
    exit(2);
}

static long parse_long(const char *opt, const char *s, long min)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < min) {
        fprintf(stderr, "loadgen: bad value for %s: %s\n", opt, s);
        exit(2);
    }
    return v;
}

/* Seconds as a float; a trailing "s" or "ms" is accepted for convenience. */
static double parse_secs(const char *opt, const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || v < 0)
        goto bad;
    if (strcmp(end, "ms") == 0)
        v /= 1000;
    else if (*end && strcmp(end, "s") != 0)
        goto bad;
    return v;
bad:
    fprintf(stderr, "loadgen: bad duration for %s: %s\n", opt, s);
    exit(2);
}

static void parse_addr(const char *s)
{
    if (parse_ipv4_addr(s, &opt_addr) < 0) {
        fprintf(stderr, "loadgen: -addr wants IPv4 HOST:PORT, got %s\n", s);
        exit(2);
    }
    opt_addr_str = s;
}

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        /* Accept -opt VALUE, --opt VALUE and -opt=VALUE (Go flag style). */
        char name[32];
        const char *a = argv[i], *val = NULL;
        if (a[0] != '-')
            usage();
        a += (a[1] == '-') ? 2 : 1;
        const char *eq = strchr(a, '=');
        size_t nl = eq ? (size_t)(eq - a) : strlen(a);
        if (nl >= sizeof name)
            usage();
        memcpy(name, a, nl);
        name[nl] = 0;
        if (strcmp(name, "h") == 0 || strcmp(name, "help") == 0)
            usage();
        if (eq)
            val = eq + 1;
        else if (i + 1 < argc)
            val = argv[++i];
        else
            usage();

        if (strcmp(name, "addr") == 0) {
            parse_addr(val);
        } else if (strcmp(name, "mode") == 0) {
            if (strcmp(val, "serial") == 0)
                opt_serial = 1;
            else if (strcmp(val, "pipe") == 0)
                opt_serial = 0;
            else
                usage();
        } else if (strcmp(name, "c") == 0) {
            opt_conns = parse_long("-c", val, 0);
        } else if (strcmp(name, "w") == 0) {
            opt_window = parse_long("-w", val, 1);
        } else if (strcmp(name, "d") == 0) {
            opt_dur = parse_secs("-d", val);
        } else if (strcmp(name, "warmup") == 0) {
            opt_warmup = parse_secs("-warmup", val);
        } else if (strcmp(name, "idle") == 0) {
            opt_idle = parse_long("-idle", val, 0);
        } else if (strcmp(name, "idleping") == 0) {
            opt_idle_ping = (int)parse_long("-idleping", val, 0) != 0;
        } else if (strcmp(name, "data") == 0) {
            opt_data = val;
        } else if (strcmp(name, "cpu") == 0) {
            const char *e = strchr(val, '=');
            if (!e || e == val || (size_t)(e - val) >= sizeof cpu_targets[0].name ||
                n_cpu_targets == MAX_CPU)
                usage();
            struct cpu_target *t = &cpu_targets[n_cpu_targets++];
            memcpy(t->name, val, (size_t)(e - val));
            t->name[e - val] = 0;
            t->pid = (int)parse_long("-cpu pid", e + 1, 1);
        } else {
            fprintf(stderr, "loadgen: unknown option -%s\n", name);
            usage();
        }
    }
    opt_data_len = strlen(opt_data);
    if (opt_data_len > DATA_MAX || strpbrk(opt_data, " \r\n")) {
        fprintf(stderr, "loadgen: -data must be at most %d chars without spaces\n", DATA_MAX);
        exit(2);
    }
    if (opt_addr.sin_family == 0)
        parse_addr(opt_addr_str);
}

/* ------------------------------------------------------------------ */
/* Measured window                                                     */

/* Everything read at one edge of the measured window. */
struct snapshot {
    int64_t t;                          /* CLOCK_MONOTONIC ns            */
    struct counters cnt;
    double self_cpu;                    /* our own CPU seconds           */
    double pid_cpu[MAX_CPU];            /* per -cpu target, -1 if gone   */
    unsigned long long aff_busy, aff_total;
};

static void take_snapshot(struct snapshot *s)
{
    s->cnt = cnt;
    s->self_cpu = self_cpu_seconds();
    for (int k = 0; k < n_cpu_targets; k++)
        s->pid_cpu[k] = pid_cpu_seconds(cpu_targets[k].pid);
    if (aff_ok)
        aff_ticks(&s->aff_busy, &s->aff_total);
    s->t = mono_ns();
}

/* Print " <name><suffix>=num/den" with prec decimals, "=na" if den is 0. */
static void print_ratio(const char *name, const char *suffix, int prec, double num, double den)
{
    if (den > 0)
        printf(" %s%s=%.*f", name, suffix, prec, num / den);
    else
        printf(" %s%s=na", name, suffix);
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    window = opt_serial ? 1 : opt_window;

    raise_fd_limit();   /* thousands of idle connections */

    if (opt_idle > 0) {
        if (open_idle() < 0)
            return 1;
        fprintf(stderr, "loadgen: READY idle=%ld\n", opt_idle);
    }

    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct conn *conns = calloc((size_t)opt_conns + 1, sizeof *conns);
    if (epfd < 0 || !conns) {
        perror("loadgen: setup");
        return 1;
    }
    for (long i = 0; i < opt_conns; i++) {
        struct conn *c = &conns[i];
        c->id = i;
        c->fd = connect_to();
        if (c->fd < 0)
            return 1;
        c->rbuf = malloc(RBUF_SIZE);
        c->wbuf = malloc((size_t)window * REQ_MAX);
        c->sent_ns = calloc((size_t)window, sizeof *c->sent_ns);
        if (!c->rbuf || !c->wbuf || !c->sent_ns) {
            fprintf(stderr, "loadgen: out of memory\n");
            return 1;
        }
        c->next_send = c->next_recv = 1;
        c->alive = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    }
    alive_conns = opt_conns;
    for (long i = 0; i < opt_conns; i++)
        if (conns[i].alive)
            conn_refill(&conns[i]);

    /* With no active connections there is nothing to warm up. */
    double warm = opt_conns > 0 ? opt_warmup : 0;
    int64_t t_begin = mono_ns() + (int64_t)(warm * 1e9);
    int64_t t_stop = t_begin + (int64_t)(opt_dur * 1e9);
    struct snapshot w0, w1;
    aff_ok = sched_getaffinity(0, sizeof aff_mask, &aff_mask) == 0;
    int started = 0;
    struct epoll_event evs[MAX_EVENTS];

    for (;;) {
        int64_t now = mono_ns();
        if (!started && now >= t_begin) {
            take_snapshot(&w0);
            started = measuring = 1;
        }
        if (started && now >= t_stop)
            break;
        if (opt_conns > 0 && alive_conns == 0) {
            fprintf(stderr, "loadgen: all connections lost, stopping early\n");
            if (!started)   /* make the window empty rather than undefined */
                take_snapshot(&w0);
            break;
        }
        int64_t until = (started ? t_stop : t_begin) - now;
        int timeout_ms = (int)((until + 999999) / 1000000);
        int n = epoll_wait(epfd, evs, MAX_EVENTS, timeout_ms);
        if (n < 0 && errno != EINTR) {
            perror("loadgen: epoll_wait");
            return 1;
        }
        if (n > 0)
            cnt.polls++;
        for (int k = 0; k < n; k++) {
            struct conn *c = evs[k].data.ptr;
            if (c->alive && (evs[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                conn_readable(c);   /* EOF / errors surface through read() */
            if (c->alive && (evs[k].events & EPOLLOUT))
                conn_flush(c);
        }
    }
    /* Window end: read the clocks before the teardown below, so that it
     * is not charged to anyone. */
    measuring = 0;
    take_snapshot(&w1);

    check_idle();

    double secs = (double)(w1.t - w0.t) / 1e9;
    /* A window cut short before it began (all connections lost during
     * warm-up) has no meaningful rates: report them as "na". */
    double rsecs = secs < 1e-3 ? 0 : secs;
    uint64_t reqs = w1.cnt.reqs - w0.cnt.reqs, replies = w1.cnt.replies - w0.cnt.replies;
    uint64_t msgs = reqs + replies;
    uint64_t errors = cnt.bad + cnt.connerr;   /* whole run, not just window */
    double self = w1.self_cpu - w0.self_cpu;

    printf("RESULT mode=%s c=%ld w=%ld idle=%ld secs=%.3f msgs=%" PRIu64,
           opt_serial ? "serial" : "pipe", opt_conns, window, opt_idle, secs, msgs);
    print_ratio("rate", "", 0, (double)msgs, rsecs);
    print_ratio("req_rate", "", 0, (double)reqs, rsecs);
    printf(" replies=%" PRIu64 " naks=%" PRIu64 " polls=%" PRIu64, replies,
           w1.cnt.naks - w0.cnt.naks, w1.cnt.polls - w0.cnt.polls);
    printf(" p50_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f", hist_quantile(0.50) / 1e3,
           hist_quantile(0.99) / 1e3, hist_quantile(0.999) / 1e3, (double)hist_max / 1e3);
    printf(" errors=%" PRIu64, errors);
    print_ratio("self_cpu", "", 3, self, rsecs);
    print_ratio("self_cpu_per_M", "", 3, self * 1e6, (double)msgs);
    if (aff_ok) {
        printf(" lg_cpus=");
        print_aff_list();
        print_ratio("lg_cpus_busy", "", 3, (double)(w1.aff_busy - w0.aff_busy),
                    (double)(w1.aff_total - w0.aff_total));
    }
    for (int k = 0; k < n_cpu_targets; k++) {
        const char *name = cpu_targets[k].name;
        double used = w1.pid_cpu[k] - w0.pid_cpu[k];
        if (w0.pid_cpu[k] < 0 || w1.pid_cpu[k] < 0) {
            printf(" %s_cpu=na %s_cpu_per_M=na", name, name);
            fprintf(stderr, "loadgen: cannot read /proc/%d/stat for -cpu %s\n",
                    cpu_targets[k].pid, name);
            continue;
        }
        print_ratio(name, "_cpu", 3, used, rsecs);
        print_ratio(name, "_cpu_per_M", 3, used * 1e6, (double)msgs);
    }
    printf("\n");
    fflush(stdout);

    /* Success needs a clean run and at least one reply (idle pings count,
     * so "-c 0 -idle N" can succeed; with -idleping 0 as well, no errors
     * is enough since no reply was asked for). */
    int got_reply = cnt.replies > 0 || (opt_conns == 0 && !(opt_idle > 0 && opt_idle_ping));
    return (errors == 0 && got_reply) ? 0 : 1;
}
