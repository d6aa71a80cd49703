// SPDX-License-Identifier: GPL-2.0
/*
 * ldt_kvm_test: tests of the ldt_kvm module (kmod/), run inside the nested
 * machine (a KVM host with AMD SVM + NPT, see tests/kmod-nested.sh).
 *
 * It is its own tiny VMM: /dev/kvm, one VM, one vCPU in 64-bit ring 0
 * running a hand-written loop that writes one byte to each page of a list
 * the test gives it per round (port 0x510 = "round done"), or executes one
 * WRMSR (to make KVM itself write guest memory).  After each round it
 * harvests through /dev/ldt-kvm and checks: every written page reported
 * (never a miss); false positives counted; optionally KVM_GET_DIRTY_LOG on
 * the same rounds (the interaction of both).
 *
 * Usage: ldt_kvm_test [--seed N] [--pages N] [--rounds N] [TEST...]
 *        ldt_kvm_test hold FILE     attach, write FILE, wait for SIGTERM
 * Output: "ok N - name" / "not ok N - name" lines, "# ..." diagnostics,
 * last line "ldt_kvm_test: N passed, M failed"; exit status 0 iff none
 * failed.  Static build: gcc -O2 -static -Wall -Wextra -o ldt_kvm_test ...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../uapi/ldt_kvm.h"

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

#define PAGE 4096UL
#define SYS_GPA 0x0UL
#define SYS_SIZE (2UL << 20)
/* across the 1 GiB boundary: the module walks in 1 GiB chunks */
#define DATA_GPA ((1UL << 30) - (8UL << 20))
#define PML4_GPA 0x1000UL
#define PDPT_GPA 0x2000UL
#define PD_GPA 0x3000UL /* 4 page directories: 0x3000..0x6fff */
#define CODE_GPA 0x8000UL
#define CMD_GPA 0x10000UL
#define LIST_GPA 0x20000UL /* up to (2 MiB - 128 KiB) / 4 entries */
#define SYNC_PORT 0x510
#define MSR_KVM_WALL_CLOCK_NEW 0x4b564d00

/* ------------------------------------------------------------------------ */
/* reporting                                                                 */

static int n_ok, n_fail, n_test;
static uint64_t seed = 0x1dc0ffee;
static unsigned long opt_pages = 4096;
static int opt_rounds = 8;

static void diag(const char *fmt, ...)
{
	va_list ap;

	printf("# ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

static bool check(bool cond, const char *fmt, ...)
{
	va_list ap;

	n_test++;
	printf("%s %d - ", cond ? "ok" : "not ok", n_test);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (cond)
		n_ok++;
	else
		n_fail++;
	return cond;
}

/* expect ioctl(fd, req, arg) to fail with errno e */
static void check_errno(int fd, unsigned long req, void *arg, int e,
			const char *name)
{
	int r = ioctl(fd, req, arg);
	int got = r < 0 ? errno : 0;

	check(r < 0 && got == e, "%s -> %s (got %d, %s)", name, strerror(e), r,
	      r < 0 ? strerror(got) : "success");
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint64_t rnd(void)
{
	seed ^= seed << 13;
	seed ^= seed >> 7;
	seed ^= seed << 17;
	return seed;
}

static void die(const char *what)
{
	printf("not ok %d - fatal: %s: %s\n", ++n_test, what, strerror(errno));
	printf("ldt_kvm_test: %d passed, %d failed\n", n_ok, n_fail + 1);
	exit(1);
}

/* ------------------------------------------------------------------------ */
/* the guest                                                                 */

/*
 * 64-bit ring-0 loop.  Command block at CMD_GPA:
 *   +0 op (0 = write list, 1 = wrmsr, 2 = write cyclically until +72 != 0,
 *          counting writes in +64, spinning +80 iterations after each)
 *                                      +8 count / msr value low
 *   +16 data base GPA / value high      +24 byte value / msr index
 *   +32 list GPA (u32 page indices)
 */
extern const uint8_t guest_code[], guest_code_end[];
__asm__(".pushsection .rodata\n"
	".globl guest_code, guest_code_end\n"
	"guest_code:\n"
	"	.code64\n"
	"	mov $0x10000, %rsi\n"
	"1:	xor %eax, %eax\n"
	"	mov $0x510, %edx\n"
	"	out %eax, %dx\n"
	"	mov 0(%rsi), %rcx\n"
	"	cmp $1, %rcx\n"
	"	je 3f\n"
	"	cmp $2, %rcx\n"
	"	je 4f\n"
	"	mov 8(%rsi), %rcx\n"
	"	mov 16(%rsi), %rbx\n"
	"	mov 24(%rsi), %r8\n"
	"	mov 32(%rsi), %rdi\n"
	"2:	test %rcx, %rcx\n"
	"	jz 1b\n"
	"	mov (%rdi), %eax\n"
	"	shl $12, %rax\n"
	"	add %rbx, %rax\n"
	"	mov %r8b, (%rax)\n"
	"	add $4, %rdi\n"
	"	dec %rcx\n"
	"	jmp 2b\n"
	"3:	mov 8(%rsi), %eax\n"
	"	mov 16(%rsi), %edx\n"
	"	mov 24(%rsi), %ecx\n"
	"	wrmsr\n"
	"	jmp 1b\n"
	/* op 2: write pages 0, 1, ..., n-1, 0, ... until told to stop;
	 * +64: number of writes done (stored after each write), +72: stop */
	"4:	xor %r9, %r9\n"
	"	mov 8(%rsi), %rcx\n"
	"	mov 16(%rsi), %rbx\n"
	"5:	mov %r9, %rax\n"
	"	xor %edx, %edx\n"
	"	div %rcx\n"
	"	mov %rdx, %rax\n"
	"	shl $12, %rax\n"
	"	add %rbx, %rax\n"
	"	mov %r9b, (%rax)\n"
	"	inc %r9\n"
	"	mov %r9, 64(%rsi)\n"
	"	mov 80(%rsi), %r10\n"
	"6:	test %r10, %r10\n"
	"	jz 7f\n"
	"	dec %r10\n"
	"	jmp 6b\n"
	"7:	cmpq $0, 72(%rsi)\n"
	"	je 5b\n"
	"	jmp 1b\n"
	"guest_code_end:\n"
	".popsection\n");

struct vm {
	int kvm, vm, vcpu;
	struct kvm_run *run;
	size_t run_size;
	uint8_t *sys;
	uint8_t *data;		/* host mapping of the data slot */
	size_t data_map;	/* mapped bytes (maybe more than the slot, for alignment) */
	uint8_t *data_base;	/* what we mmap'ed */
	unsigned long pages;
	uint32_t data_flags;
	int memfd;
};

struct vm_opts {
	unsigned long pages;
	bool log_dirty;		/* KVM_MEM_LOG_DIRTY_PAGES on the data slot */
	bool manual_init_set;	/* KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 3 */
	bool memfd;		/* data slot backed by a memfd (shmem) */
	bool thp;		/* MADV_HUGEPAGE on a 2 MiB aligned mapping */
};

static int set_slot(struct vm *v, int slot, uint64_t gpa, void *hva,
		    uint64_t size, uint32_t flags)
{
	struct kvm_userspace_memory_region r = {
		.slot = slot, .flags = flags, .guest_phys_addr = gpa,
		.memory_size = size, .userspace_addr = (uint64_t)hva,
	};

	return ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &r);
}

static void vm_setup_cpu(struct vm *v)
{
	struct kvm_sregs sr;
	struct kvm_regs regs;
	struct {
		struct kvm_cpuid2 c;
		struct kvm_cpuid_entry2 e[256];
	} cpuid = { .c.nent = 256 };
	uint64_t *pml4 = (uint64_t *)(v->sys + PML4_GPA);
	uint64_t *pdpt = (uint64_t *)(v->sys + PDPT_GPA);
	uint64_t *pd = (uint64_t *)(v->sys + PD_GPA);
	struct kvm_segment cs = {
		.base = 0, .limit = 0xffffffff, .selector = 8, .type = 11,
		.present = 1, .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1,
	};
	struct kvm_segment ds = {
		.base = 0, .limit = 0xffffffff, .selector = 16, .type = 3,
		.present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
	};
	int i;

	/* identity map of the first 4 GiB, 2 MiB pages, A/D preset */
	pml4[0] = PDPT_GPA | 0x23;
	for (i = 0; i < 4; i++)
		pdpt[i] = (PD_GPA + i * PAGE) | 0x23;
	for (i = 0; i < 4 * 512; i++)
		pd[i] = ((uint64_t)i << 21) | 0xe3;
	memcpy(v->sys + CODE_GPA, guest_code, guest_code_end - guest_code);

	if (ioctl(v->kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	if (ioctl(v->vcpu, KVM_SET_CPUID2, &cpuid) < 0)
		die("KVM_SET_CPUID2");
	if (ioctl(v->vcpu, KVM_GET_SREGS, &sr) < 0)
		die("KVM_GET_SREGS");
	sr.cr0 = 0x80050033;	/* PG WP NE ET MP PE */
	sr.cr3 = PML4_GPA;
	sr.cr4 = 0x20;		/* PAE */
	sr.efer = 0x500;	/* LMA LME */
	sr.cs = cs;
	sr.ds = sr.es = sr.fs = sr.gs = sr.ss = ds;
	if (ioctl(v->vcpu, KVM_SET_SREGS, &sr) < 0)
		die("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 2;
	if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}

/* Run until the guest's next sync; returns 0 or -1 (and prints why). */
static int vm_run(struct vm *v)
{
	for (;;) {
		if (ioctl(v->vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			diag("KVM_RUN: %s", strerror(errno));
			return -1;
		}
		if (v->run->exit_reason == KVM_EXIT_IO &&
		    v->run->io.port == SYNC_PORT)
			return 0;
		diag("unexpected exit %u (io port %#x)", v->run->exit_reason,
		     v->run->exit_reason == KVM_EXIT_IO ? v->run->io.port : 0);
		if (v->run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
			diag("internal error suberror %u", v->run->internal.suberror);
		if (v->run->exit_reason == KVM_EXIT_FAIL_ENTRY)
			diag("fail entry reason %#llx",
			     (unsigned long long)v->run->fail_entry.hardware_entry_failure_reason);
		return -1;
	}
}

static int vm_create(struct vm *v, const struct vm_opts *o)
{
	size_t size = o->pages * PAGE;

	memset(v, 0, sizeof(*v));
	v->memfd = -1;
	v->pages = o->pages;
	v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (v->kvm < 0)
		die("open /dev/kvm");
	v->vm = ioctl(v->kvm, KVM_CREATE_VM, 0);
	if (v->vm < 0)
		die("KVM_CREATE_VM");
	if (o->manual_init_set) {
		struct kvm_enable_cap cap = {
			.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
			.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
				   KVM_DIRTY_LOG_INITIALLY_SET,
		};

		if (ioctl(v->vm, KVM_ENABLE_CAP, &cap) < 0)
			die("KVM_ENABLE_CAP MANUAL_DIRTY_LOG_PROTECT2");
	}
	v->sys = mmap(NULL, SYS_SIZE, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (v->sys == MAP_FAILED)
		die("mmap sys");
	if (set_slot(v, 0, SYS_GPA, v->sys, SYS_SIZE, 0) < 0)
		die("KVM_SET_USER_MEMORY_REGION sys");

	/* data: 2 MiB aligned, so that THP can map it with huge pages */
	v->data_map = size + (2UL << 20);
	if (o->memfd) {
		v->memfd = memfd_create("ldt-data", MFD_CLOEXEC);
		if (v->memfd < 0 || ftruncate(v->memfd, size) < 0)
			die("memfd");
		v->data_map = size;
		v->data_base = mmap(NULL, size, PROT_READ | PROT_WRITE,
				    MAP_SHARED, v->memfd, 0);
		if (v->data_base == MAP_FAILED)
			die("mmap memfd");
		v->data = v->data_base;
	} else {
		v->data_base = mmap(NULL, v->data_map, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (v->data_base == MAP_FAILED)
			die("mmap data");
		v->data = (uint8_t *)(((uintptr_t)v->data_base + (2UL << 20) - 1) &
				      ~((2UL << 20) - 1));
		madvise(v->data, size, o->thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	}
	v->data_flags = o->log_dirty ? KVM_MEM_LOG_DIRTY_PAGES : 0;
	if (set_slot(v, 1, DATA_GPA, v->data, size, v->data_flags) < 0)
		die("KVM_SET_USER_MEMORY_REGION data");

	v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
	if (v->vcpu < 0)
		die("KVM_CREATE_VCPU");
	v->run_size = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED,
		      v->vcpu, 0);
	if (v->run == MAP_FAILED)
		die("mmap kvm_run");
	vm_setup_cpu(v);
	/* to the first sync: the guest is ready for round 0 */
	if (vm_run(v) < 0)
		die("first KVM_RUN");
	return 0;
}

static void vm_destroy(struct vm *v)
{
	if (v->run)
		munmap(v->run, v->run_size);
	if (v->vcpu > 0)
		close(v->vcpu);
	if (v->vm > 0)
		close(v->vm);
	if (v->kvm > 0)
		close(v->kvm);
	munmap(v->sys, SYS_SIZE);
	munmap(v->data_base, v->data_map);
	if (v->memfd >= 0)
		close(v->memfd);
	memset(v, 0, sizeof(*v));
}

/* One round: the guest writes val to byte 0 of each listed page. */
static int vm_write_round(struct vm *v, const uint32_t *list, unsigned long n,
			  uint8_t val, double *ms)
{
	uint64_t *cmd = (uint64_t *)(v->sys + CMD_GPA);
	double t0;

	if (n > (SYS_SIZE - LIST_GPA) / 4)
		return -1;
	memcpy(v->sys + LIST_GPA, list, n * 4);
	cmd[0] = 0;
	cmd[1] = n;
	cmd[2] = DATA_GPA;
	cmd[3] = val;
	cmd[4] = LIST_GPA;
	t0 = now_ms();
	if (vm_run(v) < 0)
		return -1;
	if (ms)
		*ms = now_ms() - t0;
	return 0;
}

static int vm_wrmsr(struct vm *v, uint32_t msr, uint64_t val)
{
	uint64_t *cmd = (uint64_t *)(v->sys + CMD_GPA);

	cmd[0] = 1;
	cmd[1] = (uint32_t)val;
	cmd[2] = val >> 32;
	cmd[3] = msr;
	return vm_run(v);
}

/* ------------------------------------------------------------------------ */
/* the module                                                                */

static int ldt_open(void)
{
	int fd = open(LDT_KVM_DEVICE, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		die("open " LDT_KVM_DEVICE);
	return fd;
}

static int ldt_attach(int fd, int vmfd, uint32_t flags)
{
	struct ldt_kvm_attach a = {
		.size = sizeof(a), .vm_fd = vmfd, .flags = flags,
	};

	return ioctl(fd, LDT_KVM_ATTACH, &a);
}

/* returns dirty count or -1 */
static long ldt_harvest(int fd, uint32_t slot, uint64_t start, uint64_t n,
			uint64_t *bm, uint32_t flags)
{
	struct ldt_kvm_harvest h = {
		.size = sizeof(h), .flags = flags, .slot = slot, .start = start,
		.num_pages = n, .bitmap = (uint64_t)bm,
		.bitmap_size = (n + 63) / 64 * 8,
	};
	int r = ioctl(fd, LDT_KVM_HARVEST, &h);

	if (r < 0)
		return -1;
	if ((uint64_t)r != h.dirty_pages && h.dirty_pages < 0x7fffffff)
		return -2;
	return (long)h.dirty_pages;
}

static int ldt_stats(int fd, struct ldt_kvm_stats *s)
{
	memset(s, 0, sizeof(*s));
	s->size = sizeof(*s);
	return ioctl(fd, LDT_KVM_STATS, s);
}

/* ------------------------------------------------------------------------ */
/* bitmaps and rounds                                                        */

static inline bool bit(const uint64_t *bm, unsigned long i)
{
	return bm[i / 64] >> (i % 64) & 1;
}

static inline void setbit(uint64_t *bm, unsigned long i)
{
	bm[i / 64] |= 1ULL << (i % 64);
}

static unsigned long popcount(const uint64_t *bm, unsigned long n)
{
	unsigned long c = 0, i;

	for (i = 0; i < (n + 63) / 64; i++)
		c += __builtin_popcountll(bm[i]);
	return c;
}

/* missed = |S & ~H|, fp = |H & ~S|, over n pages */
static void compare(const uint64_t *s, const uint64_t *h, unsigned long n,
		    unsigned long *missed, unsigned long *fp)
{
	unsigned long i;

	*missed = *fp = 0;
	for (i = 0; i < (n + 63) / 64; i++) {
		*missed += __builtin_popcountll(s[i] & ~h[i]);
		*fp += __builtin_popcountll(h[i] & ~s[i]);
	}
}

/* The set of round r: empty, all, then seeded random densities/runs. */
static unsigned long make_round(int r, unsigned long n, uint32_t *list,
				uint64_t *s)
{
	static const unsigned int permille[] = { 10, 100, 500, 900, 30 };
	unsigned long k = 0, i;

	memset(s, 0, (n + 63) / 64 * 8);
	if (r == 0)
		return 0;
	for (i = 0; i < n; i++) {
		bool w;

		if (r == 1)
			w = true;
		else if (r % 4 == 3)	/* runs of 64 pages */
			w = (((i / 64) * 0x9e3779b97f4a7c15ULL ^ (uint64_t)r * 0x1234567) >> 33) % 3 == 0;
		else
			w = rnd() % 1000 < permille[r % 5];
		if (w) {
			list[k++] = i;
			setbit(s, i);
		}
	}
	/* shuffle the order of writes */
	for (i = k; i > 1; i--) {
		unsigned long j = rnd() % i;
		uint32_t x = list[i - 1];

		list[i - 1] = list[j];
		list[j] = x;
	}
	return k;
}

static void print_stats(int fd, const char *name)
{
	struct ldt_kvm_stats s;

	if (ldt_stats(fd, &s) < 0) {
		diag("%s: LDT_KVM_STATS: %s", name, strerror(errno));
		return;
	}
	diag("%s stats: harvests %llu (%.3f ms avg), reported %llu = dbit %llu + conservative %llu;"
	     " notifier events %llu pages %llu, unmapped %llu, slot-change %llu, all-marks %llu,"
	     " kvm-log %llu, sptes cleared %llu, flushes %llu, root changes %llu, unattributed %llu,"
	     " shadow %llu, unprotected %llu",
	     name, (unsigned long long)s.harvests,
	     s.harvests ? s.harvest_ns_total / 1e6 / s.harvests : 0.0,
	     (unsigned long long)s.pages_reported, (unsigned long long)s.pages_dbit,
	     (unsigned long long)s.pages_conservative, (unsigned long long)s.notifier_events,
	     (unsigned long long)s.pages_notifier, (unsigned long long)s.pages_unmapped,
	     (unsigned long long)s.pages_slot_change, (unsigned long long)s.pages_all_marks,
	     (unsigned long long)s.pages_kvm_log, (unsigned long long)s.sptes_cleared,
	     (unsigned long long)s.tlb_flushes, (unsigned long long)s.root_changes,
	     (unsigned long long)s.unattributed_invalidations,
	     (unsigned long long)s.shadow_mmu_harvests,
	     (unsigned long long)s.sptes_unprotected);
}

enum { ORDER_NONE, ORDER_KVM_FIRST, ORDER_LDT_FIRST, ORDER_ALTERNATE };

struct round_opts {
	int order;		/* KVM_GET_DIRTY_LOG on the same rounds */
	bool pageout;		/* MADV_PAGEOUT the data slot before harvesting */
	bool verify;		/* check contents of written pages */
	int flip_log_at;	/* toggle KVM_MEM_LOG_DIRTY_PAGES before this round (0: never) */
	int flip_log_back_at;
};

/*
 * The main check: rounds of seeded writes; after each, harvest (and maybe
 * KVM_GET_DIRTY_LOG); every written page must be reported.
 */
static void run_rounds(const char *name, const struct vm_opts *vo,
		       const struct round_opts *ro, uint32_t attach_flags)
{
	unsigned long n = vo->pages, words = (n + 63) / 64, k;
	uint64_t *s = calloc(words, 8), *h = calloc(words, 8), *kb = calloc(words, 8);
	uint32_t *list = calloc(n, 4);
	uint8_t *expect = calloc(n, 1);
	unsigned long miss_total = 0, kmiss_total = 0, fp_total = 0, kfp_total = 0;
	double wsum = 0, hsum = 0;
	bool ok_all = true;
	struct vm v;
	int fd, r;

	if (!s || !h || !kb || !list || !expect)
		die("calloc");
	vm_create(&v, vo);
	fd = ldt_open();
	if (ldt_attach(fd, v.vm, attach_flags) < 0) {
		check(false, "%s: attach: %s", name, strerror(errno));
		goto out;
	}
	for (r = 0; r < opt_rounds; r++) {
		unsigned long missed, fp, kmissed = 0, kfp = 0;
		uint8_t val = (uint8_t)(r * 37 + 11);
		bool kvm_first;
		double wms, hms;
		long got;

		if (ro->flip_log_at && (r == ro->flip_log_at || r == ro->flip_log_back_at)) {
			v.data_flags ^= KVM_MEM_LOG_DIRTY_PAGES;
			if (set_slot(&v, 1, DATA_GPA, v.data, n * PAGE, v.data_flags) < 0)
				die("flip KVM_MEM_LOG_DIRTY_PAGES");
			diag("%s: round %d: KVM dirty logging %s", name, r,
			     v.data_flags ? "on" : "off");
		}
		k = make_round(r, n, list, s);
		if (vm_write_round(&v, list, k, val, &wms) < 0) {
			check(false, "%s: round %d: guest failed", name, r);
			ok_all = false;
			break;
		}
		for (unsigned long i = 0; i < k; i++)
			expect[list[i]] = val;
		if (ro->pageout && r % 2 == 0 && madvise(v.data, n * PAGE, MADV_PAGEOUT) < 0)
			diag("MADV_PAGEOUT: %s", strerror(errno));
		/* odd rounds: page out after the harvest, see below */

		kvm_first = ro->order == ORDER_KVM_FIRST ||
			    (ro->order == ORDER_ALTERNATE && r % 2 == 0);
		if (ro->order != ORDER_NONE && kvm_first) {
			struct kvm_dirty_log dl = { .slot = 1, .dirty_bitmap = kb };

			memset(kb, 0, words * 8);
			if (ioctl(v.vm, KVM_GET_DIRTY_LOG, &dl) < 0)
				die("KVM_GET_DIRTY_LOG");
		}
		memset(h, 0xa5, words * 8);	/* the module must overwrite it */
		hms = now_ms();
		got = ldt_harvest(fd, 1, 0, n, h, 0);
		hms = now_ms() - hms;
		if (got < 0) {
			check(false, "%s: round %d: harvest: %s", name, r, strerror(errno));
			ok_all = false;
			break;
		}
		if (ro->order != ORDER_NONE && !kvm_first) {
			struct kvm_dirty_log dl = { .slot = 1, .dirty_bitmap = kb };

			memset(kb, 0, words * 8);
			if (ioctl(v.vm, KVM_GET_DIRTY_LOG, &dl) < 0)
				die("KVM_GET_DIRTY_LOG");
		}
		if ((unsigned long)got != popcount(h, n)) {
			diag("%s: round %d: returned %ld but %lu bits set", name, r, got,
			     popcount(h, n));
			ok_all = false;
		}
		if (n % 64 && h[words - 1] >> (n % 64)) {
			diag("%s: round %d: bits beyond num_pages set", name, r);
			ok_all = false;
		}
		compare(s, h, n, &missed, &fp);
		if (ro->order != ORDER_NONE)
			compare(s, kb, n, &kmissed, &kfp);
		miss_total += missed;
		fp_total += fp;
		kmiss_total += kmissed;
		kfp_total += kfp;
		if (r > 0) {
			wsum += wms;
			hsum += hms;
		}
		diag("%s: round %d: wrote %lu, host-ldt %ld (missed %lu, fp %lu)%s, guest %.2f ms, harvest %.3f ms",
		     name, r, k, got, missed, fp,
		     ro->order == ORDER_NONE ? "" :
		     kvm_first ? " [kvm-bitmap first]" : " [host-ldt first]", wms, hms);
		if (ro->order != ORDER_NONE)
			diag("%s: round %d: kvm-bitmap %lu (missed %lu, fp %lu)", name, r,
			     popcount(kb, n), kmissed, kfp);
		if (missed) {
			for (unsigned long i = 0, shown = 0; i < n && shown < 8; i++)
				if (bit(s, i) && !bit(h, i)) {
					diag("%s: round %d: missed page %lu", name, r, i);
					shown++;
				}
			ok_all = false;
		}
		if (ro->pageout && r % 2) {
			/*
			 * A random half of the 64-page chunks, after the
			 * harvest cleared the D bits: the host must still
			 * write them out (the OS side of the scheme: the
			 * module marked the pages dirty).  Their SPTEs go:
			 * reported again next round (false positives).
			 */
			for (unsigned long c = 0; c < (n + 63) / 64; c++) {
				unsigned long len = n - c * 64 < 64 ? n - c * 64 : 64;

				if (rnd() % 2 == 0 &&
				    madvise(v.data + c * 64 * PAGE, len * PAGE, MADV_PAGEOUT) < 0)
					diag("MADV_PAGEOUT: %s", strerror(errno));
			}
		}
		if (ro->verify) {
			unsigned long bad = 0;

			for (unsigned long i = 0; i < n; i++)
				if (v.data[i * PAGE] != expect[i])
					bad++;
			if (bad) {
				diag("%s: round %d: %lu pages lost their contents", name, r, bad);
				ok_all = false;
			}
		}
	}
	print_stats(fd, name);
	check(ok_all && miss_total == 0,
	      "%s: %d rounds x %lu pages: host-ldt never missed a write (missed %lu, false positives %lu)",
	      name, opt_rounds, n, miss_total, fp_total);
	if (ro->order != ORDER_NONE)
		check(kmiss_total == 0,
		      "%s: kvm-bitmap on the same rounds missed nothing (missed %lu, false positives %lu)",
		      name, kmiss_total, kfp_total);
	diag("%s: mean over rounds 1..%d: guest write %.2f ms, harvest %.3f ms",
	     name, opt_rounds - 1, wsum / (opt_rounds - 1), hsum / (opt_rounds - 1));
	if (ioctl(fd, LDT_KVM_DETACH) < 0)
		check(false, "%s: detach: %s", name, strerror(errno));
out:
	close(fd);
	vm_destroy(&v);
	free(s);
	free(h);
	free(kb);
	free(list);
	free(expect);
}

/* ------------------------------------------------------------------------ */
/* tests                                                                     */

static void t_version(void)
{
	struct ldt_kvm_version ver = { .size = sizeof(ver) };
	int fd = ldt_open();
	int r = ioctl(fd, LDT_KVM_GET_VERSION, &ver);

	check(r == 0 && ver.api_version == LDT_KVM_API_VERSION && ver.size == sizeof(ver),
	      "version: api %u, features %#llx", ver.api_version,
	      (unsigned long long)ver.features);
	check(ver.features & LDT_KVM_FEAT_NPT, "version: this host tracks AMD NPT");
	close(fd);
}

static void t_plain(void)
{
	struct vm_opts vo = { .pages = opt_pages };
	struct round_opts ro = { .order = ORDER_NONE, .verify = true };

	run_rounds("plain", &vo, &ro, 0);
}

static void t_kvm_log(void)
{
	struct vm_opts vo = { .pages = opt_pages, .log_dirty = true };
	struct round_opts ro = { .order = ORDER_ALTERNATE };

	run_rounds("with-kvm-bitmap", &vo, &ro, 0);
}

static void t_pressure(void)
{
	struct vm_opts vo = { .pages = opt_pages / 4 ? opt_pages / 4 : 1, .memfd = true };
	struct round_opts ro = { .order = ORDER_NONE, .pageout = true, .verify = true };
	struct vm_opts va = { .pages = opt_pages / 4 ? opt_pages / 4 : 1 };
	FILE *f = fopen("/proc/swaps", "r");
	char line[256];
	int nl = 0;

	while (f && fgets(line, sizeof(line), f))
		nl++;
	if (f)
		fclose(f);
	if (nl < 2)
		diag("pressure: no swap: MADV_PAGEOUT cannot evict (tests/kmod-nested.sh sets up zram)");
	run_rounds("pressure-memfd", &vo, &ro, 0);
	run_rounds("pressure-anon", &va, &ro, 0);
}

static void t_thp(void)
{
	struct vm_opts vo = { .pages = opt_pages, .thp = true };
	struct round_opts ro = { .order = ORDER_NONE, .verify = true,
				 .flip_log_at = 3, .flip_log_back_at = 5 };

	run_rounds("thp-split-recover", &vo, &ro, 0);
}

/* KVM's own writes (wall clock MSR) are seen only with CONSUME_KVM_LOG. */
static void t_kvm_writes(void)
{
	struct vm_opts vo = { .pages = 64, .log_dirty = true, .manual_init_set = true };
	struct round_opts ro = { .order = ORDER_NONE };
	unsigned long target = 40;
	uint64_t h[1];
	struct vm v;
	int fd, pass;

	run_rounds("consume-kvm-log", &vo, &ro, LDT_KVM_ATTACH_CONSUME_KVM_LOG);

	for (pass = 0; pass < 2; pass++) {
		uint32_t flags = pass ? LDT_KVM_ATTACH_CONSUME_KVM_LOG : 0;
		long got;

		vm_create(&v, &vo);
		fd = ldt_open();
		if (ldt_attach(fd, v.vm, flags) < 0)
			die("attach");
		/*
		 * Touch the page from the VMM first, so KVM's write causes no
		 * COW (which our mm notifier would see) and sets no TDP D bit.
		 */
		v.data[target * PAGE + 2048] = 1;
		ldt_harvest(fd, 1, 0, 64, h, 0);
		if (vm_wrmsr(&v, MSR_KVM_WALL_CLOCK_NEW, DATA_GPA + target * PAGE) < 0)
			die("wrmsr round");
		got = ldt_harvest(fd, 1, 0, 64, h, 0);
		if (pass)
			check(got >= 0 && bit(h, target),
			      "consume-kvm-log: a page KVM wrote (wall clock MSR) is reported (%ld dirty)",
			      got);
		else
			diag("without CONSUME_KVM_LOG the page only KVM wrote is %s (expected: not; KVM's own writes set no TDP D bit, see kmod/README.md)",
			     got >= 0 && bit(h, target) ? "reported" : "not reported");
		close(fd);
		vm_destroy(&v);
	}
}

/* harvest of a sub-range and BY_GPA, and memslot changes between harvests */
static void t_ranges_and_slots(void)
{
	struct vm_opts vo = { .pages = 1024 };
	unsigned long n = 1024;
	uint64_t h[1024 / 64 + 1], s[1024 / 64];
	uint32_t list[4] = { 5, 100, 515, 1000 };
	bool ok;
	struct vm v;
	long got;
	int fd;

	vm_create(&v, &vo);
	fd = ldt_open();
	if (ldt_attach(fd, v.vm, 0) < 0)
		die("attach");
	if (vm_write_round(&v, list, 4, 1, NULL) < 0)
		die("round");
	/* pages 96..159 by GPA: only 100 */
	memset(h, 0, sizeof(h));
	got = ldt_harvest(fd, 0, DATA_GPA + 96 * PAGE, 64, h, LDT_KVM_HARVEST_BY_GPA);
	check(got == 1 && h[0] == 1ULL << 4, "by-gpa sub-range: pages 96..159 -> only page 100 (%ld, %#llx)",
	      got, (unsigned long long)h[0]);
	/* pages 3..1002 by slot offset (unaligned): 5, 515, 1000 */
	memset(h, 0, sizeof(h));
	got = ldt_harvest(fd, 1, 3, 1000, h, 0);
	ok = got == 3 && bit(h, 2) && bit(h, 512) && bit(h, 997);
	check(ok, "unaligned sub-range 3..1002 -> pages 5, 515, 1000 (%ld)", got);
	memset(h, 0, sizeof(h));
	got = ldt_harvest(fd, 1, 0, n, h, 0);
	check(got == 0, "after harvesting everything: nothing dirty (%ld)", got);

	/* a new slot appears: reported whole at its first harvest */
	{
		void *m = mmap(NULL, 64 * PAGE, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (m == MAP_FAILED || set_slot(&v, 2, 512UL << 20, m, 64 * PAGE, 0) < 0)
			die("slot 2");
		got = ldt_harvest(fd, 2, 0, 64, h, 0);
		check(got == 64, "new memslot after attach: reported whole once (%ld of 64)", got);
		got = ldt_harvest(fd, 2, 0, 64, h, 0);
		check(got == 0, "new memslot: then clean (%ld)", got);
		/* delete it: harvest -> ENOENT; data slot gets everything (zap-all quirk) */
		if (set_slot(&v, 2, 512UL << 20, m, 0, 0) < 0)
			die("delete slot 2");
		got = ldt_harvest(fd, 2, 0, 64, h, 0);
		check(got == -1 && errno == ENOENT, "deleted memslot -> ENOENT");
		memset(s, 0, sizeof(s));
		got = ldt_harvest(fd, 1, 0, n, h, 0);
		check(got == (long)n,
		      "memslot deleted (KVM zaps all roots): other slots reported whole (%ld of %lu)",
		      got, n);
		munmap(m, 64 * PAGE);
	}
	/* flags-only change: dirty logging on (AMD: keeps D, no full report) then off (full) */
	if (vm_write_round(&v, list, 4, 2, NULL) < 0)
		die("round");
	if (set_slot(&v, 1, DATA_GPA, v.data, n * PAGE, KVM_MEM_LOG_DIRTY_PAGES) < 0)
		die("log on");
	got = ldt_harvest(fd, 1, 0, n, h, 0);
	check(got >= 4 && bit(h, 5) && bit(h, 100) && bit(h, 515) && bit(h, 1000),
	      "dirty logging turned on between harvests: the 4 written pages reported (%ld)", got);
	if (vm_write_round(&v, list, 2, 3, NULL) < 0)
		die("round");
	if (set_slot(&v, 1, DATA_GPA, v.data, n * PAGE, 0) < 0)
		die("log off");
	got = ldt_harvest(fd, 1, 0, n, h, 0);
	check(got >= 2 && bit(h, 5) && bit(h, 100),
	      "dirty logging turned off between harvests (KVM may zap): written pages reported (%ld)", got);
	print_stats(fd, "ranges-and-slots");
	close(fd);
	vm_destroy(&v);
}

static void t_bad_ioctls(void)
{
	struct ldt_kvm_harvest h;
	struct ldt_kvm_attach a;
	struct vm_opts vo = { .pages = 256 };
	uint64_t bm[4];
	struct vm v;
	int fd, fd2, nul, r;

	fd = ldt_open();
	check_errno(fd, _IO('L', 0x99), NULL, ENOTTY, "unknown ioctl");
	check_errno(fd, _IOWR('L', 0x82, uint64_t), bm, ENOTTY,
		    "HARVEST number with another size");
	memset(&h, 0, sizeof(h));
	h.size = sizeof(h);
	h.num_pages = 1;
	h.bitmap = (uint64_t)bm;
	h.bitmap_size = 8;
	h.slot = 1;
	check_errno(fd, LDT_KVM_HARVEST, &h, ENOTCONN, "harvest before attach");
	check_errno(fd, LDT_KVM_DETACH, NULL, ENOTCONN, "detach before attach");
	memset(&a, 0, sizeof(a));
	a.size = sizeof(a) - 8;
	a.vm_fd = -1;
	check_errno(fd, LDT_KVM_ATTACH, &a, EINVAL, "attach with a wrong size field");
	a.size = sizeof(a);
	check_errno(fd, LDT_KVM_ATTACH, &a, EBADF, "attach fd -1");
	nul = open("/dev/null", O_RDWR);
	a.vm_fd = nul;
	check_errno(fd, LDT_KVM_ATTACH, &a, EINVAL, "attach /dev/null (not a KVM fd)");
	close(nul);
	check_errno(fd, LDT_KVM_ATTACH, NULL, EFAULT, "attach with a NULL argument");

	vm_create(&v, &vo);
	a.vm_fd = v.kvm;
	check_errno(fd, LDT_KVM_ATTACH, &a, EINVAL, "attach the /dev/kvm fd (not a VM)");
	a.vm_fd = v.vcpu;
	check_errno(fd, LDT_KVM_ATTACH, &a, EINVAL, "attach a vCPU fd");
	a.vm_fd = v.vm;
	a.flags = 0x80;
	check_errno(fd, LDT_KVM_ATTACH, &a, EINVAL, "attach with unknown flags");
	a.flags = 0;
	a.reserved[3] = 1;
	check_errno(fd, LDT_KVM_ATTACH, &a, EINVAL, "attach with reserved bits");
	a.reserved[3] = 0;
	check(ioctl(fd, LDT_KVM_ATTACH, &a) == 0, "attach the VM fd");
	check_errno(fd, LDT_KVM_ATTACH, &a, EBUSY, "attach again on the same file");
	fd2 = ldt_open();
	check_errno(fd2, LDT_KVM_ATTACH, &a, EBUSY, "attach the same VM from a second file");

	/* another process with the VM fd (inherited): not its mm */
	{
		pid_t pid = fork();
		int st;

		if (pid == 0) {
			int c = open(LDT_KVM_DEVICE, O_RDWR);

			_exit(ioctl(c, LDT_KVM_ATTACH, &a) < 0 && errno == EPERM ? 0 : 1);
		}
		waitpid(pid, &st, 0);
		check(WIFEXITED(st) && WEXITSTATUS(st) == 0,
		      "attach from another process (fd inherited, other mm) -> EPERM");
	}

	h.slot = 7;
	check_errno(fd, LDT_KVM_HARVEST, &h, ENOENT, "harvest a slot that does not exist");
	h.slot = (2 << 16) | 1;
	check_errno(fd, LDT_KVM_HARVEST, &h, EINVAL, "harvest address space 2");
	h.slot = 1;
	h.start = 256;
	check_errno(fd, LDT_KVM_HARVEST, &h, EINVAL, "harvest start beyond the slot");
	h.start = 200;
	h.num_pages = 57;
	h.bitmap_size = 8;
	check_errno(fd, LDT_KVM_HARVEST, &h, EINVAL, "harvest range beyond the slot");
	h.start = 0;
	h.num_pages = 0;
	check_errno(fd, LDT_KVM_HARVEST, &h, EINVAL, "harvest 0 pages");
	h.num_pages = 65;
	h.bitmap_size = 8;
	check_errno(fd, LDT_KVM_HARVEST, &h, EINVAL, "bitmap_size too small");
	h.bitmap_size = 16;
	h.bitmap = 8;
	check_errno(fd, LDT_KVM_HARVEST, &h, EFAULT, "bitmap at a bad address");
	h.bitmap = (uint64_t)bm;
	h.reserved[0] = 1;
	check_errno(fd, LDT_KVM_HARVEST, &h, EINVAL, "harvest with reserved bits");
	h.reserved[0] = 0;
	h.flags = 4;
	check_errno(fd, LDT_KVM_HARVEST, &h, EINVAL, "harvest with unknown flags");
	h.flags = LDT_KVM_HARVEST_BY_GPA;
	h.start = DATA_GPA + 1;
	check_errno(fd, LDT_KVM_HARVEST, &h, EINVAL, "BY_GPA with an unaligned address");
	h.start = 1UL << 40;
	check_errno(fd, LDT_KVM_HARVEST, &h, ENOENT, "BY_GPA outside every memslot");
	h.start = DATA_GPA;
	h.size = 8;
	check_errno(fd, LDT_KVM_HARVEST, &h, EINVAL, "harvest with a wrong size field");
	h.size = sizeof(h);
	r = ioctl(fd, LDT_KVM_HARVEST, &h);
	check(r >= 0, "a valid BY_GPA harvest after all that (%d)", r);

	check(ioctl(fd, LDT_KVM_DETACH) == 0, "detach");
	check_errno(fd, LDT_KVM_DETACH, NULL, ENOTCONN, "detach twice");
	check(ioctl(fd2, LDT_KVM_ATTACH, &a) == 0, "the second file can attach after the detach");
	close(fd2);	/* release detaches */
	check(ioctl(fd, LDT_KVM_ATTACH, &a) == 0, "re-attach after the other file closed");

	/* the VM goes away while attached: we hold it; harvest still works */
	{
		int vmfd = v.vm;
		long got;

		munmap(v.run, v.run_size);
		v.run = NULL;
		close(v.vcpu);
		close(v.vm);
		v.vcpu = v.vm = -1;
		got = ldt_harvest(fd, 1, 0, 256, bm, 0);
		check(got >= 0, "harvest after the VM and vCPU fds were closed (%ld)", got);
		check(ioctl(fd, LDT_KVM_DETACH) == 0, "detach after the VM fds were closed (VM destroyed now)");
		a.vm_fd = vmfd;
		check_errno(fd, LDT_KVM_ATTACH, &a, EBADF, "attach a closed VM fd");
	}
	close(fd);
	vm_destroy(&v);

	/* a process that exits while attached */
	{
		pid_t pid = fork();
		int st;

		if (pid == 0) {
			struct vm cv;
			int c = ldt_open();

			vm_create(&cv, &vo);
			_exit(ldt_attach(c, cv.vm, 0) == 0 ? 0 : 1);
		}
		waitpid(pid, &st, 0);
		check(WIFEXITED(st) && WEXITSTATUS(st) == 0,
		      "a process exits while attached (release detaches, VM destroyed)");
	}
}

/*
 * Harvests while the vCPU writes (pages 0..n-1 cyclically, a write counter
 * after each): a write that completed before a harvest started and after
 * the previous one returned must be in that harvest; one racing with a
 * harvest in that harvest or the next.
 */
static void *vcpu_thread(void *arg)
{
	return (void *)(intptr_t)vm_run(arg);
}

static void t_concurrent(void)
{
	struct vm_opts vo = { .pages = opt_pages };
	unsigned long n = opt_pages, words = (n + 63) / 64;
	volatile uint64_t *cmd;
	uint64_t *hprev = calloc(words, 8), *h = calloc(words, 8);
	uint64_t c1prev = 0, missed = 0, harvests = 0, writes;
	unsigned long fp_total = 0;
	uint64_t c0prev = 0;
	pthread_t th;
	void *ret;
	struct vm v;
	double t0;
	int fd, k;

	vm_create(&v, &vo);
	fd = ldt_open();
	if (ldt_attach(fd, v.vm, 0) < 0)
		die("attach");
	cmd = (volatile uint64_t *)(v.sys + CMD_GPA);
	cmd[0] = 2;
	cmd[1] = n;
	cmd[2] = DATA_GPA;
	cmd[8] = 0;
	cmd[9] = 0;
	cmd[10] = 0;
	if (pthread_create(&th, NULL, vcpu_thread, &v))
		die("pthread_create");
	t0 = now_ms();
	/* let the guest fault everything in once */
	while (cmd[8] < n && now_ms() - t0 < 60000)
		usleep(1000);
	/*
	 * Slow the writer down so that a harvest interval (~1-20 ms) sees
	 * about n/8 writes: otherwise every page is written in every
	 * interval and the check cannot see a miss.
	 */
	{
		uint64_t spin = 256, w0, w1;
		int it;

		for (it = 0; it < 4; it++) {
			double rate;

			cmd[10] = spin;
			usleep(2000);
			w0 = cmd[8];
			t0 = now_ms();
			usleep(20000);
			w1 = cmd[8];
			rate = (w1 - w0) / (now_ms() - t0);	/* writes per ms */
			if (rate < 1)
				rate = 1;
			spin = (uint64_t)(spin * rate / ((double)n / 80));
			if (spin < 1)
				spin = 1;
			if (spin > (1ULL << 24))
				spin = 1ULL << 24;
		}
		cmd[10] = spin;
		diag("concurrent: writer throttled with %llu spins per write",
		     (unsigned long long)spin);
	}
	ldt_harvest(fd, 1, 0, n, hprev, 0);
	c1prev = cmd[8];
	for (k = 0; k < 4 * opt_rounds; k++) {
		uint64_t c0, c1, w, lo;
		long got;

		usleep(k % 3 ? 1000 : 20000);
		c0 = cmd[8];
		got = ldt_harvest(fd, 1, 0, n, h, 0);
		c1 = cmd[8];
		if (got < 0) {
			check(false, "concurrent: harvest: %s", strerror(errno));
			break;
		}
		harvests++;
		/* writes [c1prev + 2, c0): must be in h; around c1prev: in hprev or h */
		lo = c1prev >= 1 ? c1prev - 1 : 0;
		for (w = lo; w < c0 && w < lo + 2 * n; w++) {
			unsigned long p = w % n;
			bool in = bit(h, p) || (w < c1prev + 2 && bit(hprev, p));

			if (!in) {
				if (missed < 8)
					diag("concurrent: harvest %d: write %llu (page %lu) missed [c1prev %llu c0 %llu c1 %llu]",
					     k, (unsigned long long)w, p,
					     (unsigned long long)c1prev, (unsigned long long)c0,
					     (unsigned long long)c1);
				missed++;
			}
		}
		if (k < 4 || k == 4 * opt_rounds - 1)
			diag("concurrent: harvest %d: %llu writes before it, %ld pages reported, %llu writes during it",
			     k, (unsigned long long)(c0 - c1prev), got,
			     (unsigned long long)(c1 - c0));
		{
			/*
			 * false positives: reported, but not written since the
			 * previous harvest started, [c0prev - 1, c1 + 2)
			 */
			uint64_t *wr = calloc(words, 8);
			uint64_t flo = c0prev >= 1 ? c0prev - 1 : 0;
			unsigned long fp, unwritten_missed;

			for (w = flo; w < c1 + 2 && w < flo + n; w++)
				setbit(wr, w % n);
			if (c1 + 2 - flo >= n)
				memset(wr, 0xff, words * 8);
			compare(wr, h, n, &unwritten_missed, &fp);
			fp_total += fp;
			free(wr);
		}
		memcpy(hprev, h, words * 8);
		c1prev = c1;
		c0prev = c0;
	}
	cmd[9] = 1;
	pthread_join(th, &ret);
	writes = cmd[8];
	print_stats(fd, "concurrent");
	check(missed == 0 && ret == NULL,
	      "concurrent: %llu harvests while the vCPU wrote (%llu writes): no write missed (%llu; false positives %lu)",
	      (unsigned long long)harvests, (unsigned long long)writes,
	      (unsigned long long)missed, fp_total);
	close(fd);
	vm_destroy(&v);
	free(h);
	free(hprev);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/*
 * Guest write time per round (every page, 1 byte, after the first touch)
 * and the harvest time, untracked vs host-ldt vs KVM_GET_DIRTY_LOG, in the
 * same run.  Informational (timing under TCG), plus a never-miss check.
 */
static void t_bench(void)
{
	static const char *const names[] = { "untracked", "host-ldt", "host-ldt+kvm-log", "kvm-bitmap" };
	unsigned long n = opt_pages, words = (n + 63) / 64, i;
	uint32_t *list = calloc(n, 4);
	uint64_t *h = calloc(words, 8);
	int rounds = opt_rounds < 4 ? 4 : opt_rounds, mode, r;
	double *gw = calloc(rounds, sizeof(double)), *hv = calloc(rounds, sizeof(double));
	bool ok = true;

	for (i = 0; i < n; i++)
		list[i] = i;
	for (mode = 0; mode < 4; mode++) {
		struct vm_opts vo = { .pages = n, .log_dirty = mode >= 2,
				      .manual_init_set = mode == 2 };
		struct vm v;
		int fd = -1;

		vm_create(&v, &vo);
		if (mode == 1 || mode == 2) {
			fd = ldt_open();
			if (ldt_attach(fd, v.vm, mode == 2 ? LDT_KVM_ATTACH_CONSUME_KVM_LOG : 0) < 0)
				die("attach");
		}
		for (r = 0; r <= rounds; r++) {
			double g, t0;
			long got = (long)n;

			if (vm_write_round(&v, list, n, (uint8_t)r, &g) < 0)
				die("bench round");
			t0 = now_ms();
			if (fd >= 0) {
				got = ldt_harvest(fd, 1, 0, n, h, 0);
			} else if (mode == 3) {
				struct kvm_dirty_log dl = { .slot = 1, .dirty_bitmap = h };

				if (ioctl(v.vm, KVM_GET_DIRTY_LOG, &dl) < 0)
					die("KVM_GET_DIRTY_LOG");
				got = popcount(h, n);
			}
			if (r == 0)
				continue;	/* first touch */
			gw[r - 1] = g;
			hv[r - 1] = now_ms() - t0;
			if (got != (long)n)
				ok = false;
		}
		diag("bench: %s: %lu pages x 1 byte per round, median of %d rounds: guest write %.2f ms, harvest %.3f ms",
		     names[mode], n, rounds, median(gw, rounds), median(hv, rounds));
		if (fd >= 0) {
			print_stats(fd, names[mode]);
			close(fd);
		}
		vm_destroy(&v);
	}
	check(ok, "bench: every source reported all %lu written pages in every round", n);
	free(list);
	free(h);
	free(gw);
	free(hv);
}

/* For the rmmod test: attach, tell the shell, wait to be killed. */
static int hold(const char *file)
{
	struct vm_opts vo = { .pages = 64 };
	struct vm v;
	int fd;
	FILE *f;

	vm_create(&v, &vo);
	fd = ldt_open();
	if (ldt_attach(fd, v.vm, 0) < 0)
		die("attach");
	f = fopen(file, "w");
	if (!f)
		die(file);
	fprintf(f, "%d\n", getpid());
	fclose(f);
	for (;;)
		pause();
	return 0;
}

/* The VM mechanics alone (no module): rounds checked with KVM_GET_DIRTY_LOG. */
static int vm_only(void)
{
	struct vm_opts vo = { .pages = opt_pages, .log_dirty = true };
	unsigned long n = opt_pages, words = (n + 63) / 64, missed, fp, k;
	uint64_t *s = calloc(words, 8), *kb = calloc(words, 8);
	uint32_t *list = calloc(n, 4);
	struct vm v;
	double ms;
	int r;

	vm_create(&v, &vo);
	for (r = 0; r < opt_rounds; r++) {
		struct kvm_dirty_log dl = { .slot = 1, .dirty_bitmap = kb };

		k = make_round(r, n, list, s);
		if (vm_write_round(&v, list, k, (uint8_t)r, &ms) < 0)
			die("round");
		memset(kb, 0, words * 8);
		if (ioctl(v.vm, KVM_GET_DIRTY_LOG, &dl) < 0)
			die("KVM_GET_DIRTY_LOG");
		compare(s, kb, n, &missed, &fp);
		check(missed == 0, "vm-only: round %d: wrote %lu, kvm-bitmap %lu (missed %lu, fp %lu), guest %.2f ms",
		      r, k, popcount(kb, n), missed, fp, ms);
	}
	vm_destroy(&v);
	printf("ldt_kvm_test: %d passed, %d failed\n", n_ok, n_fail);
	return n_fail ? 1 : 0;
}

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		void (*fn)(void);
	} tests[] = {
		{ "version", t_version },
		{ "bad-ioctls", t_bad_ioctls },
		{ "plain", t_plain },
		{ "with-kvm-bitmap", t_kvm_log },
		{ "ranges-and-slots", t_ranges_and_slots },
		{ "kvm-writes", t_kvm_writes },
		{ "thp", t_thp },
		{ "pressure", t_pressure },
		{ "concurrent", t_concurrent },
		{ "bench", t_bench },
	};
	bool any = false;
	int i, j;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--seed") && i + 1 < argc)
			seed = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--pages") && i + 1 < argc)
			opt_pages = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--rounds") && i + 1 < argc)
			opt_rounds = atoi(argv[++i]);
		else if (!strcmp(argv[i], "hold") && i + 1 < argc)
			return hold(argv[i + 1]);
		else if (!strcmp(argv[i], "vm-only"))
			return vm_only();
		else
			break;
	}
	if (opt_rounds < 2)
		opt_rounds = 2;
	if (opt_pages < 64 || opt_pages > (SYS_SIZE - LIST_GPA) / 4)
		opt_pages = 4096;
	diag("seed %#llx, %lu pages, %d rounds", (unsigned long long)seed, opt_pages,
	     opt_rounds);
	for (j = 0; j < (int)(sizeof(tests) / sizeof(tests[0])); j++) {
		bool want = i >= argc;

		for (int k = i; k < argc; k++)
			if (!strcmp(argv[k], tests[j].name))
				want = true;
		if (!want)
			continue;
		any = true;
		diag("--- %s", tests[j].name);
		tests[j].fn();
	}
	if (!any)
		diag("no test matched");
	printf("ldt_kvm_test: %d passed, %d failed\n", n_ok, n_fail);
	return n_fail || !any ? 1 : 0;
}
