/* vcpuinfo: the lab guest's own word on where it registered each vCPU's vcpu_info with Xen
 * (VCPUOP_register_vcpu_info: a guest frame and an offset in it), printed for dom0:
 *     VCPUINFO cpu=<linux cpu> vcpu=<xen vcpu id> gfn=<hex> offset=<hex> registered=<0|1>
 * one line per online CPU (or "VCPUINFO error=..." when it cannot tell), then always
 *     VCPUINFO end lines=<the lines before it>
 * so dom0 knows when a report is whole (and a report it sees the tail of is not). issue 17, item 5:
 * Xen 4.17 tells dom0 nothing of a vCPU's registration (only struct vcpu holds it), so the lab
 * asks the guest, which knows for certain, instead of dom0 guessing by watching memory.
 *
 * How: Linux keeps, per CPU, `xen_vcpu` (a pointer to the vcpu_info it uses) and `xen_vcpu_info`
 * (the block it registers; after a save/restore it registers the same block again,
 * xen_vcpu_setup_restore). /proc/kallsyms gives the per-CPU offsets of both and the address of
 * __per_cpu_offset; /proc/kcore (an ELF image of kernel memory whose segments carry physical
 * addresses) reads them. registered=1 when the pointer is the registered block; a PVH/HVM
 * guest's frame numbers are its physical ones. The per-CPU base is checked against the CPU's
 * own `this_cpu_off` before anything is printed. */
#include <elf.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static Elf64_Phdr seg[256];
static int nseg, kcore = -1;
static int printed;   /* report lines so far, for the end line */

#define say(...) (printed++, printf(__VA_ARGS__))

static int end_report(int rc) {
    printf("VCPUINFO end lines=%d\n", printed);
    return rc;
}

static int symbol(const char *name, uint64_t *value) {
    FILE *f = fopen("/proc/kallsyms", "r");
    if (!f) return -1;
    char line[512], type, sym[256];
    unsigned long long v;
    int found = -1;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%llx %c %255s", &v, &type, sym) == 3 && !strcmp(sym, name)) {
            *value = v;
            found = 0;
            break;
        }
    }
    fclose(f);
    return found;
}

static int open_kcore(void) {
    kcore = open("/proc/kcore", O_RDONLY);
    if (kcore < 0) return -1;
    Elf64_Ehdr eh;
    if (pread(kcore, &eh, sizeof eh, 0) != sizeof eh || memcmp(eh.e_ident, ELFMAG, SELFMAG)) return -1;
    for (int i = 0; i < eh.e_phnum && nseg < 256; i++) {
        Elf64_Phdr ph;
        if (pread(kcore, &ph, sizeof ph, eh.e_phoff + (uint64_t)i * eh.e_phentsize) != sizeof ph) return -1;
        if (ph.p_type == PT_LOAD) seg[nseg++] = ph;
    }
    return nseg ? 0 : -1;
}

static const Elf64_Phdr *segment_of(uint64_t vaddr) {
    for (int i = 0; i < nseg; i++)
        if (vaddr >= seg[i].p_vaddr && vaddr - seg[i].p_vaddr < seg[i].p_memsz) return &seg[i];
    return NULL;
}

static int read_kernel(uint64_t vaddr, void *out, size_t n) {
    const Elf64_Phdr *s = segment_of(vaddr);
    if (!s) return -1;
    return pread(kcore, out, n, s->p_offset + (vaddr - s->p_vaddr)) == (ssize_t)n ? 0 : -1;
}

int main(void) {
    uint64_t pco, off_vcpu, off_info, off_id, off_self;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (symbol("__per_cpu_offset", &pco) || symbol("xen_vcpu", &off_vcpu) ||
        symbol("xen_vcpu_info", &off_info) || symbol("xen_vcpu_id", &off_id) || symbol("this_cpu_off", &off_self)) {
        say("VCPUINFO error=symbols (need /proc/kallsyms with __per_cpu_offset, xen_vcpu, xen_vcpu_info, "
            "xen_vcpu_id, this_cpu_off)\n");
        return end_report(1);
    }
    if (open_kcore()) { say("VCPUINFO error=kcore (cannot read /proc/kcore)\n"); return end_report(1); }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    for (long cpu = 0; cpu < cpus; cpu++) {
        uint64_t base, self, ptr;
        uint32_t vcpu;
        if (read_kernel(pco + 8 * cpu, &base, 8) || read_kernel(base + off_self, &self, 8) || self != base) {
            say("VCPUINFO cpu=%ld error=percpu (base %#llx, its this_cpu_off %#llx)\n", cpu,
                (unsigned long long)base, (unsigned long long)self);
            continue;
        }
        if (read_kernel(base + off_vcpu, &ptr, 8) || read_kernel(base + off_id, &vcpu, 4)) {
            say("VCPUINFO cpu=%ld error=read\n", cpu);
            continue;
        }
        const Elf64_Phdr *s = segment_of(ptr);
        if (!s || s->p_paddr == (Elf64_Addr)-1) {
            say("VCPUINFO cpu=%ld vcpu=%u error=nophys (xen_vcpu %#llx)\n", cpu, vcpu, (unsigned long long)ptr);
            continue;
        }
        uint64_t phys = s->p_paddr + (ptr - s->p_vaddr);
        say("VCPUINFO cpu=%ld vcpu=%u gfn=%#llx offset=%#llx registered=%d\n", cpu, vcpu,
            (unsigned long long)(phys >> 12), (unsigned long long)(phys & 0xfff), ptr == base + off_info);
    }
    return end_report(0);
}
