/* memwork: the lab's PVH guest workload (the guest's init starts one per vCPU; static binary).
 *     memwork CPU
 * pins itself to CPU (sched_setaffinity: one instance per vCPU, so every vCPU runs guest code,
 * takes its own timer events and is checked) and, every TICK_MS, advances a counter n, rewrites
 * PAGES_PER_TICK pages of its own 16 MiB buffer (each word = n ^ page index, so a page copied to
 * the wrong frame is caught too), records the value each page must hold, and then checks three
 * words (first, middle, last) of EVERY page. It prints one line per tick:
 *     MW cpu=<CPU> n=<n> err=<bad pages this tick> errtot=<bad pages so far> mono=<s.us> on=<cpu>
 * mono: the guest's own CLOCK_MONOTONIC at the line (issue 17, item 6: after a checkpoint or a
 * failover it must neither step back nor jump ahead of the time that really passed); on: the
 * CPU the line was printed from (sched_getcpu), which must be CPU. When err>0 the first bad page
 * follows: bad=<page>:<first>/<middle>/<last>!=<expected> (hex). A replica missing a dirty page,
 * holding a torn page or a stale page prints err>0; a replica that took over after failover goes
 * on from the primary's n, on every vCPU.                                                   */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NPAGES 4096
#define WORDS (4096 / 4)
#define PAGES_PER_TICK 48
#define TICK_MS 100

static uint32_t want[NPAGES];

static void fill(uint32_t *page, uint32_t value) { for (int w = 0; w < WORDS; w++) page[w] = value; }

int main(int argc, char **argv) {
    int cpu = argc > 1 ? atoi(argv[1]) : 0;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (sched_setaffinity(0, sizeof one, &one)) {
        printf("MEMWORK cpu=%d error=affinity (%s)\n", cpu, strerror(errno));
        return 1;
    }
    uint32_t *mem = aligned_alloc(4096, (size_t)NPAGES * 4096);
    if (!mem) { perror("memwork: aligned_alloc"); return 1; }
    for (uint32_t p = 0; p < NPAGES; p++) { want[p] = p; fill(mem + (size_t)p * WORDS, p); }
    printf("MEMWORK start cpu=%d pages=%d per_tick=%d\n", cpu, NPAGES, PAGES_PER_TICK);
    unsigned long errtot = 0;
    for (uint32_t n = 1;; n++) {
        for (uint32_t j = 0; j < PAGES_PER_TICK; j++) {
            uint32_t p = (n * 97u + j * 61u) % NPAGES;   /* scattered, not sequential */
            want[p] = n ^ p;
            fill(mem + (size_t)p * WORDS, want[p]);
        }
        unsigned err = 0;
        char bad[96] = "";
        for (uint32_t p = 0; p < NPAGES; p++) {
            const uint32_t *page = mem + (size_t)p * WORDS;
            if (page[0] != want[p] || page[WORDS / 2] != want[p] || page[WORDS - 1] != want[p]) {
                if (!err++) snprintf(bad, sizeof bad, " bad=%u:%x/%x/%x!=%x", p, page[0], page[WORDS / 2],
                                     page[WORDS - 1], want[p]);
            }
        }
        errtot += err;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        printf("MW cpu=%d n=%u err=%u errtot=%lu mono=%lld.%06ld on=%d%s\n", cpu, n, err, errtot,
               (long long)now.tv_sec, now.tv_nsec / 1000, sched_getcpu(), bad);
        struct timespec d = {0, TICK_MS * 1000000L};
        nanosleep(&d, NULL);
    }
}
