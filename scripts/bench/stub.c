/*
 * stub.c - a fast Foo-protocol server, used as the upstream in benchmarks.
 *
 * Single-threaded, epoll-based, Linux only.  It has to be much cheaper per
 * message than the proxy under test so that it is never the bottleneck:
 * it parses lines in place, formats replies without printf, and answers
 * everything that one read() delivered with a single write().
 *
 * For every complete line:
 *   "REQ|ACK|NAK <seq> [<data>]"  -> "ACK <seq> <32 hex>\n", or NAK when
 *                                    seq % 8 == 3 (the reference server
 *                                    also answers lines typed ACK/NAK)
 *   anything else                  -> "NAK 0 ERRDECODE\n"
 * Fields are split on single spaces as the reference server does: fewer
 * than 2 or more than 3 fields, an unknown type or a seq that is not a
 * signed 64-bit decimal is malformed.  A trailing '\r' is ignored.  The
 * 32 hex chars are a cheap deterministic function of seq, not the
 * reference digest, so the reference client would reject them.
 * A line longer than 64 KiB closes the connection, as in the reference.
 *
 * Usage: stub -listen HOST:PORT      (runs until killed)
 * Build: cc -O2 -Wall -o stub stub.c
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
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"

#define IN_SIZE 65536
#define MAX_LINE 65536
#define REPLY_MAX 64              /* "NAK -9223372036854775808 " + 32 hex + "\n" = 59 */
#define OUT_SIZE (1 << 20)        /* flushed early if a read yields more than this */
#define MAX_EVENTS 512

struct sconn {
    int fd;
    int want_out;        /* waiting for EPOLLOUT; reading is paused meanwhile */
    char *part;          /* start of a line whose '\n' has not arrived yet */
    size_t plen, pcap;
    char *pend;          /* reply bytes the kernel did not take yet */
    size_t pendlen, pendoff, pendcap;
};

static int epfd;
static char inbuf[IN_SIZE];
static char outbuf[OUT_SIZE];
static size_t outlen;

/* Grow *buf to hold at least need bytes; 0 on success. */
static int reserve(char **buf, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 256;
    while (n < need)
        n *= 2;
    char *p = realloc(*buf, n);
    if (!p)
        return -1;
    *buf = p;
    *cap = n;
    return 0;
}

static void conn_close(struct sconn *c)
{
    close(c->fd);   /* also removes it from the epoll set */
    free(c->part);
    free(c->pend);
    free(c);
}

/* Pause reading while replies are backed up, so a client that does not
 * read cannot make us buffer without bound. */
static void set_want_out(struct sconn *c, int want)
{
    if (c->want_out == want)
        return;
    struct epoll_event ev = {.events = want ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want;
}

/* Write pending bytes then outbuf; keep what the kernel refuses.
 * Returns -1 if the connection failed (caller closes it). */
static int flush(struct sconn *c)
{
    if (c->pendlen > c->pendoff || outlen == 0) {
        /* Older bytes are queued: append, to keep the reply order. */
        if (outlen) {
            if (reserve(&c->pend, &c->pendcap, c->pendlen + outlen) < 0)
                return -1;
            memcpy(c->pend + c->pendlen, outbuf, outlen);
            c->pendlen += outlen;
            outlen = 0;
        }
        while (c->pendoff < c->pendlen) {
            ssize_t n = send(c->fd, c->pend + c->pendoff, c->pendlen - c->pendoff, MSG_NOSIGNAL);
            if (n > 0)
                c->pendoff += (size_t)n;
            else if (n < 0 && errno == EINTR)
                continue;
            else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                set_want_out(c, 1);
                return 0;
            } else
                return -1;
        }
        c->pendoff = c->pendlen = 0;
        set_want_out(c, 0);
        return 0;
    }
    /* Common case: nothing queued, write outbuf straight from memory. */
    size_t off = 0;
    while (off < outlen) {
        ssize_t n = send(c->fd, outbuf + off, outlen - off, MSG_NOSIGNAL);
        if (n > 0)
            off += (size_t)n;
        else if (n < 0 && errno == EINTR)
            continue;
        else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (reserve(&c->pend, &c->pendcap, outlen - off) < 0)
                return -1;
            memcpy(c->pend, outbuf + off, outlen - off);
            c->pendoff = 0;
            c->pendlen = outlen - off;
            outlen = 0;
            set_want_out(c, 1);
            return 0;
        } else
            return -1;
    }
    outlen = 0;
    return 0;
}

/* Signed 64-bit decimal, like Go's strconv.ParseInt(s, 10, 64). */
static int parse_i64(const char *s, size_t n, int64_t *out)
{
    size_t i = 0;
    int neg = 0;
    if (n > 0 && (s[0] == '+' || s[0] == '-')) {
        neg = s[0] == '-';
        i = 1;
    }
    if (i == n)
        return -1;
    uint64_t v = 0, limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (limit - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = neg ? (int64_t)(0 - v) : (int64_t)v;
    return 0;
}

/* splitmix64: a cheap mix so the digest differs from message to message. */
static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static char *put_hex64(char *p, uint64_t v)
{
    static const char hexd[] = "0123456789abcdef";
    for (int i = 60; i >= 0; i -= 4)
        *p++ = hexd[(v >> i) & 15];
    return p;
}

/* Answer one line (without '\n') into outbuf. */
static void handle_line(const char *line, size_t len)
{
    char *o = outbuf + outlen;
    if (len > 0 && line[len - 1] == '\r')
        len--;
    const char *sp1 = memchr(line, ' ', len);
    if (!sp1 || sp1 - line != 3)
        goto bad;
    if (memcmp(line, "REQ", 3) && memcmp(line, "ACK", 3) && memcmp(line, "NAK", 3))
        goto bad;
    const char *seqs = sp1 + 1, *end = line + len;
    const char *sp2 = memchr(seqs, ' ', (size_t)(end - seqs));
    const char *seqe = sp2 ? sp2 : end;
    if (sp2 && memchr(sp2 + 1, ' ', (size_t)(end - sp2 - 1)))
        goto bad;   /* more than 3 fields (data containing spaces) */
    int64_t seq;
    if (parse_i64(seqs, (size_t)(seqe - seqs), &seq) < 0)
        goto bad;
    /* Mathematical modulo, so negative seqs behave too. */
    memcpy(o, ((seq % 8) + 8) % 8 == 3 ? "NAK " : "ACK ", 4);
    o = put_i64(o + 4, seq);
    *o++ = ' ';
    o = put_hex64(o, mix((uint64_t)seq));
    o = put_hex64(o, mix((uint64_t)seq ^ 0x5555555555555555ULL));
    *o++ = '\n';
    outlen = (size_t)(o - outbuf);
    return;
bad:
    memcpy(o, "NAK 0 ERRDECODE\n", 16);
    outlen += 16;
}

/* Handle one line, flushing first if outbuf could overflow.  Returns -1 if
 * the connection failed. */
static int line_out(struct sconn *c, const char *line, size_t len)
{
    if (outlen + REPLY_MAX > OUT_SIZE && flush(c) < 0)
        return -1;
    handle_line(line, len);
    return 0;
}

/* Returns -1 when the connection should be closed. */
static int on_readable(struct sconn *c)
{
    ssize_t n = read(c->fd, inbuf, sizeof inbuf);
    if (n == 0)
        return -1;   /* client closed: the normal way a connection ends */
    if (n < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;

    const char *p = inbuf, *end = inbuf + n, *nl;
    outlen = 0;
    if (c->plen) {
        /* Complete the line started by an earlier read. */
        nl = memchr(p, '\n', (size_t)n);
        size_t take = nl ? (size_t)(nl - p) : (size_t)n;
        if (c->plen + take > MAX_LINE)
            return -1;
        if (reserve(&c->part, &c->pcap, c->plen + take) < 0)
            return -1;
        memcpy(c->part + c->plen, p, take);
        c->plen += take;
        if (!nl)
            return 0;
        if (line_out(c, c->part, c->plen) < 0)
            return -1;
        c->plen = 0;
        if (c->pcap > 4096) {   /* don't keep a big buffer on an idle conn */
            free(c->part);
            c->part = NULL;
            c->pcap = 0;
        }
        p = nl + 1;
    }
    while ((nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        if (line_out(c, p, (size_t)(nl - p)) < 0)
            return -1;
        p = nl + 1;
    }
    if (p < end) {   /* keep the partial line for the next read */
        if (reserve(&c->part, &c->pcap, (size_t)(end - p)) < 0)
            return -1;
        memcpy(c->part, p, (size_t)(end - p));
        c->plen = (size_t)(end - p);
    }
    return flush(c);   /* one write for everything this read produced */
}

static void on_accept(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) {
                /* Out of descriptors: back off instead of spinning on a
                 * listen socket that stays readable. */
                perror("stub: accept");
                usleep(10000);
            } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                       errno != ECONNABORTED) {
                perror("stub: accept");
            }
            return;
        }
        set_nodelay(fd);   /* replies are already batched per read */
        struct sconn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
        }
    }
}

int main(int argc, char **argv)
{
    const char *listen_s = "127.0.0.1:9201";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) == 0)
            a++;
        if (strcmp(a, "-listen") == 0 && i + 1 < argc)
            listen_s = argv[++i];
        else if (strncmp(a, "-listen=", 8) == 0)
            listen_s = a + 8;
        else {
            fprintf(stderr, "usage: stub -listen HOST:PORT\n");
            return 2;
        }
    }

    struct sockaddr_in sa;
    if (parse_ipv4_addr(listen_s, &sa) < 0) {
        fprintf(stderr, "stub: -listen wants IPv4 HOST:PORT, got %s\n", listen_s);
        return 2;
    }

    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();   /* many connections need many descriptors */

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 4096) < 0) {
        fprintf(stderr, "stub: listen %s: %s\n", listen_s, strerror(errno));
        return 1;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};   /* NULL = listener */
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev);
    fprintf(stderr, "stub: listening on %s\n", listen_s);

    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR) {
            perror("stub: epoll_wait");
            return 1;
        }
        for (int k = 0; k < n; k++) {
            struct sconn *c = evs[k].data.ptr;
            if (!c) {
                on_accept(lfd);
                continue;
            }
            int r;
            if (c->want_out)   /* only EPOLLOUT (or an error) is armed */
                r = (evs[k].events & (EPOLLERR | EPOLLHUP)) ? -1 : flush(c);
            else
                r = on_readable(c);   /* errors and EOF surface via read() */
            if (r < 0)
                conn_close(c);
        }
    }
}
