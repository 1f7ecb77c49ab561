/* crep: the lab's minimal C baseline replicator (libxenctrl + libxenforeignmemory + libxendevicemodel).
 * It does per checkpoint what the Python loop does, split the same way, so their PVM pauses compare:
 *   pause S first (docs/architecture.md, "One checkpoint", step 2); primary side (the PVM pause): pause P; log-dirty CLEAN on P; copy P's dirty frames into a
 *     checkpoint cache (indexed by frame number); read P's HVM context; unpause P.
 *   secondary side: CLEAN S; write the union of both dirty sets from the cache into S (S keeps its
 *     own shared_info frame); load the context; wake S's vCPU with an MSI carrying the event upcall
 *     vector; unpause S.
 * Round 0 copies every frame mappable in P.  PVM pause = pause(P) .. unpause(P) returned.
 * usage: crep [-r rounds] [-i interval_ms] [-v upcall_vector] <prim-domid> <sec-domid>
 * output: one line per checkpoint
 *   CREP ckpt=<k> dirty_p=<n> dirty_s=<n> copied=<n> holes=<n> pause_ms=<t> clean_ms=<t> copy_ms=<t> ctx_ms=<t> apply_ms=<t> */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <xenctrl.h>
#include <xendevicemodel.h>
#include <xenforeignmemory.h>

#define BATCH 1024
#define DIE(...) do { fprintf(stderr, "crep: " __VA_ARGS__); fprintf(stderr, ": %s\n", strerror(errno)); exit(1); } while (0)

static xc_interface *xch;
static xenforeignmemory_handle *fmem;
static xendevicemodel_handle *dmod;

static double now_ms(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e3 + t.tv_nsec / 1e6; }

/* map frames g[0..n) of domain d and copy them out to (to_cache) or in from the cache, which holds
 * frame g at cache + g*4096; frame `keep` is left alone; returns frames copied */
static unsigned long copy_cache(uint32_t d, int to_cache, char *cache, const xen_pfn_t *g, unsigned long n,
                                xen_pfn_t keep, unsigned long *holes) {
    static xen_pfn_t a[BATCH];
    static int err[BATCH];
    unsigned long copied = 0;
    for (unsigned long off = 0; off < n; off += BATCH) {
        size_t m = n - off < BATCH ? n - off : BATCH;
        memcpy(a, g + off, m * sizeof *a);
        char *map = xenforeignmemory_map(fmem, d, to_cache ? PROT_READ : PROT_READ | PROT_WRITE, m, a, err);
        if (!map) DIE("xenforeignmemory_map(dom%u, %zu frames)", d, m);
        for (size_t i = 0; i < m; i++) {
            if (err[i]) { (*holes)++; continue; }
            if (g[off + i] == keep) continue;
            if (to_cache) memcpy(cache + g[off + i] * 4096, map + i * 4096, 4096);
            else memcpy(map + i * 4096, cache + g[off + i] * 4096, 4096);
            copied++;
        }
        xenforeignmemory_unmap(fmem, map, m);
    }
    return copied;
}

int main(int argc, char **argv) {
    int rounds = 5, interval = 1000, vector = 0xf3, c;
    while ((c = getopt(argc, argv, "r:i:v:")) != -1) switch (c) {
        case 'r': rounds = atoi(optarg); break;
        case 'i': interval = atoi(optarg); break;
        case 'v': vector = strtol(optarg, NULL, 0); break;
        default: return 2;
    }
    if (argc - optind != 2) { fprintf(stderr, "usage: crep [-r rounds] [-i ms] [-v vector] prim-domid sec-domid\n"); return 2; }
    uint32_t P = atoi(argv[optind]), S = atoi(argv[optind + 1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!(xch = xc_interface_open(NULL, NULL, 0))) DIE("xc_interface_open");
    if (!(fmem = xenforeignmemory_open(NULL, 0))) DIE("xenforeignmemory_open");
    if (!(dmod = xendevicemodel_open(NULL, 0))) DIE("xendevicemodel_open");
    xc_domaininfo_t is;
    if (xc_domain_getinfolist(xch, S, 1, &is) != 1 || is.domain != S) DIE("xc_domain_getinfolist(dom%u)", S);
    xen_pfn_t maxp = 0, maxs = 0;
    if (xc_domain_maximum_gpfn(xch, P, &maxp) < 0 || xc_domain_maximum_gpfn(xch, S, &maxs) < 0) DIE("xc_domain_maximum_gpfn");
    unsigned long nbits = (maxp > maxs ? maxp : maxs) + 1, words = (nbits + 63) / 64;
    int npages = (words * 8 + 4095) / 4096;
    DECLARE_HYPERCALL_BUFFER(unsigned long, bp);
    DECLARE_HYPERCALL_BUFFER(unsigned long, bs);
    bp = xc_hypercall_buffer_alloc_pages(xch, bp, npages);
    bs = xc_hypercall_buffer_alloc_pages(xch, bs, npages);
    if (!bp || !bs) DIE("xc_hypercall_buffer_alloc_pages");
    memset(bp, 0, npages * 4096); memset(bs, 0, npages * 4096);
    xen_pfn_t *plist = malloc(nbits * sizeof *plist), *ulist = malloc(nbits * sizeof *ulist);
    /* P's frames at the last checkpoint; sparse: only the guest's RAM frames are ever touched */
    char *cache = mmap(NULL, nbits * 4096UL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (!plist || !ulist || cache == MAP_FAILED) DIE("allocating lists and the checkpoint cache");
    int ctxsz = xc_domain_hvm_getcontext(xch, P, NULL, 0);
    if (ctxsz <= 0) DIE("xc_domain_hvm_getcontext(size)");
    uint8_t *ctx = malloc(ctxsz);
    if (xc_logdirty_control(xch, P, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY, NULL, 0, 0, NULL) < 0) DIE("ENABLE_LOGDIRTY P");
    if (xc_logdirty_control(xch, S, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY, NULL, 0, 0, NULL) < 0) DIE("ENABLE_LOGDIRTY S");
    xc_shadow_op_stats_t st;
    for (int r = 0; r <= rounds; r++) {
        if (r) usleep(interval * 1000);
        /* the secondary stops first (docs/architecture.md, "One checkpoint", step 2), then the primary side: the PVM pause */
        if (xc_domain_pause(xch, S)) DIE("pause S");
        double t0 = now_ms();
        if (xc_domain_pause(xch, P)) DIE("pause P");
        /* no memset: Xen writes every byte of the requested bitmap range (clean chunks as zeros) */
        if (xc_logdirty_control(xch, P, XEN_DOMCTL_SHADOW_OP_CLEAN, HYPERCALL_BUFFER(bp), nbits, 0, &st) < 0) DIE("CLEAN P");
        double t1 = now_ms();
        unsigned long np_ = 0, dp = 0, holes = 0;
        for (unsigned long w = 0; w < words; w++) {
            unsigned long u = r == 0 ? ~0UL : bp[w];
            dp += __builtin_popcountl(bp[w]);
            for (; u; u &= u - 1) { unsigned long g = w * 64 + __builtin_ctzl(u); if (g < nbits) plist[np_++] = g; }
        }
        copy_cache(P, 1, cache, plist, np_, ~0UL, &holes);
        double t2 = now_ms();
        int len = xc_domain_hvm_getcontext(xch, P, ctx, ctxsz);
        if (len <= 0) DIE("xc_domain_hvm_getcontext(P)");
        double t3 = now_ms();
        if (xc_domain_unpause(xch, P)) DIE("unpause P");
        double t4 = now_ms();
        /* secondary side */
        if (xc_logdirty_control(xch, S, XEN_DOMCTL_SHADOW_OP_CLEAN, HYPERCALL_BUFFER(bs), nbits, 0, &st) < 0) DIE("CLEAN S");
        unsigned long nu = 0, ds = 0;
        for (unsigned long w = 0; w < words; w++) {
            unsigned long u = r == 0 ? ~0UL : bp[w] | bs[w];
            ds += __builtin_popcountl(bs[w]);
            for (; u; u &= u - 1) { unsigned long g = w * 64 + __builtin_ctzl(u); if (g < nbits) ulist[nu++] = g; }
        }
        unsigned long sholes = 0, copied = copy_cache(S, 0, cache, ulist, nu, is.shared_info_frame, &sholes);
        if (xc_domain_hvm_setcontext(xch, S, ctx, len)) DIE("xc_domain_hvm_setcontext(S)");
        for (unsigned v = 0; v <= is.max_vcpu_id; v++)
            if (xendevicemodel_inject_msi(dmod, S, 0xfee00000u | ((2 * v) << 12), vector)) DIE("xendevicemodel_inject_msi(S)");
        if (xc_domain_unpause(xch, S)) DIE("unpause S");
        double t5 = now_ms();
        printf("CREP ckpt=%d dirty_p=%lu dirty_s=%lu copied=%lu holes=%lu pause_ms=%.2f clean_ms=%.2f copy_ms=%.2f ctx_ms=%.2f apply_ms=%.2f\n",
               r, dp, ds, copied, holes, t4 - t0, t1 - t0, t2 - t1, t3 - t2, t5 - t4);
    }
    xc_logdirty_control(xch, P, XEN_DOMCTL_SHADOW_OP_OFF, NULL, 0, 0, NULL);
    xc_logdirty_control(xch, S, XEN_DOMCTL_SHADOW_OP_OFF, NULL, 0, 0, NULL);
    return 0;
}
