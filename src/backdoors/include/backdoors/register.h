/*
 * backdoors registration client — header-only, C99, Linux. No dependency beyond libc.
 *
 * Hands a region (a sealed memfd: a Sensor Box, or a raw region) to the agent of the node
 * this process runs in, over the node's registration socket: what
 * backdoors.common.runtime.register_box / register_region / unregister do in Python.
 * Protocol: docs/agent-protocol.md section 3 (a frame is a 4-byte big-endian length and
 * that much msgpack; the memfd travels with it as SCM_RIGHTS; the reply is {ok, region,
 * error}). Worked example: src/backdoors/examples/c/sensor_service.c.
 *
 *   char err[256];
 *   if (bd_register(NULL, bd_sb_fd(&box), "mysvc", "sensorbox", err, sizeof err) != BD_REG_OK)
 *       fprintf(stderr, "register: %s\n", err);      // e.g. the agent's reason for refusing
 *
 * socket_path NULL means $BACKDOORS_AGENT_SOCKET (set by the node's launcher). Each call
 * opens one connection and closes it; calls are blocking, each read and write waits at most
 * BD_REG_TIMEOUT_MS. The agent keeps its own duplicate of the memfd: the region outlives
 * this process. An agent restarted without its fd store has forgotten the region: register
 * it again (the Python client does that by itself; this one does not watch).
 * SIGPIPE is never raised (MSG_NOSIGNAL). No global state of its own, no thread.
 */
#ifndef BACKDOORS_REGISTER_H
#define BACKDOORS_REGISTER_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define BD_AGENT_SOCKET_ENV "BACKDOORS_AGENT_SOCKET"
#define BD_REG_TIMEOUT_MS 2000
#define BD_REG_MAX_REPLY (64 * 1024) /* the agent's frames are at most 64 KiB */
#define BD_REG_MAX_KIND 32           /* the agent's limits, in bytes (names are ASCII) */
#define BD_REG_MAX_NAME 64

/* What a call returns. On anything but BD_REG_OK, `err` holds a message to print. */
enum bd_reg_status {
    BD_REG_OK = 0,
    BD_REG_INVALID = -1,  /* bad arguments: nothing was sent */
    BD_REG_NO_AGENT = -2, /* no socket named, or connecting, sending or reading failed */
    BD_REG_REFUSED = -3,  /* the agent said no: `err` holds its reason */
    BD_REG_PROTOCOL = -4, /* the reply was not a valid frame of {ok, error, ...} */
};

/* ---- internals: errors, msgpack (exactly what the requests and replies use) --------- */

__attribute__((format(printf, 4, 5)))
static inline int bd__fail(char *err, size_t errlen, int status, const char *fmt, ...) {
    if (err != NULL && errlen > 0) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(err, errlen, fmt, args);
        va_end(args);
    }
    return status;
}

/* A request frame: at most 4 + 1 + (3 + 11) + (5 + 66) + (5 + 34) + (9 + 1) = 139 bytes. */
struct bd__out { uint8_t data[4 + 192]; size_t len; };

static inline void bd__byte(struct bd__out *o, uint8_t b) { o->data[o->len++] = b; }

/* A string of at most 255 bytes (callers check): fixstr or str8. */
static inline void bd__str(struct bd__out *o, const char *s) {
    size_t n = strlen(s);
    if (n < 32) {
        bd__byte(o, (uint8_t)(0xa0 | n));
    } else {
        bd__byte(o, 0xd9);
        bd__byte(o, (uint8_t)n);
    }
    memcpy(o->data + o->len, s, n);
    o->len += n;
}

struct bd__in { const uint8_t *p, *end; };

static inline const uint8_t *bd__take(struct bd__in *in, size_t n) {
    if ((size_t)(in->end - in->p) < n) return NULL;
    const uint8_t *at = in->p;
    in->p += n;
    return at;
}

/* A big-endian unsigned of `n` bytes (1, 2 or 4); -1 if the input ends. */
static inline int bd__be(struct bd__in *in, size_t n, uint32_t *v) {
    const uint8_t *b = bd__take(in, n);
    if (b == NULL) return -1;
    *v = 0;
    for (size_t i = 0; i < n; i++) *v = (*v << 8) | b[i];
    return 0;
}

/* The length of a str at the cursor (its bytes follow); -1 if it is not a str. */
static inline int bd__str_len(struct bd__in *in, uint8_t t, uint32_t *n) {
    if ((t & 0xe0) == 0xa0) { *n = t & 0x1f; return 0; }
    if (t >= 0xd9 && t <= 0xdb) return bd__be(in, (size_t)1 << (t - 0xd9), n);
    return -1;
}

/* Skip one value of any type; -1 if malformed or nested deeper than 16. */
static inline int bd__skip(struct bd__in *in, int depth) {
    const uint8_t *tp = bd__take(in, 1);
    uint32_t n = 0, items = 0;
    if (tp == NULL || depth > 16) return -1;
    uint8_t t = *tp;
    if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) return 0;
    if (bd__str_len(in, t, &n) == 0) return bd__take(in, n) ? 0 : -1;
    if (t >= 0x80 && t <= 0x8f) items = 2u * (t & 0x0f);
    else if (t >= 0x90 && t <= 0x9f) items = t & 0x0f;
    else if (t == 0xdc || t == 0xdd) {
        if (bd__be(in, t == 0xdc ? 2 : 4, &items) < 0) return -1;
    } else if (t == 0xde || t == 0xdf) {
        if (bd__be(in, t == 0xde ? 2 : 4, &n) < 0 || n > UINT32_MAX / 2) return -1;
        items = 2 * n;
    } else if (t >= 0xc4 && t <= 0xc6) {                  /* bin 8/16/32 */
        if (bd__be(in, (size_t)1 << (t - 0xc4), &n) < 0) return -1;
        return bd__take(in, n) ? 0 : -1;
    } else if (t >= 0xc7 && t <= 0xc9) {                  /* ext 8/16/32: type, data */
        if (bd__be(in, (size_t)1 << (t - 0xc7), &n) < 0) return -1;
        return bd__take(in, (size_t)n + 1) ? 0 : -1;
    } else if (t >= 0xd4 && t <= 0xd8) {                  /* fixext 1..16: type, data */
        return bd__take(in, ((size_t)1 << (t - 0xd4)) + 1) ? 0 : -1;
    } else if (t == 0xca || t == 0xcb) {                  /* float 32/64 */
        return bd__take(in, t == 0xca ? 4 : 8) ? 0 : -1;
    } else if (t >= 0xcc && t <= 0xd3) {                  /* uint, int 8..64 */
        return bd__take(in, (size_t)1 << ((t - 0xcc) & 3)) ? 0 : -1;
    } else {
        return -1;                                        /* 0xc1: never used */
    }
    for (uint32_t i = 0; i < items; i++)                  /* each item takes >= 1 byte */
        if (bd__skip(in, depth + 1) < 0) return -1;
    return 0;
}

/* Decode a reply {ok: bool, error: str | nil, ...}: 1 ok, 0 refused (its reason in
 * error/error_len, possibly empty), -1 malformed. */
static inline int bd__reply(const uint8_t *data, size_t len, const char **error,
                            uint32_t *error_len) {
    struct bd__in in = { data, data + len };
    const uint8_t *tp = bd__take(&in, 1);
    uint32_t count = 0;
    int ok = -1;
    *error = "";
    *error_len = 0;
    if (tp == NULL) return -1;
    if (*tp >= 0x80 && *tp <= 0x8f) count = *tp & 0x0f;
    else if (*tp == 0xde || *tp == 0xdf) {
        if (bd__be(&in, *tp == 0xde ? 2 : 4, &count) < 0) return -1;
    } else return -1;
    for (uint32_t i = 0; i < count; i++) {
        uint32_t klen = 0;
        const uint8_t *kt = bd__take(&in, 1), *key;
        if (kt == NULL || bd__str_len(&in, *kt, &klen) < 0) return -1;
        if ((key = bd__take(&in, klen)) == NULL) return -1;
        if (klen == 2 && memcmp(key, "ok", 2) == 0) {
            const uint8_t *v = bd__take(&in, 1);
            if (v == NULL || (*v != 0xc2 && *v != 0xc3)) return -1;
            ok = *v == 0xc3;
        } else if (klen == 5 && memcmp(key, "error", 5) == 0 && in.p < in.end
                   && *in.p != 0xc0) {
            const uint8_t *v = bd__take(&in, 1);
            if (bd__str_len(&in, *v, error_len) < 0) return -1;
            if ((*error = (const char *)bd__take(&in, *error_len)) == NULL) return -1;
        } else if (bd__skip(&in, 1) < 0) {
            return -1;
        }
    }
    return in.p == in.end ? ok : -1;
}

/* Read exactly n bytes; 0, or -1 with errno (0 at end of stream). */
static inline int bd__read(int sock, uint8_t *buf, size_t n) {
    while (n > 0) {
        ssize_t got = recv(sock, buf, n, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            if (got == 0) errno = 0;
            return -1;
        }
        buf += got;
        n -= (size_t)got;
    }
    return 0;
}

/* Send the frame, the fd (if >= 0) attached to its first byte; 0, or -1 with errno. */
static inline int bd__send(int sock, const uint8_t *buf, size_t n, int fd) {
    union { struct cmsghdr align; char space[CMSG_SPACE(sizeof(int))]; } control;
    while (n > 0) {
        struct iovec iov = { (void *)buf, n };
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        if (fd >= 0) {
            memset(&control, 0, sizeof control);
            msg.msg_control = control.space;
            msg.msg_controllen = sizeof control.space;
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(c), &fd, sizeof fd);
        }
        ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR) continue;
        if (sent < 0) return -1;
        buf += sent;
        n -= (size_t)sent;
        fd = -1;  /* the descriptor went with the first bytes */
    }
    return 0;
}

/* The request frame {op, name[, kind, writable]} into `o`; BD_REG_OK or BD_REG_INVALID. */
static inline int bd__request(struct bd__out *o, const char *op, const char *kind,
                              const char *name, int writable, char *err, size_t errlen) {
    size_t nlen = name ? strlen(name) : 0;
    if (nlen == 0 || nlen > BD_REG_MAX_NAME)
        return bd__fail(err, errlen, BD_REG_INVALID, "region name '%s' must have 1 to %d "
                        "characters", name ? name : "", BD_REG_MAX_NAME);
    if (kind != NULL && (*kind == '\0' || strlen(kind) > BD_REG_MAX_KIND))
        return bd__fail(err, errlen, BD_REG_INVALID, "region kind '%s' must have 1 to %d "
                        "characters", kind, BD_REG_MAX_KIND);
    o->len = 4;  /* the length goes first, once known */
    bd__byte(o, (uint8_t)(0x80 | (kind ? 4 : 2)));
    bd__str(o, "op");
    bd__str(o, op);
    bd__str(o, "name");
    bd__str(o, name);
    if (kind != NULL) {
        bd__str(o, "kind");
        bd__str(o, kind);
        bd__str(o, "writable");
        bd__byte(o, writable ? 0xc3 : 0xc2);
    }
    uint32_t payload = (uint32_t)(o->len - 4);
    for (int i = 0; i < 4; i++) o->data[i] = (uint8_t)(payload >> (24 - 8 * i));
    return BD_REG_OK;
}

/* The agent socket to use: `socket_path`, else the environment's; NULL after an error. */
static inline const char *bd__path(const char *socket_path, char *err, size_t errlen) {
    const char *path = socket_path ? socket_path : getenv(BD_AGENT_SOCKET_ENV);
    if (path == NULL || *path == '\0') {
        bd__fail(err, errlen, 0, "no agent socket: pass socket_path or set %s",
                 BD_AGENT_SOCKET_ENV);
        return NULL;
    }
    return path;
}

/* A connection to the agent at `path` with the timeouts set: the socket, or a status < 0. */
static inline int bd__connect(const char *path, char *err, size_t errlen) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path)
        return bd__fail(err, errlen, BD_REG_INVALID, "agent socket %s: the path is too long "
                        "for a Unix socket", path);
    memcpy(addr.sun_path, path, strlen(path));
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return bd__fail(err, errlen, BD_REG_NO_AGENT, "agent socket %s: %s", path,
                        strerror(errno));
    struct timeval tv = { BD_REG_TIMEOUT_MS / 1000, (BD_REG_TIMEOUT_MS % 1000) * 1000 };
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);  /* connect's too */
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno;
        close(sock);
        return bd__fail(err, errlen, BD_REG_NO_AGENT, "agent socket %s: %s", path,
                        strerror(e));
    }
    return sock;
}

/* Send the request frame `o` (with `fd` if >= 0) on `sock` and read the reply. */
static inline int bd__exchange(int sock, const char *path, const struct bd__out *o, int fd,
                               const char *op, const char *name, char *err, size_t errlen) {
    int status;
    uint8_t head[4];
    uint8_t *reply = NULL;
    int send_errno = bd__send(sock, o->data, o->len, fd) < 0 ? errno : 0;
    /* The agent may refuse a connection at accept (one error frame, then close): after
     * EPIPE or ECONNRESET that refusal is still queued here, and it is the answer. */
    if (send_errno != 0 && send_errno != EPIPE && send_errno != ECONNRESET)
        return bd__fail(err, errlen, BD_REG_NO_AGENT, "agent socket %s: %s", path,
                        strerror(send_errno));
    if (bd__read(sock, head, 4) < 0) {
        int e = send_errno ? send_errno : errno;
        return bd__fail(err, errlen, BD_REG_NO_AGENT, "agent socket %s: %s", path,
                        e == 0 ? "the agent closed the connection without a reply"
                        : e == EAGAIN ? "no reply within the timeout" : strerror(e));
    }
    uint32_t len = (uint32_t)head[0] << 24 | (uint32_t)head[1] << 16
                   | (uint32_t)head[2] << 8 | head[3];
    if (len == 0 || len > BD_REG_MAX_REPLY || (reply = malloc(len)) == NULL
        || bd__read(sock, reply, len) < 0) {
        free(reply);
        return bd__fail(err, errlen, BD_REG_PROTOCOL, "agent socket %s: malformed reply "
                        "(a bad or short frame)", path);
    }
    const char *reason;
    uint32_t reason_len;
    int ok = bd__reply(reply, len, &reason, &reason_len);
    if (ok < 0) {
        status = bd__fail(err, errlen, BD_REG_PROTOCOL, "agent socket %s: malformed reply",
                          path);
    } else if (ok) {
        status = bd__fail(err, errlen, BD_REG_OK, "%s", "");
    } else {
        status = bd__fail(err, errlen, BD_REG_REFUSED, "the agent refused %s of '%s': %.*s",
                          op, name, (int)reason_len, reason);
    }
    free(reply);
    return status;
}

/* One request on a connection of its own. */
static inline int bd__call(const char *socket_path, const char *op, const char *kind,
                           const char *name, int writable, int fd, char *err,
                           size_t errlen) {
    struct bd__out o;
    const char *path = bd__path(socket_path, err, errlen);
    if (path == NULL) return BD_REG_NO_AGENT;
    int status = bd__request(&o, op, kind, name, writable, err, errlen);
    if (status != BD_REG_OK) return status;
    int sock = bd__connect(path, err, errlen);
    if (sock < 0) return sock;
    status = bd__exchange(sock, path, &o, fd, op, name, err, errlen);
    close(sock);
    return status;
}

/* ---- the API ------------------------------------------------------------------------ */

/* Register `memfd` under `name` (1-64 of A-Z a-z 0-9 _ . : -) as `kind`: "sensorbox"
 * (NULL means that; a Sensor Box, validated by the agent) or "region". The memfd must be
 * sized and sealed with F_SEAL_SHRINK (bd_sb_init does both). Returns enum bd_reg_status;
 * `err` (may be NULL) receives the reason of a failure, e.g. "the agent refused register
 * of 'svc': the memfd is not sealed against shrinking: ...". `memfd` stays open here. */
static inline int bd_register(const char *socket_path, int memfd, const char *name,
                              const char *kind, char *err, size_t errlen) {
    if (memfd < 0)
        return bd__fail(err, errlen, BD_REG_INVALID, "no memfd to register as '%s'",
                        name ? name : "");
    return bd__call(socket_path, "register", kind ? kind : "sensorbox", name, 0, memfd, err,
                    errlen);
}

/* bd_register of a region that monitors may also write through the agent (a mailbox):
 * the memfd must be open read-write and not sealed against writes. */
static inline int bd_register_writable(const char *socket_path, int memfd, const char *name,
                                       char *err, size_t errlen) {
    if (memfd < 0)
        return bd__fail(err, errlen, BD_REG_INVALID, "no memfd to register as '%s'",
                        name ? name : "");
    return bd__call(socket_path, "register", "region", name, 1, memfd, err, errlen);
}

/* Withdraw the node's region `name`; the agent closes its copy. Same returns. */
static inline int bd_unregister(const char *socket_path, const char *name, char *err,
                                size_t errlen) {
    return bd__call(socket_path, "unregister", NULL, name, 0, -1, err, errlen);
}

#endif /* BACKDOORS_REGISTER_H */
