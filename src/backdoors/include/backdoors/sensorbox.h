/*
 * backdoors Sensor Box writer, ABI version 1 — header-only, C11, Linux.
 *
 * A Sensor Box is a shared-memory region the backdoors agent reads from outside the
 * process. Updating a sensor is an aligned 64-bit store (a progress tick: two, its time
 * and its count): no system call, no lock.
 * Layout: docs/sensor-box.md (the Python reader, src/backdoors/sensors/abi.py, is the
 * reference). Little-endian machines only. `cc -I"$(backdoors config include-dir)"` finds
 * it; backdoors/register.h hands the box to the node's agent.
 *
 *   struct bd_sensorbox box;
 *   bd_sb_init(&box, "mysvc", 64, NULL);                  // memfd; 0 or -errno
 *   struct bd_sensor *req = bd_sb_progress(&box, "requests", 0.2);
 *   struct bd_sensor *mem = bd_sb_level(&box, "cache_mb", NAN, 512.0);
 *   struct bd_sensor *err = bd_sb_pressure(&box, "errors", 100, 1.0);
 *   bd_sb_tick(req); bd_sb_set(mem, 300.0); bd_sb_event(err);
 *
 * Hand bd_sb_fd(&box) to the agent to have the box watched: bd_register() of
 * backdoors/register.h.
 * Include this header before any system header (or build with -D_GNU_SOURCE):
 * memfd_create needs _GNU_SOURCE.
 */
#ifndef BACKDOORS_SENSORBOX_H
#define BACKDOORS_SENSORBOX_H

#if !defined(_GNU_SOURCE) && defined(_FEATURES_H)
#error "include backdoors/sensorbox.h before any system header, or build with -D_GNU_SOURCE"
#endif
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define BD_SB_MAGIC "BDSB"
#define BD_SB_VERSION 1
#define BD_SB_HEADER_SIZE 64
#define BD_SB_SLOT_SIZE 64
#define BD_SB_NAME_SIZE 32
#define BD_SB_MAX_CAPACITY 4096

enum bd_sensor_type { BD_PROGRESS = 1, BD_LEVEL = 2, BD_PRESSURE = 3 };
enum { BD_LEVEL_HAS_MIN = 1, BD_LEVEL_HAS_MAX = 2 };

struct bd_sb_header {
    char magic[4];
    uint16_t version;
    uint16_t header_size;
    uint32_t slot_size;
    uint32_t capacity;
    uint32_t count;
    uint32_t owner_pid;
    uint64_t generation;        /* odd while a sensor is being added */
    char name[BD_SB_NAME_SIZE];
};

struct bd_sensor {
    uint32_t id;                /* 1-based, equal to slot index + 1 */
    uint8_t type;               /* enum bd_sensor_type */
    uint8_t flags;              /* level: BD_LEVEL_HAS_MIN | BD_LEVEL_HAS_MAX */
    uint16_t reserved;
    union { uint64_t count; double level; } value;
    double threshold;           /* progress: deadline s; level: max; pressure: max events */
    union {
        double param;           /* level: min; pressure: window s */
        uint64_t moved_ns;      /* progress: CLOCK_MONOTONIC ns of the last move (bd_sb_tick) */
    };
    char name[BD_SB_NAME_SIZE];
};

_Static_assert(sizeof(struct bd_sb_header) == BD_SB_HEADER_SIZE, "header is 64 bytes");
_Static_assert(sizeof(struct bd_sensor) == BD_SB_SLOT_SIZE, "slot is 64 bytes");

struct bd_sensorbox {
    int fd;
    struct bd_sb_header *hdr;
    struct bd_sensor *slots;
    size_t size;
};

static inline size_t bd_sb_size(uint32_t capacity) {
    return BD_SB_HEADER_SIZE + (size_t)capacity * BD_SB_SLOT_SIZE;
}

static inline int bd__name(char dst[BD_SB_NAME_SIZE], const char *src) {
    size_t n = strlen(src);
    if (n == 0 || n >= BD_SB_NAME_SIZE) return -1;
    memset(dst, 0, BD_SB_NAME_SIZE);
    memcpy(dst, src, n);
    return 0;
}

/* Create a box with room for `capacity` sensors: in a sealed memfd when `path` is NULL,
 * else in a new file at `path` (use a tmpfs such as /dev/shm). Returns 0 or -errno (always
 * negative); on failure `*box` is left empty (fd -1): adding to it gives NULL, closing it
 * does nothing. */
static inline int bd_sb_init(struct bd_sensorbox *box, const char *name, uint32_t capacity,
                             const char *path) {
    *box = (struct bd_sensorbox){ .fd = -1, .hdr = NULL, .slots = NULL, .size = 0 };
    if (capacity == 0 || capacity > BD_SB_MAX_CAPACITY) return -EINVAL;
    char nm[BD_SB_NAME_SIZE];
    if (bd__name(nm, name) < 0) return -EINVAL;
    size_t size = bd_sb_size(capacity);
    int fd = path ? open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600)
                  : memfd_create("sensorbox", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return -errno;
    if (ftruncate(fd, (off_t)size) < 0) goto fail;
    if (!path && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) goto fail;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) goto fail;
    box->fd = fd;
    box->size = size;
    box->hdr = (struct bd_sb_header *)p;
    box->slots = (struct bd_sensor *)((char *)p + BD_SB_HEADER_SIZE);
    memcpy(box->hdr->magic, BD_SB_MAGIC, 4);
    box->hdr->version = BD_SB_VERSION;
    box->hdr->header_size = BD_SB_HEADER_SIZE;
    box->hdr->slot_size = BD_SB_SLOT_SIZE;
    box->hdr->capacity = capacity;
    box->hdr->count = 0;
    box->hdr->owner_pid = (uint32_t)getpid();
    box->hdr->generation = 0;
    memcpy(box->hdr->name, nm, BD_SB_NAME_SIZE);
    return 0;
fail:;
    int err = errno > 0 ? errno : EIO;  /* negative for sure: callers test rc < 0 */
    close(fd);
    if (path) unlink(path);
    return -err;
}

static inline int bd_sb_fd(const struct bd_sensorbox *box) { return box->fd; }

/* Add a sensor under the generation seqlock; NULL if the box is full or args invalid. */
static inline struct bd_sensor *bd__add(struct bd_sensorbox *box, const char *name, uint8_t type,
                                        uint8_t flags, double threshold, double param) {
    struct bd_sb_header *h = box->hdr;
    if (h == NULL || h->count >= h->capacity) return NULL;
    char nm[BD_SB_NAME_SIZE];
    if (bd__name(nm, name) < 0) return NULL;
    uint64_t gen = h->generation;
    __atomic_store_n(&h->generation, gen + 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    struct bd_sensor *s = &box->slots[h->count];
    s->id = h->count + 1;
    s->type = type;
    s->flags = flags;
    s->reserved = 0;
    s->value.count = 0;
    s->threshold = threshold;
    s->param = param;
    memcpy(s->name, nm, BD_SB_NAME_SIZE);
    __atomic_store_n(&h->count, h->count + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&h->generation, gen + 2, __ATOMIC_RELEASE);
    return s;
}

static inline struct bd_sensor *bd_sb_progress(struct bd_sensorbox *box, const char *name,
                                               double deadline_s) {
    if (!(deadline_s > 0) || !isfinite(deadline_s)) return NULL;
    return bd__add(box, name, BD_PROGRESS, 0, deadline_s, 0);
}

/* Pass NAN for an absent bound. */
static inline struct bd_sensor *bd_sb_level(struct bd_sensorbox *box, const char *name,
                                            double min, double max) {
    uint8_t flags = (isnan(min) ? 0 : BD_LEVEL_HAS_MIN) | (isnan(max) ? 0 : BD_LEVEL_HAS_MAX);
    if (!flags || (flags == (BD_LEVEL_HAS_MIN | BD_LEVEL_HAS_MAX) && min > max)) return NULL;
    return bd__add(box, name, BD_LEVEL, flags, isnan(max) ? 0 : max, isnan(min) ? 0 : min);
}

static inline struct bd_sensor *bd_sb_pressure(struct bd_sensorbox *box, const char *name,
                                               double max_events, double window_s) {
    if (!(max_events > 0) || !(window_s > 0) || !isfinite(max_events) || !isfinite(window_s))
        return NULL;
    return bd__add(box, name, BD_PRESSURE, 0, max_events, window_s);
}

/* The update path: aligned 64-bit stores. One writer per sensor. A progress tick stores
 * the time of the move first, then the count (release: a reader that sees the count sees
 * that time or a later one); the agent then reads the counter once per deadline. */
static inline void bd_sb_tick(struct bd_sensor *s) {
    if (s->type == BD_PROGRESS) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        __atomic_store_n(&s->moved_ns, (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec,
                         __ATOMIC_RELAXED);
    }
    __atomic_store_n(&s->value.count, s->value.count + 1, __ATOMIC_RELEASE);
}
/* A pressure event; on a progress counter, a tick (so every move of it is stamped). */
static inline void bd_sb_event(struct bd_sensor *s) { bd_sb_tick(s); }
static inline void bd_sb_set(struct bd_sensor *s, double v) {
    union { double d; uint64_t u; } x = { .d = v };
    __atomic_store_n(&s->value.count, x.u, __ATOMIC_RELAXED);
}

/* Unmap and close the box (an empty or closed one: nothing to do). A registered box stays
 * with the agent, which holds its own duplicate of the memfd. */
static inline void bd_sb_close(struct bd_sensorbox *box) {
    if (box->hdr != NULL) munmap(box->hdr, box->size);
    if (box->fd >= 0) close(box->fd);
    *box = (struct bd_sensorbox){ .fd = -1, .hdr = NULL, .slots = NULL, .size = 0 };
}

#endif /* BACKDOORS_SENSORBOX_H */
