/*
 * common.h - helpers shared by the benchmark instruments (loadgen.c, stub.c).
 *
 * Header-only (every function is static), so that each tool still builds
 * from its one .c file:  cc -O2 -Wall -o stub stub.c
 */
#ifndef GEVENTPROXY_BENCH_COMMON_H
#define GEVENTPROXY_BENCH_COMMON_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>

/* Parse an IPv4 "HOST:PORT" ("localhost" and an empty host mean 127.0.0.1).
 * Returns 0, or -1 if it is not one (port 0 is refused too). */
static int parse_ipv4_addr(const char *s, struct sockaddr_in *out)
{
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host)
        return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = 0;
    if (host[0] == 0 || strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end || port < 1 || port > 65535)
        return -1;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)port);
    return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

/* Thousands of connections need thousands of descriptors: soft limit = hard. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* Writes are whole batches already: never let Nagle hold them. */
static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Signed decimal without printf: this runs once per message. */
static char *put_i64(char *p, int64_t sv)
{
    char tmp[20];
    int n = 0;
    uint64_t v = (uint64_t)sv;
    if (sv < 0) {
        *p++ = '-';
        v = 0 - v;
    }
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

#endif
