/* Test program: writes a Sensor Box with the C header, for the Python reader to check.
 * Usage: sb_writer PATH   -> box in a file at PATH, then exit
 *        sb_writer -      -> box in a memfd; prints "PID FD", waits for stdin to close */
#include "backdoors/sensorbox.h" /* first: it needs _GNU_SOURCE for memfd_create */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    const char *path = argv[1][0] == '-' ? NULL : argv[1];
    struct bd_sensorbox box;
    int rc = bd_sb_init(&box, "c-service", 8, path);
    if (rc < 0) { fprintf(stderr, "bd_sb_init: %s\n", strerror(-rc)); return 1; }
    struct bd_sensor *req = bd_sb_progress(&box, "requests", 0.25);
    struct bd_sensor *mem = bd_sb_level(&box, "cache_mb", 10.0, 512.0);
    struct bd_sensor *low = bd_sb_level(&box, "free_slots", 2.0, NAN);
    struct bd_sensor *err = bd_sb_pressure(&box, "errors", 100, 1.0);
    if (!req || !mem || !low || !err) return 3;
    if (bd_sb_level(&box, "bad", 5.0, 1.0) != NULL) return 4;  /* min > max refused */
    for (int i = 0; i < 1000; i++) bd_sb_tick(req);
    for (int i = 0; i < 7; i++) bd_sb_event(err);
    bd_sb_set(mem, 300.5);
    bd_sb_set(low, 1.0);
    if (path) { bd_sb_close(&box); return 0; }
    printf("%d %d\n", getpid(), bd_sb_fd(&box));
    fflush(stdout);
    char buf[16];
    while (fread(buf, 1, sizeof buf, stdin) > 0) {}
    bd_sb_close(&box);
    return 0;
}
