/*
 * loadgen: a closed-loop load generator for the filecache benchmark.
 *
 * It speaks the filecache protocol (docs/protocol.md: "GET <path>\r\n",
 * "OK <size> <version>\r\n", <size> body bytes, "END <sha256>\r\n") and
 * HTTP/1.1 keep-alive GET, so that one client drives filecache, nginx and
 * twistd web alike.  Each of C connections sends one request, reads the whole
 * reply, then sends the next.  Connections are spread over T threads, each
 * with its own epoll loop (level-triggered, non-blocking sockets).
 *
 * It checks framing, not content: a filecache reply must carry exactly the
 * announced number of body bytes followed by a well-formed END line (64 hex
 * digits), and an HTTP reply exactly Content-Length bytes followed by the next
 * status line.  It does NOT compute SHA-256 (that would make the client, not
 * the server, the bottleneck); use filecache-client to verify content.
 *
 * Output: one JSON object on stdout.  See benchmarks/README.md.
 *
 * Build: cc -O2 -Wall -Wextra -pthread -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define CONN_BUF (64 * 1024)     /* per-connection buffer: status lines, headers, small bodies */
#define SCRATCH (256 * 1024)     /* per-thread sink for large bodies */
#define BIG_BODY (16 * 1024)     /* bodies with more left than this bypass the conn buffer */
#define MAX_EVENTS 256

enum proto { PROTO_FC, PROTO_HTTP };
enum state { ST_IDLE, ST_HEAD, ST_BODY, ST_TRAIL };

typedef struct {
    char *data;
    size_t len;
} request_t;

typedef struct {
    int fd;
    enum state state;
    const request_t *req;
    size_t sent;           /* bytes of req already written */
    int want_out;          /* EPOLLOUT registered */
    char *buf;
    size_t len;            /* unparsed bytes in buf */
    uint64_t body_left;
    int ok;                /* current reply is a success (OK / HTTP 200) */
    int close_after;       /* HTTP: server asked to close after this reply */
    uint64_t t_start;
} conn_t;

typedef struct {
    int id;
    int epfd;
    conn_t *conns;
    int nconns;
    int open;              /* connections still in use */
    char *scratch;
    uint64_t requests, errors, bytes, reconnects;
    uint64_t *lat;         /* per-request latency, ns */
    size_t nlat, caplat;
    uint64_t rng;
    uint64_t t_end;
    pthread_t th;
} worker_t;

/* configuration */
static const char *g_addr = "127.0.0.1";
static int g_port = 0;
static enum proto g_proto = PROTO_FC;
static int g_conns = 1;
static int g_threads = 1;
static double g_duration = 0;
static uint64_t g_total = 0;
static int g_random = 0;
static int g_proxy_header = 0; /* -X: a PROXY protocol v1 header opens each connection */
static int g_cold = 0;
static double g_timeout = 600;
static const char *g_label = "";
static struct sockaddr_in g_sa;

static request_t *g_reqs;
static size_t g_nreqs;

/* shared run state */
static atomic_uint_fast64_t g_next;   /* next list index (round-robin / cold) */
static atomic_uint_fast64_t g_issued; /* requests issued (for -n) */
static atomic_int g_stop;
static atomic_int g_timed_out;
static uint64_t g_t0, g_deadline;
static pthread_barrier_t g_barrier;
static pthread_mutex_t g_err_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_first_error[256];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void note_error(worker_t *w, const char *fmt, ...)
{
    w->errors++;
    pthread_mutex_lock(&g_err_lock);
    if (!g_first_error[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(g_first_error, sizeof g_first_error, fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&g_err_lock);
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* --- requests ------------------------------------------------------------ */

static int unreserved(unsigned char c)
{
    return isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '/';
}

/* Percent-encode as docs/protocol.md asks (also a valid HTTP path). */
static size_t encode_path(const char *path, char *out)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)path; *p; p++) {
        if (unreserved(*p)) {
            out[n++] = (char)*p;
        } else {
            out[n++] = '%';
            out[n++] = hex[*p >> 4];
            out[n++] = hex[*p & 15];
        }
    }
    out[n] = 0;
    return n;
}

static void add_request(const char *path, size_t *cap)
{
    char enc[3 * 4096 + 1];
    char line[3 * 4096 + 256];
    if (strlen(path) > 4096)
        die("path too long: %.60s...", path);
    while (*path == '/')
        path++;
    encode_path(path, enc);
    int n;
    if (g_proto == PROTO_FC)
        n = snprintf(line, sizeof line, "GET %s\r\n", enc);
    else
        n = snprintf(line, sizeof line, "GET /%s HTTP/1.1\r\nHost: %s:%d\r\n\r\n", enc, g_addr,
                     g_port);
    if (g_nreqs == *cap) {
        *cap = *cap ? *cap * 2 : 1024;
        g_reqs = realloc(g_reqs, *cap * sizeof *g_reqs);
        if (!g_reqs)
            die("out of memory");
    }
    g_reqs[g_nreqs].data = strndup(line, (size_t)n);
    g_reqs[g_nreqs].len = (size_t)n;
    if (!g_reqs[g_nreqs].data)
        die("out of memory");
    g_nreqs++;
}

static void load_paths(const char *file, const char *single)
{
    size_t cap = 0;
    if (single)
        add_request(single, &cap);
    if (file) {
        FILE *f = fopen(file, "r");
        if (!f)
            die("%s: %s", file, strerror(errno));
        char *line = NULL;
        size_t lcap = 0;
        ssize_t n;
        while ((n = getline(&line, &lcap, f)) >= 0) {
            while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
                line[--n] = 0;
            if (n > 0)
                add_request(line, &cap);
        }
        free(line);
        fclose(f);
    }
    if (g_nreqs == 0)
        die("no paths: give -u PATH or -f FILE");
}

/* The next request to send, or NULL when there is no more work. */
static const request_t *next_request(worker_t *w)
{
    if (atomic_load(&g_stop))
        return NULL;
    if (g_total && atomic_fetch_add(&g_issued, 1) >= g_total)
        return NULL;
    if (g_cold) {
        uint64_t i = atomic_fetch_add(&g_next, 1);
        return i < g_nreqs ? &g_reqs[i] : NULL;
    }
    if (g_random)
        return &g_reqs[xorshift(&w->rng) % g_nreqs];
    return &g_reqs[atomic_fetch_add(&g_next, 1) % g_nreqs];
}

/* --- connections --------------------------------------------------------- */

static int dial(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    /* Blocking connect: on loopback it completes (or is refused) at once. */
    if (connect(fd, (struct sockaddr *)&g_sa, sizeof g_sa) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    if (g_proxy_header) {
        /* What HAProxy's send-proxy would say: the real source and destination. */
        struct sockaddr_in me;
        socklen_t len = sizeof me;
        char line[128];
        if (getsockname(fd, (struct sockaddr *)&me, &len) < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        int n = snprintf(line, sizeof line, "PROXY TCP4 127.0.0.1 %s %d %d\r\n", g_addr,
                         ntohs(me.sin_port), g_port);
        /* Blocking and tiny: it goes out whole or the connection is useless. */
        if (write(fd, line, (size_t)n) != n) {
            int e = errno;
            close(fd);
            errno = e ? e : EIO;
            return -1;
        }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void conn_close(worker_t *w, conn_t *c)
{
    if (c->fd >= 0) {
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
        w->open--;
    }
    c->state = ST_IDLE;
    c->len = 0;
    c->want_out = 0;
}

static int conn_open(worker_t *w, conn_t *c)
{
    c->fd = dial();
    if (c->fd < 0) {
        note_error(w, "connect to %s:%d: %s", g_addr, g_port, strerror(errno));
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    w->open++;
    c->state = ST_IDLE;
    c->len = 0;
    c->want_out = 0;
    return 0;
}

static void set_out(worker_t *w, conn_t *c, int on)
{
    if (c->want_out == on)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(w->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = on;
}

/* Write what is left of the current request; 0 ok, -1 connection broken. */
static int flush_request(worker_t *w, conn_t *c)
{
    while (c->sent < c->req->len) {
        ssize_t n = send(c->fd, c->req->data + c->sent, c->req->len - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                set_out(w, c, 1);
                return 0;
            }
            if (errno == EINTR)
                continue;
            return -1;
        }
        c->sent += (size_t)n;
    }
    set_out(w, c, 0);
    return 0;
}

/* Start the next request on c, or close c when there is no more work. */
static void start_next(worker_t *w, conn_t *c)
{
    for (;;) {
        const request_t *r = next_request(w);
        if (!r) {
            conn_close(w, c);
            return;
        }
        if (c->fd < 0 && conn_open(w, c) < 0)
            return; /* counted; this connection is done */
        c->req = r;
        c->sent = 0;
        c->state = ST_HEAD;
        c->ok = 0;
        c->close_after = 0;
        c->t_start = now_ns();
        if (flush_request(w, c) == 0)
            return;
        note_error(w, "send: %s", strerror(errno));
        conn_close(w, c);
        w->reconnects++;
    }
}

/* Framing is lost or the connection broke: count it, reconnect, go on. */
static void conn_fail(worker_t *w, conn_t *c)
{
    conn_close(w, c);
    w->reconnects++;
    start_next(w, c);
}

static void reply_done(worker_t *w, conn_t *c)
{
    uint64_t t = now_ns();
    if (c->ok) {
        w->requests++;
        if (w->nlat == w->caplat) {
            w->caplat = w->caplat ? w->caplat * 2 : 65536;
            w->lat = realloc(w->lat, w->caplat * sizeof *w->lat);
            if (!w->lat)
                die("out of memory");
        }
        w->lat[w->nlat++] = t - c->t_start;
    }
    c->state = ST_IDLE;
    if (c->close_after) {
        /* Keep any stray bytes out of the next connection. */
        conn_close(w, c);
        w->reconnects++;
    }
    start_next(w, c);
}

/* The next whole line in c->buf, NUL-terminated in place without its \r\n:
   its length in *n and the bytes it takes in *used.  0: no whole line yet. */
static int next_line(conn_t *c, size_t *n, size_t *used)
{
    char *nl = memchr(c->buf, '\n', c->len);
    if (!nl)
        return 0;
    *n = (size_t)(nl - c->buf);
    *used = *n + 1;
    if (*n && c->buf[*n - 1] == '\r')
        (*n)--;
    c->buf[*n] = 0;
    return 1;
}

static void consume(conn_t *c, size_t n)
{
    c->len -= n;
    if (c->len)
        memmove(c->buf, c->buf + n, c->len);
}

/* A status line "OK <size> <version>" or "ERR <code> <text>". */
static int parse_fc_status(worker_t *w, conn_t *c, char *line, size_t n)
{
    if (n >= 3 && memcmp(line, "OK ", 3) == 0) {
        char *end;
        errno = 0;
        unsigned long long size = strtoull(line + 3, &end, 10);
        if (errno || end == line + 3 || *end != ' ' || !isdigit((unsigned char)line[3])) {
            note_error(w, "bad status line: %.100s", line);
            return -1;
        }
        c->body_left = size;
        c->ok = 1;
        c->state = ST_BODY;
        return 0;
    }
    if (n >= 4 && memcmp(line, "ERR ", 4) == 0) {
        note_error(w, "%.200s", line);
        c->ok = 0;
        c->state = ST_IDLE;
        return 1; /* reply complete */
    }
    note_error(w, "bad status line: %.100s", line);
    return -1;
}

static int is_hex64(const char *s, size_t n)
{
    if (n != 64)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)s[i]))
            return 0;
    return 1;
}

/* Parse the HTTP status line and headers in buf[0..hlen). */
static int parse_http_head(worker_t *w, conn_t *c, char *head, size_t hlen)
{
    head[hlen - 2] = 0; /* keep one \r\n-terminated block as a C string */
    if (strncmp(head, "HTTP/1.", 7) != 0 || hlen < 12) {
        note_error(w, "bad HTTP status line: %.100s", head);
        return -1;
    }
    int http10 = head[7] == '0';
    int status = atoi(head + 9);
    int have_len = 0, keep_alive = 0;
    uint64_t clen = 0;
    char *save = NULL;
    char *line = strtok_r(head, "\r\n", &save); /* status line */
    while ((line = strtok_r(NULL, "\r\n", &save)) != NULL) {
        char *colon = strchr(line, ':');
        if (!colon)
            continue;
        *colon = 0;
        char *v = colon + 1;
        while (*v == ' ' || *v == '\t')
            v++;
        if (strcasecmp(line, "Content-Length") == 0) {
            char *end;
            errno = 0;
            clen = strtoull(v, &end, 10);
            if (errno || end == v) {
                note_error(w, "bad Content-Length: %.60s", v);
                return -1;
            }
            have_len = 1;
        } else if (strcasecmp(line, "Transfer-Encoding") == 0 && strcasestr(v, "chunked")) {
            note_error(w, "chunked reply not supported (status %d)", status);
            return -1;
        } else if (strcasecmp(line, "Connection") == 0) {
            if (strcasestr(v, "close"))
                c->close_after = 1;
            if (strcasestr(v, "keep-alive"))
                keep_alive = 1;
        }
    }
    if (http10 && !keep_alive)
        c->close_after = 1;
    if (!have_len) {
        note_error(w, "reply without Content-Length (status %d)", status);
        return -1;
    }
    if (status != 200)
        note_error(w, "HTTP status %d", status);
    c->ok = status == 200;
    c->body_left = clen;
    c->state = ST_BODY;
    return 0;
}

/*
 * Parse what is in c->buf.  Returns 0 to read more, -1 when framing is lost
 * (the caller reconnects).  May complete replies and start new requests.
 */
static int parse(worker_t *w, conn_t *c)
{
    for (;;) {
        switch (c->state) {
        case ST_IDLE:
            if (c->len) {
                note_error(w, "%zu unexpected bytes while no request was pending", c->len);
                return -1;
            }
            return 0;
        case ST_HEAD:
            if (g_proto == PROTO_FC) {
                size_t n, used;
                if (!next_line(c, &n, &used))
                    goto need_more;
                int r = parse_fc_status(w, c, c->buf, n);
                consume(c, used);
                if (r < 0)
                    return -1;
                if (r == 1) {
                    reply_done(w, c);
                    if (c->fd < 0)
                        return 0;
                }
            } else {
                char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
                if (!end)
                    goto need_more;
                size_t hlen = (size_t)(end - c->buf) + 4;
                int r = parse_http_head(w, c, c->buf, hlen);
                consume(c, hlen);
                if (r < 0)
                    return -1;
            }
            break;
        case ST_BODY: {
            size_t take = c->len < c->body_left ? c->len : (size_t)c->body_left;
            c->body_left -= take;
            if (c->ok)
                w->bytes += take;
            consume(c, take);
            if (c->body_left)
                return 0;
            if (g_proto == PROTO_FC) {
                c->state = ST_TRAIL;
            } else {
                reply_done(w, c);
                if (c->fd < 0)
                    return 0;
            }
            break;
        }
        case ST_TRAIL: {
            size_t n, used;
            if (!next_line(c, &n, &used))
                goto need_more;
            if (n < 4 || memcmp(c->buf, "END ", 4) != 0 || !is_hex64(c->buf + 4, n - 4)) {
                note_error(w, "expected END <sha256> right after the announced body, got: %.80s",
                           c->buf);
                return -1;
            }
            consume(c, used);
            reply_done(w, c);
            if (c->fd < 0)
                return 0;
            break;
        }
        }
    }
need_more:
    if (c->len == CONN_BUF) {
        note_error(w, "status line or headers longer than %d bytes", CONN_BUF);
        return -1;
    }
    return 0;
}

static void on_readable(worker_t *w, conn_t *c)
{
    for (;;) {
        ssize_t n;
        size_t want;
        if (c->state == ST_BODY && c->len == 0 && c->body_left > BIG_BODY) {
            /*
             * Large body: straight into the sink, never past the body's end.
             * The last few KiB go through the connection buffer instead, so
             * that they arrive with the END line in one recv.
             */
            want = c->body_left - BIG_BODY / 2 < SCRATCH ? c->body_left - BIG_BODY / 2 : SCRATCH;
            n = recv(c->fd, w->scratch, want, 0);
            if (n > 0) {
                c->body_left -= (uint64_t)n;
                if (c->ok)
                    w->bytes += (uint64_t)n;
            }
        } else {
            want = CONN_BUF - c->len;
            n = recv(c->fd, c->buf + c->len, want, 0);
            if (n > 0) {
                c->len += (size_t)n;
                if (parse(w, c) < 0) {
                    conn_fail(w, c);
                    return;
                }
                if (c->fd < 0)
                    return;
            }
        }
        if (n == 0) {
            if (c->state == ST_IDLE && c->len == 0) {
                /* Closed between requests (e.g. after ERR busy): not a reply lost. */
                conn_close(w, c);
                w->reconnects++;
                start_next(w, c);
            } else {
                if (c->state == ST_BODY)
                    note_error(w, "connection closed mid-body (%llu bytes missing)",
                               (unsigned long long)c->body_left);
                else if (c->state == ST_TRAIL)
                    note_error(w, "connection closed before the END line");
                else
                    note_error(w, "connection closed before a reply");
                conn_fail(w, c);
            }
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EINTR)
                continue;
            note_error(w, "recv: %s", strerror(errno));
            conn_fail(w, c);
            return;
        }
        if ((size_t)n < want)
            return; /* drained; level-triggered epoll reports more */
    }
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    struct epoll_event evs[MAX_EVENTS];

    for (int i = 0; i < w->nconns; i++) {
        w->conns[i].fd = -1;
        w->conns[i].buf = malloc(CONN_BUF);
        if (!w->conns[i].buf)
            die("out of memory");
        if (conn_open(w, &w->conns[i]) < 0)
            die("%s", g_first_error);
    }
    pthread_barrier_wait(&g_barrier); /* all connected */
    pthread_barrier_wait(&g_barrier); /* clock started */

    for (int i = 0; i < w->nconns; i++)
        start_next(w, &w->conns[i]);

    while (w->open > 0) {
        uint64_t t = now_ns();
        if (t >= g_deadline) {
            if (!g_duration)
                atomic_store(&g_timed_out, 1);
            atomic_store(&g_stop, 1);
        }
        if (atomic_load(&g_stop))
            break;
        uint64_t left_ms = (g_deadline - t) / 1000000 + 1;
        int timeout = left_ms < 50 ? (int)left_ms : 50;
        int n = epoll_wait(w->epfd, evs, MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->fd < 0)
                continue;
            if ((evs[i].events & EPOLLOUT) && c->state == ST_HEAD && c->sent < c->req->len) {
                if (flush_request(w, c) < 0) {
                    note_error(w, "send: %s", strerror(errno));
                    conn_fail(w, c);
                    continue;
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(w, c);
        }
    }
    w->t_end = now_ns();
    for (int i = 0; i < w->nconns; i++)
        conn_close(w, &w->conns[i]);
    return NULL;
}

/* --- results ------------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static double pct_ms(const uint64_t *v, size_t n, double p)
{
    if (!n)
        return 0;
    size_t i = (size_t)(p / 100.0 * (double)n);
    if (i >= n)
        i = n - 1;
    return (double)v[i] / 1e6;
}

static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen -p PORT [-a ADDR] [-P fc|http] [-c CONNS] [-t THREADS]\n"
            "               (-d SECONDS | -n REQUESTS | -C) (-f PATHLIST | -u PATH) [-r]\n"
            "               [-T TIMEOUT] [-L LABEL] [-X]\n"
            "  -a ADDR     IPv4 address of the server (default 127.0.0.1)\n"
            "  -p PORT     its TCP port\n"
            "  -P PROTO    fc (filecache, default) or http (HTTP/1.1 keep-alive)\n"
            "  -c CONNS    concurrent connections, closed loop (default 1)\n"
            "  -t THREADS  threads, each with its own epoll loop (default 1)\n"
            "  -d SECONDS  run this long\n"
            "  -n COUNT    or stop after COUNT requests\n"
            "  -C          cold: request each listed path once, stop when the list is done\n"
            "  -f FILE     paths to request, one per line (relative to the shared folder)\n"
            "  -u PATH     a single path to request\n"
            "  -r          pick paths at random (default: round-robin over the list)\n"
            "  -T SECONDS  give up after this long when not using -d (default 600)\n"
            "  -L LABEL    copied into the output\n"
            "  -X          open each connection with a PROXY protocol v1 header (a haproxy: port)\n"
            "Prints one JSON object: requests, errors, bytes, seconds, requests_per_s,\n"
            "mb_per_s (10^6 bytes/s of successful replies' bodies, partial ones included),\n"
            "latency_ms {p50,p90,p99,max,mean} of successful replies, client_cpu_s\n"
            "(this process's user+system CPU time, setup included) and client_sys_s\n"
            "(the system part of it).\n");
}

int main(int argc, char **argv)
{
    const char *list = NULL, *single = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "a:p:P:c:t:d:n:Cf:u:rT:L:Xh")) != -1) {
        switch (opt) {
        case 'a': g_addr = optarg; break;
        case 'p': g_port = atoi(optarg); break;
        case 'P':
            if (strcmp(optarg, "fc") == 0)
                g_proto = PROTO_FC;
            else if (strcmp(optarg, "http") == 0)
                g_proto = PROTO_HTTP;
            else
                die("-P: fc or http, not %s", optarg);
            break;
        case 'c': g_conns = atoi(optarg); break;
        case 't': g_threads = atoi(optarg); break;
        case 'd': g_duration = atof(optarg); break;
        case 'n': g_total = strtoull(optarg, NULL, 10); break;
        case 'C': g_cold = 1; break;
        case 'f': list = optarg; break;
        case 'u': single = optarg; break;
        case 'r': g_random = 1; break;
        case 'T': g_timeout = atof(optarg); break;
        case 'L': g_label = optarg; break;
        case 'X': g_proxy_header = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc || g_port <= 0 || g_port > 65535 || g_conns < 1 || g_threads < 1) {
        usage(stderr);
        return 2;
    }
    if (!g_duration && !g_total && !g_cold)
        die("give -d SECONDS, -n COUNT or -C");
    if (g_threads > g_conns)
        g_threads = g_conns;

    memset(&g_sa, 0, sizeof g_sa);
    g_sa.sin_family = AF_INET;
    g_sa.sin_port = htons((uint16_t)g_port);
    if (inet_pton(AF_INET, g_addr, &g_sa.sin_addr) != 1)
        die("-a: not an IPv4 address: %s", g_addr);

    load_paths(list, single);
    signal(SIGPIPE, SIG_IGN);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    worker_t *ws = calloc((size_t)g_threads, sizeof *ws);
    conn_t *conns = calloc((size_t)g_conns, sizeof *conns);
    if (!ws || !conns)
        die("out of memory");
    pthread_barrier_init(&g_barrier, NULL, (unsigned)g_threads + 1);
    int given = 0;
    for (int i = 0; i < g_threads; i++) {
        worker_t *w = &ws[i];
        w->id = i;
        w->nconns = g_conns / g_threads + (i < g_conns % g_threads);
        w->conns = conns + given;
        given += w->nconns;
        w->rng = (0x9E3779B97F4A7C15ull * (uint64_t)(i + 1)) ^ (uint64_t)time(NULL);
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->scratch = malloc(SCRATCH);
        if (w->epfd < 0 || !w->scratch)
            die("setup: %s", strerror(errno));
        if (pthread_create(&w->th, NULL, worker_main, w) != 0)
            die("pthread_create failed");
    }
    pthread_barrier_wait(&g_barrier); /* every connection is up */
    g_t0 = now_ns();
    g_deadline = g_t0 + (uint64_t)((g_duration ? g_duration : g_timeout) * 1e9);
    pthread_barrier_wait(&g_barrier);

    uint64_t requests = 0, errors = 0, bytes = 0, reconnects = 0, t_end = g_t0, nlat = 0;
    for (int i = 0; i < g_threads; i++) {
        pthread_join(ws[i].th, NULL);
        requests += ws[i].requests;
        errors += ws[i].errors;
        bytes += ws[i].bytes;
        reconnects += ws[i].reconnects;
        nlat += ws[i].nlat;
        if (ws[i].t_end > t_end)
            t_end = ws[i].t_end;
    }
    uint64_t *lat = malloc((nlat ? nlat : 1) * sizeof *lat);
    if (!lat)
        die("out of memory");
    size_t k = 0;
    double sum = 0;
    for (int i = 0; i < g_threads; i++) {
        for (size_t j = 0; j < ws[i].nlat; j++) {
            lat[k++] = ws[i].lat[j];
            sum += (double)ws[i].lat[j];
        }
    }
    qsort(lat, nlat, sizeof *lat, cmp_u64);
    double secs = (double)(t_end - g_t0) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu_user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
    double cpu_sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    if (secs <= 0)
        secs = 1e-9;

    printf("{\"label\":");
    json_string(g_label);
    printf(",\"protocol\":\"%s\",\"connections\":%d,\"threads\":%d,\"paths\":%zu,"
           "\"mode\":\"%s\",\"requests\":%llu,\"errors\":%llu,\"reconnects\":%llu,"
           "\"bytes\":%llu,\"seconds\":%.4f,\"requests_per_s\":%.1f,\"mb_per_s\":%.1f,"
           "\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f,\"mean\":%.3f},"
           "\"client_cpu_s\":%.3f,\"client_sys_s\":%.3f,\"timed_out\":%s,\"first_error\":",
           g_proto == PROTO_FC ? "fc" : "http", g_conns, g_threads, g_nreqs,
           g_cold ? "cold" : g_duration ? "duration" : "count", (unsigned long long)requests,
           (unsigned long long)errors, (unsigned long long)reconnects, (unsigned long long)bytes,
           secs, (double)requests / secs, (double)bytes / secs / 1e6, pct_ms(lat, nlat, 50),
           pct_ms(lat, nlat, 90), pct_ms(lat, nlat, 99), nlat ? (double)lat[nlat - 1] / 1e6 : 0.0,
           nlat ? sum / (double)nlat / 1e6 : 0.0, cpu_user + cpu_sys, cpu_sys, atomic_load(&g_timed_out) ? "true" : "false");
    json_string(g_first_error);
    printf("}\n");
    return 0;
}
