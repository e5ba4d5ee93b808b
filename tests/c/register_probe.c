/* Test program for backdoors/register.h. Prints one line "STATUS MESSAGE" per call.
 *   register_probe sealed|unsealed region|writable|sensorbox NAME [COUNT]
 *       registers a 4 KiB memfd (a region, or as a Sensor Box it is not) COUNT times
 *   register_probe unregister NAME      bd_unregister
 *   register_probe late NAME            connects, waits until the agent has closed the
 *       connection (it refuses outsiders at accept), then sends a register: EPIPE, and the
 *       refusal queued before it is still the answer
 *   register_probe reply                decodes a reply payload from stdin: "1", "0 REASON" or "-1"
 */
#include "backdoors/register.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>

static int memfd(int sealed) {
    int fd = memfd_create("probe", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, 4096) < 0) return -1;
    if (sealed && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) return -1;
    return fd;
}

int main(int argc, char **argv) {
    char err[1024];
    if (argc == 2 && strcmp(argv[1], "reply") == 0) {
        static uint8_t buf[BD_REG_MAX_REPLY];
        size_t n = fread(buf, 1, sizeof buf, stdin);
        const char *reason;
        uint32_t len;
        int ok = bd__reply(buf, n, &reason, &len);
        if (ok == 0) printf("0 %.*s\n", (int)len, reason);
        else printf("%d\n", ok);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "unregister") == 0) {
        int rc = bd_unregister(NULL, argv[2], err, sizeof err);
        printf("%d %s\n", rc, err);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "late") == 0) {
        struct bd__out o;
        const char *path = bd__path(NULL, err, sizeof err);
        int fd = memfd(1);
        if (path == NULL || fd < 0 || bd__request(&o, "register", "region", argv[2], 0, err,
                                                  sizeof err) != BD_REG_OK) return 2;
        int sock = bd__connect(path, err, sizeof err);
        if (sock < 0) { printf("%d %s\n", sock, err); return 0; }
        struct pollfd p = { .fd = sock, .events = POLLRDHUP };
        if (poll(&p, 1, 10000) != 1 || !(p.revents & (POLLRDHUP | POLLHUP))) return 3;
        int rc = bd__exchange(sock, path, &o, fd, "register", argv[2], err, sizeof err);
        printf("%d %s\n", rc, err);
        return 0;
    }
    if (argc < 4) return 2;
    int count = argc > 4 ? atoi(argv[4]) : 1;
    int fd = memfd(strcmp(argv[1], "sealed") == 0);
    if (fd < 0) { perror("memfd"); return 2; }
    for (int i = 0; i < count; i++) {
        int rc = strcmp(argv[2], "writable") == 0
                     ? bd_register_writable(NULL, fd, argv[3], err, sizeof err)
                     : bd_register(NULL, fd, argv[3], argv[2], err, sizeof err);
        printf("%d %s\n", rc, err);
    }
    close(fd);
    return 0;
}
