/* A C service with a Sensor Box, registered with the agent of the node it runs in.
 *
 *   cc -O2 -Wall -Wextra -I"$(backdoors config include-dir)" sensor_service.c -o sensor_service -lm
 *   backdoors node run web -- ./sensor_service web-box
 *
 * The node's launcher sets BACKDOORS_AGENT_SOCKET. The service registers its box (named
 * argv[1], default "c-service"), prints "registered NAME", then ticks "requests" every
 * 10 ms and sets "queue_depth". On SIGTERM or SIGINT it unregisters the box and exits 0.
 * Refused (run outside a node, say): the agent's reason on stderr, exit status 1.
 * tests/test_c_register.py compiles and runs this very file; docs/sensor-box.md shows it.
 */
#include "backdoors/sensorbox.h" /* first: memfd_create needs _GNU_SOURCE */
#include "backdoors/register.h"
#include <signal.h>
#include <stdio.h>
#include <time.h>

static volatile sig_atomic_t stopping;

static void on_stop(int sig) { (void)sig; stopping = 1; }

int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "c-service";
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    struct bd_sensorbox box;
    int rc = bd_sb_init(&box, name, 8, NULL); /* a memfd sealed against shrink and grow */
    if (rc < 0) {
        fprintf(stderr, "sensor box %s: %s\n", name, strerror(-rc));
        return 1;
    }
    struct bd_sensor *requests = bd_sb_progress(&box, "requests", 1.0);
    struct bd_sensor *queue = bd_sb_level(&box, "queue_depth", NAN, 100.0);
    if (requests == NULL || queue == NULL) {
        fprintf(stderr, "sensor box %s: cannot add the sensors\n", name);
        bd_sb_close(&box);
        return 1;
    }

    char err[512];
    if (bd_register(NULL, bd_sb_fd(&box), name, "sensorbox", err, sizeof err) != BD_REG_OK) {
        fprintf(stderr, "register: %s\n", err);
        bd_sb_close(&box);
        return 1;
    }
    printf("registered %s\n", name);
    fflush(stdout);

    const struct timespec pause = { 0, 10 * 1000 * 1000 };
    for (unsigned long i = 0; !stopping; i++) {
        bd_sb_tick(requests); /* one memory store each: no system call */
        bd_sb_set(queue, (double)(i % 10));
        nanosleep(&pause, NULL);
    }

    int status = 0;
    if (bd_unregister(NULL, name, err, sizeof err) != BD_REG_OK) {
        fprintf(stderr, "unregister: %s\n", err);
        status = 1;
    }
    bd_sb_close(&box); /* after a crash instead, the agent would still hold the box */
    return status;
}
