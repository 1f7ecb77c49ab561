/* memwork: the lab's PVH guest workload (pid 1's child in the guest's initrd; static binary).
 * Every TICK_MS it advances a counter n, rewrites PAGES_PER_TICK pages of a 16 MiB buffer
 * (each word = n ^ page index, so a page copied to the wrong frame is caught too), records the
 * value each page must hold, and then checks three words (first, middle, last) of EVERY page.
 * It prints one line per tick:   MW n=<n> err=<bad pages this tick> errtot=<bad pages so far>
 * and, when err>0, the first bad page: bad=<page>:<first>/<middle>/<last>!=<expected> (hex).
 * A replica missing a dirty page, holding a torn page or a stale page prints err>0; a replica
 * that took over after failover goes on from the primary's n.                              */
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

int main(void) {
    uint32_t *mem = aligned_alloc(4096, (size_t)NPAGES * 4096);
    if (!mem) { perror("memwork: aligned_alloc"); return 1; }
    for (uint32_t p = 0; p < NPAGES; p++) { want[p] = p; fill(mem + (size_t)p * WORDS, p); }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("MEMWORK start pages=%d per_tick=%d\n", NPAGES, PAGES_PER_TICK);
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
        printf("MW n=%u err=%u errtot=%lu%s\n", n, err, errtot, bad);
        struct timespec d = {0, TICK_MS * 1000000L};
        nanosleep(&d, NULL);
    }
}
