// SPDX-License-Identifier: GPL-2.0
/*
 * ldt-bench: the four experiments of the LDT paper, in the guest, comparing
 * lightweight dirty tracking (LWDT_HARVEST) with soft-dirty
 * (/proc/self/clear_refs + pagemap), PAGEMAP_SCAN over userfaultfd async
 * write-protection, and no tracking at all.  Every result is one JSON
 * object on one line, on stdout; lines starting with '#' are comments.  The
 * first object ("bench":"meta") says where and how it ran (kernel, CPUs,
 * mode, clock), for the host's report (scripts/report.sh).
 *
 *   write    time to write 4096 bytes to every page of a working set, for
 *            working sets from 1 MiB up, with the tracking reset before
 *            each pass (experiment 1);
 *   timeline throughput of 4096-byte operations (25% reads, 75% writes) in
 *            100 ms intervals, with a tracking round (collect and reset)
 *            after each interval (experiment 2);
 *   kv       an in-process key-value store (zipfian keys, 4096-byte
 *            values, 25% gets, 75% sets) while a tracker thread collects
 *            every 1, 5 and 10 s (experiment 3 without a server);
 *   redis    the same load (YCSB-like, pipelined) on a Redis server
 *            (/usr/bin/redis-server: Debian's, from the second initrd
 *            images/build-redis.sh makes; $LDT_BENCH_REDIS overrides the
 *            path) in its own process, tracked
 *            from outside through /proc/PID/pagemap, collected every 1, 5
 *            and 10 s (experiment 3); skipped with a note when the server
 *            is not there;
 *   collect  time to collect the dirty information after writing 10%,
 *            20%, ... 100% of a region (experiment 4).
 *
 * Usage: ldt-bench [--short] [--max-mib N] [EXPERIMENT...]
 *   (default: write timeline kv redis collect)
 *   --short      small sizes and durations, for CI (the numbers are not
 *                asserted; under QEMU TCG they say little anyway)
 *   --max-mib N  largest working set / region (default: full 128, short 16)
 * Exit status: 0, or 1 if a tracker could not be set up or failed.
 *
 * Timings inside a VM whose kernel is emulated say nothing about real
 * hardware; run the full mode on a real or hardware-virtualized machine.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>

/* include/uapi/linux/lwdt.h, for C libraries whose headers predate it. */
#include "lwdt-uapi.h"

/* PAGEMAP_SCAN (Linux 6.7, include/uapi/linux/fs.h). */
#ifndef PAGEMAP_SCAN
struct page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

struct pm_scan_arg {
	uint64_t size;
	uint64_t flags;
	uint64_t start;
	uint64_t end;
	uint64_t walk_end;
	uint64_t vec;
	uint64_t vec_len;
	uint64_t max_pages;
	uint64_t category_inverted;
	uint64_t category_mask;
	uint64_t category_anyof_mask;
	uint64_t return_mask;
};

#define PAGEMAP_SCAN		_IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_WRITTEN		(1 << 1)
#define PM_SCAN_WP_MATCHING	(1 << 0)
#define PM_SCAN_CHECK_WPASYNC	(1 << 1)
#endif
#ifndef PAGE_IS_SOFT_DIRTY
#define PAGE_IS_SOFT_DIRTY	(1 << 7)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

#define PAGE	4096UL
#define MIB	(1UL << 20)
#define VEC_LEN	4096

static int pagemap_fd;
static bool short_mode;
static unsigned long max_mib;
static int errors;
static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t rnd(void)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 0x2545F4914F6CDD1DULL;
}

static double clock_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/*
 * The guest's clock may tick in jiffies (10 ms here); time with the TSC,
 * calibrated against the clock over a few hundred milliseconds.
 */
static double tsc_per_ms;

static uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static void calibrate(void)
{
	double t0 = clock_ms(), t1;
	uint64_t c0 = rdtsc(), c1;

	do {
		t1 = clock_ms();
	} while (t1 - t0 < 300);
	c1 = rdtsc();
	tsc_per_ms = (c1 - c0) / (t1 - t0);
	printf("# clock: TSC %.0f kHz (calibrated over %.0f ms)\n", tsc_per_ms,
	       t1 - t0);
}

static double now_ms(void)
{
	return tsc_per_ms > 0 ? rdtsc() / tsc_per_ms : clock_ms();
}

/* ---- trackers ------------------------------------------------------------ */

enum tracker { NONE, SOFT_DIRTY, PAGEMAP_SCAN_WP, LDT, NR_TRACKERS };

static const char *const tracker_name[] = {
	[NONE] = "untracked", [SOFT_DIRTY] = "soft-dirty",
	[PAGEMAP_SCAN_WP] = "pagemap-scan", [LDT] = "ldt",
};

struct tracked {
	enum tracker t;
	unsigned char *p;
	size_t len;
	int uffd;
	uint64_t *pm;		/* soft-dirty: pagemap entries */
	int session_fd;		/* LDT: the tracking session */
};

static struct lwdt_region ldt_vec[VEC_LEN];
static struct page_region scan_vec[VEC_LEN];

/*
 * PAGEMAP_SCAN over [start, end) of the address space behind fd, for the
 * pages in category (reset where flags ask for it): pages found, or -errno.
 */
static long scan_range(int fd, uint64_t start, uint64_t end, uint64_t flags,
		       uint64_t category)
{
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = flags,
		.start = start,
		.end = end,
		.vec = (uintptr_t)scan_vec,
		.vec_len = VEC_LEN,
		.category_mask = category,
		.return_mask = category,
	};
	long pages = 0;

	for (;;) {
		long n = ioctl(fd, PAGEMAP_SCAN, &arg), i;

		if (n < 0)
			return -errno;
		for (i = 0; i < n; i++)
			pages += (scan_vec[i].end - scan_vec[i].start) / PAGE;
		if (arg.walk_end >= arg.end)
			return pages;
		arg.start = arg.walk_end;
	}
}

/* LWDT_START of [start, end) on pagemap file fd: the session, or -errno. */
static int ldt_start(int fd, uint64_t start, uint64_t end)
{
	struct lwdt_start_arg arg = {
		.size = sizeof(arg),
		.start = start,
		.end = end,
	};
	int session = ioctl(fd, LWDT_START, &arg);

	return session < 0 ? -errno : session;
}

/* LWDT_HARVEST of [start, end) of session fd: pages reported, or -errno. */
static long ldt_range(int fd, uint64_t start, uint64_t end)
{
	struct lwdt_harvest_arg arg = {
		.size = sizeof(arg),
		.start = start,
		.end = end,
		.vec = (uintptr_t)ldt_vec,
		.vec_len = VEC_LEN,
	};
	long pages = 0;

	for (;;) {
		long n = ioctl(fd, LWDT_HARVEST, &arg), i;

		if (n < 0)
			return -errno;
		for (i = 0; i < n; i++)
			pages += (ldt_vec[i].end - ldt_vec[i].start) / PAGE;
		if (arg.walk_end >= arg.end)
			return pages;
		arg.start = arg.walk_end;
	}
}

static int write_text(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = write(fd, text, strlen(text));
	close(fd);
	return n == (ssize_t)strlen(text) ? 0 : -EIO;
}

/*
 * Collect the pages written since the last collection and reset: the
 * number of dirty pages, or -errno.
 */
static long collect(struct tracked *tr)
{
	size_t n = tr->len / PAGE, i;
	long pages = 0;

	switch (tr->t) {
	case NONE:
		return 0;
	case SOFT_DIRTY:
		if (pread(pagemap_fd, tr->pm, n * 8, (uintptr_t)tr->p / PAGE * 8) !=
		    (ssize_t)(n * 8))
			return -EIO;
		for (i = 0; i < n; i++)
			pages += (tr->pm[i] >> 55) & 1;
		return write_text("/proc/self/clear_refs", "4") ?: pages;
	case PAGEMAP_SCAN_WP:
		return scan_range(pagemap_fd, (uintptr_t)tr->p,
				  (uintptr_t)tr->p + tr->len,
				  PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
				  PAGE_IS_WRITTEN);
	case LDT:
		return ldt_range(tr->session_fd, (uintptr_t)tr->p,
				 (uintptr_t)tr->p + tr->len);
	default:
		return -EINVAL;
	}
}

static int track(struct tracked *tr, enum tracker t, unsigned char *p,
		 size_t len)
{
	memset(tr, 0, sizeof(*tr));
	tr->t = t;
	tr->p = p;
	tr->len = len;
	tr->uffd = -1;
	tr->session_fd = -1;
	if (t == SOFT_DIRTY) {
		tr->pm = malloc(len / PAGE * 8);
		if (!tr->pm)
			return -ENOMEM;
	} else if (t == PAGEMAP_SCAN_WP) {
		struct uffdio_api api = {
			.api = UFFD_API,
			.features = UFFD_FEATURE_WP_ASYNC |
				    UFFD_FEATURE_WP_UNPOPULATED,
		};
		struct uffdio_register reg = {
			.range = { .start = (uintptr_t)p, .len = len },
			.mode = UFFDIO_REGISTER_MODE_WP,
		};

		tr->uffd = syscall(__NR_userfaultfd,
				   O_CLOEXEC | UFFD_USER_MODE_ONLY);
		if (tr->uffd < 0 || ioctl(tr->uffd, UFFDIO_API, &api) ||
		    ioctl(tr->uffd, UFFDIO_REGISTER, &reg))
			return -errno;
	} else if (t == LDT) {
		tr->session_fd = ldt_start(pagemap_fd, (uintptr_t)p,
					   (uintptr_t)p + len);
		if (tr->session_fd < 0)
			return tr->session_fd;
	}
	return collect(tr) < 0 ? -EIO : 0;
}

static void untrack(struct tracked *tr)
{
	/* Closing the session stops tracking. */
	if (tr->session_fd >= 0)
		close(tr->session_fd);
	tr->session_fd = -1;
	if (tr->uffd >= 0)
		close(tr->uffd);
	free(tr->pm);
	tr->uffd = -1;
	tr->pm = NULL;
}

static unsigned char *map_region(size_t len)
{
	unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	/* Small pages: the paper measured 4 KiB pages. */
	madvise(p, len, MADV_NOHUGEPAGE);
	memset(p, 1, len);
	return p;
}

static bool setup(struct tracked *tr, enum tracker t, unsigned char *p,
		  size_t len, const char *bench)
{
	int err = track(tr, t, p, len);

	if (err) {
		printf("# %s: %s: cannot track: %s\n", bench, tracker_name[t],
		       strerror(-err));
		errors++;
		untrack(tr);
		return false;
	}
	return true;
}

/* ---- experiment 1: write-only working sets ------------------------------- */

static void bench_write(void)
{
	unsigned long mib;
	int passes = short_mode ? 2 : 5;

	for (mib = 1; mib <= max_mib; mib *= 2) {
		size_t len = mib * MIB;
		unsigned char *p = map_region(len);
		int t;

		if (!p) {
			printf("# write: cannot map %lu MiB\n", mib);
			break;
		}
		for (t = 0; t < NR_TRACKERS; t++) {
			struct tracked tr;
			double best = 1e30, sum = 0, collect_ms = 0;
			long dirty = 0;
			int pass;

			if (!setup(&tr, t, p, len, "write"))
				continue;
			for (pass = 0; pass < passes; pass++) {
				double t0, t1, t2;
				size_t off;

				t0 = now_ms();
				for (off = 0; off < len; off += PAGE)
					memset(p + off, pass + 2, PAGE);
				t1 = now_ms();
				/* The reset before the next pass. */
				dirty = collect(&tr);
				t2 = now_ms();
				if (dirty < 0)
					errors++;
				best = t1 - t0 < best ? t1 - t0 : best;
				sum += t1 - t0;
				collect_ms += t2 - t1;
			}
			printf("{\"bench\":\"write\",\"tracker\":\"%s\",\"ws_mib\":%lu,"
			       "\"passes\":%d,\"write_ms_best\":%.3f,\"write_ms_mean\":%.3f,"
			       "\"mib_per_s\":%.1f,\"reset_ms_mean\":%.3f,\"dirty_pages\":%ld}\n",
			       tracker_name[t], mib, passes, best, sum / passes,
			       mib / (best / 1e3), collect_ms / passes, dirty);
			untrack(&tr);
		}
		munmap(p, len);
	}
}

/* ---- experiment 2: throughput timeline ----------------------------------- */

/* One 4096-byte operation on a random page: 25% reads, 75% writes. */
static void op(unsigned char *p, size_t pages, unsigned char *buf)
{
	uint64_t x = rnd();
	unsigned char *q = p + (x >> 16) % pages * PAGE;

	if ((x & 3) == 0)
		memcpy(buf, q, PAGE);
	else
		memset(q, (int)x, PAGE);
}

static void bench_timeline(void)
{
	size_t len = (short_mode ? 16 : 64) * MIB;
	int intervals = short_mode ? 10 : 50, t;
	unsigned char *p = map_region(len), buf[PAGE];

	if (len > max_mib * MIB)
		len = max_mib * MIB;
	if (!p) {
		printf("# timeline: cannot map\n");
		errors++;
		return;
	}
	for (t = 0; t < NR_TRACKERS; t++) {
		struct tracked tr;
		int i;

		if (!setup(&tr, t, p, len, "timeline"))
			continue;
		for (i = 0; i < intervals; i++) {
			double t0 = now_ms(), t1, t2;
			unsigned long ops = 0;
			long dirty;

			do {
				int k;

				for (k = 0; k < 64; k++)
					op(p, len / PAGE, buf);
				ops += 64;
				t1 = now_ms();
			} while (t1 - t0 < 100);
			dirty = collect(&tr);
			t2 = now_ms();
			if (dirty < 0)
				errors++;
			printf("{\"bench\":\"timeline\",\"tracker\":\"%s\",\"region_mib\":%zu,"
			       "\"interval\":%d,\"interval_ms\":%.1f,\"ops\":%lu,"
			       "\"ops_per_s\":%.0f,\"collect_ms\":%.3f,\"dirty_pages\":%ld}\n",
			       tracker_name[t], len / MIB, i, t1 - t0, ops,
			       ops / ((t1 - t0) / 1e3), t2 - t1, dirty);
		}
		untrack(&tr);
	}
	munmap(p, len);
}

/* ---- experiment 3: key-value store with a periodic tracker ---------------- */

struct ext_tracked;
static long ext_collect(struct ext_tracked *e);

struct kv_tracker {
	struct tracked *tr;		/* this process's store, or */
	struct ext_tracked *ext;	/* another process (redis) */
	double period_ms;
	bool stop;
	unsigned long rounds;
	double collect_ms;
	long dirty;
};

static void *kv_tracker_fn(void *arg)
{
	struct kv_tracker *k = arg;
	double next = now_ms() + k->period_ms;

	while (!__atomic_load_n(&k->stop, __ATOMIC_RELAXED)) {
		double t0 = now_ms(), t1;
		long d;

		if (t0 < next) {
			usleep(1000);
			continue;
		}
		d = k->ext ? ext_collect(k->ext) : collect(k->tr);
		t1 = now_ms();
		if (d < 0)
			errors++;
		else
			k->dirty += d;
		k->collect_ms += t1 - t0;
		k->rounds++;
		next += k->period_ms;
	}
	return NULL;
}

/* Zipf-like key (theta ~0.99) from a uniform number, by inverse power. */
static size_t zipf_key(size_t n)
{
	double u = (rnd() >> 11) * (1.0 / 9007199254740992.0);
	double k = n * u * u * u * u;	/* skewed toward small keys */

	return (size_t)k % n;
}

static void bench_kv(void)
{
	size_t keys = (short_mode ? 4 : 16) * MIB / PAGE, len = keys * PAGE;
	const double periods_s[] = { 1, 5, 10 };
	double duration_s = short_mode ? 1 : 30;
	unsigned char *store = map_region(len), buf[PAGE];
	size_t pi;
	int t;

	if (!store) {
		errors++;
		return;
	}
	for (t = 0; t < NR_TRACKERS; t++) {
		for (pi = 0; pi < 3; pi++) {
			struct kv_tracker k = { 0 };
			struct tracked tr;
			unsigned long ops = 0;
			double period = periods_s[pi] * (short_mode ? 100 : 1000);
			double t0, t1;
			pthread_t th;

			if (t == NONE && pi)
				break;
			if (!setup(&tr, t, store, len, "kv"))
				break;
			k.tr = &tr;
			k.period_ms = period;
			if (t != NONE && pthread_create(&th, NULL, kv_tracker_fn, &k)) {
				errors++;
				untrack(&tr);
				break;
			}
			t0 = now_ms();
			do {
				int j;

				for (j = 0; j < 64; j++) {
					unsigned char *v = store + zipf_key(keys) * PAGE;

					if ((rnd() & 3) == 0)
						memcpy(buf, v, PAGE);
					else
						memset(v, (int)ops + j, PAGE);
				}
				ops += 64;
				t1 = now_ms();
			} while (t1 - t0 < duration_s * 1e3);
			__atomic_store_n(&k.stop, true, __ATOMIC_RELAXED);
			if (t != NONE)
				pthread_join(th, NULL);
			printf("{\"bench\":\"kv\",\"tracker\":\"%s\",\"keys\":%zu,"
			       "\"period_s\":%.1f,\"duration_s\":%.1f,\"ops\":%lu,"
			       "\"ops_per_s\":%.0f,\"rounds\":%lu,\"collect_ms_mean\":%.3f,"
			       "\"dirty_pages_mean\":%.0f}\n",
			       tracker_name[t], keys, t == NONE ? 0 : period / 1e3,
			       (t1 - t0) / 1e3, ops, ops / ((t1 - t0) / 1e3), k.rounds,
			       k.rounds ? k.collect_ms / k.rounds : 0,
			       k.rounds ? (double)k.dirty / k.rounds : 0);
			untrack(&tr);
		}
	}
	munmap(store, len);
}

/* ---- experiment 3 with Redis: tracking another process ------------------- */

#define REDIS_SERVER	"/usr/bin/redis-server"
#define REDIS_SOCK	"/tmp/ldt-bench-redis.sock"
#define REDIS_DEPTH	16	/* pipelined requests per round trip */
/* The whole user address space (x86-64, 4-level paging). */
#define USER_END	0x7ffffffff000ULL

/*
 * Trackers of another process's whole address space.  PAGEMAP_SCAN's
 * write-protect mode needs a userfaultfd registered by the tracked process
 * itself, so from outside it reads the soft-dirty category instead (and
 * resets with clear_refs, like soft-dirty).
 */
struct ext_tracked {
	enum tracker t;
	int pm_fd;
	int session_fd;		/* LDT: the tracking session */
	char clear_refs[64];
	char maps[64];
};

static long ext_reset_soft_dirty(struct ext_tracked *e, long pages)
{
	return write_text(e->clear_refs, "4") ?: pages;
}

/* soft-dirty: pagemap entries of every writable mapping, from maps. */
static long ext_soft_dirty(struct ext_tracked *e)
{
	static uint64_t pm[VEC_LEN];
	unsigned long start, end;
	char line[512], perms[8];
	long pages = 0;
	FILE *f = fopen(e->maps, "r");

	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%lx-%lx %7s", &start, &end, perms) != 3 ||
		    perms[1] != 'w')
			continue;
		while (start < end) {
			size_t n = (end - start) / PAGE, i;
			ssize_t got;

			if (n > VEC_LEN)
				n = VEC_LEN;
			got = pread(e->pm_fd, pm, n * 8, start / PAGE * 8);
			if (got <= 0)
				break;
			for (i = 0; i < (size_t)got / 8; i++)
				pages += (pm[i] >> 55) & 1;
			start += n * PAGE;
		}
	}
	fclose(f);
	return ext_reset_soft_dirty(e, pages);
}

static long ext_collect(struct ext_tracked *e)
{
	switch (e->t) {
	case NONE:
		return 0;
	case SOFT_DIRTY:
		return ext_soft_dirty(e);
	case PAGEMAP_SCAN_WP: {
		long pages = scan_range(e->pm_fd, 0, USER_END, 0,
					PAGE_IS_SOFT_DIRTY);

		return pages < 0 ? pages : ext_reset_soft_dirty(e, pages);
	}
	case LDT:
		return ldt_range(e->session_fd, 0, USER_END);
	default:
		return -EINVAL;
	}
}

static int ext_track(struct ext_tracked *e, enum tracker t, pid_t pid)
{
	char path[64];

	memset(e, 0, sizeof(*e));
	e->t = t;
	snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
	snprintf(e->clear_refs, sizeof(e->clear_refs), "/proc/%d/clear_refs", pid);
	snprintf(e->maps, sizeof(e->maps), "/proc/%d/maps", pid);
	e->session_fd = -1;
	e->pm_fd = open(path, O_RDONLY);
	if (e->pm_fd < 0)
		return -errno;
	if (t == LDT) {
		e->session_fd = ldt_start(e->pm_fd, 0, USER_END);
		if (e->session_fd < 0)
			return e->session_fd;
	}
	return ext_collect(e) < 0 ? -EIO : 0;
}

static void ext_untrack(struct ext_tracked *e)
{
	/* Closing the session stops tracking. */
	if (e->session_fd >= 0)
		close(e->session_fd);
	if (e->pm_fd >= 0)
		close(e->pm_fd);
	e->session_fd = -1;
	e->pm_fd = -1;
}

/* A Redis connection with a read buffer for RESP replies. */
struct redis {
	int fd;
	char in[1 << 16];
	size_t have, used;
};

static bool redis_fill(struct redis *r)
{
	ssize_t n;

	if (r->used) {
		memmove(r->in, r->in + r->used, r->have - r->used);
		r->have -= r->used;
		r->used = 0;
	}
	n = read(r->fd, r->in + r->have, sizeof(r->in) - r->have);
	if (n <= 0)
		return false;
	r->have += n;
	return true;
}

/* Consumes one reply; false on a connection error or an error reply. */
static bool redis_reply(struct redis *r)
{
	for (;;) {
		char *s = r->in + r->used, *nl;
		size_t avail = r->have - r->used;

		nl = avail ? memchr(s, '\n', avail) : NULL;
		if (nl) {
			size_t line = nl + 1 - s;
			long len;

			if (s[0] == '+' || s[0] == ':') {
				r->used += line;
				return true;
			}
			if (s[0] != '$')
				return false;	/* '-' error or a type we never ask for */
			len = strtol(s + 1, NULL, 10);
			if (len < 0) {
				r->used += line;
				return true;
			}
			if (avail >= line + len + 2) {
				r->used += line + len + 2;
				return true;
			}
		}
		if (!redis_fill(r))
			return false;
	}
}

static bool write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);

		if (w <= 0)
			return false;
		p += w;
		n -= w;
	}
	return true;
}

/* REDIS_DEPTH commands (SET with a 4096-byte value or GET), then replies. */
static bool redis_round(struct redis *r, size_t keys, bool all_sets,
			size_t first)
{
	static char out[REDIS_DEPTH * (PAGE + 128)];
	static char val[PAGE];
	size_t n = 0;
	int j;

	for (j = 0; j < REDIS_DEPTH; j++) {
		char key[32];
		size_t k = all_sets ? (first + j) % keys : zipf_key(keys);
		int kl = snprintf(key, sizeof(key), "key:%zu", k);

		if (!all_sets && (rnd() & 3) == 0) {
			n += sprintf(out + n, "*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n", kl, key);
		} else {
			memset(val, 'a' + (int)(rnd() % 26), PAGE);
			n += sprintf(out + n, "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%lu\r\n",
				     kl, key, PAGE);
			memcpy(out + n, val, PAGE);
			n += PAGE;
			memcpy(out + n, "\r\n", 2);
			n += 2;
		}
	}
	if (!write_all(r->fd, out, n))
		return false;
	for (j = 0; j < REDIS_DEPTH; j++)
		if (!redis_reply(r))
			return false;
	return true;
}

static const char *redis_server(void)
{
	const char *p = getenv("LDT_BENCH_REDIS");

	return p && *p ? p : REDIS_SERVER;
}

static pid_t redis_start(struct redis *r)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	pid_t pid;
	int i;

	unlink(REDIS_SOCK);
	pid = fork();
	if (pid == 0) {
		int null = open("/dev/null", O_WRONLY);

		if (null >= 0) {
			dup2(null, 1);
			dup2(null, 2);
		}
		execl(redis_server(), "redis-server", "--port", "0",
		      "--unixsocket", REDIS_SOCK, "--save", "", "--appendonly",
		      "no", "--daemonize", "no", "--loglevel", "warning",
		      (char *)NULL);
		_exit(127);
	}
	if (pid < 0)
		return -1;
	strcpy(sa.sun_path, REDIS_SOCK);
	/* Up to 60 s: under an interpreting hypervisor exec is slow. */
	for (i = 0; i < 600; i++) {
		r->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (r->fd < 0)
			break;
		if (!connect(r->fd, (struct sockaddr *)&sa, sizeof(sa)))
			return pid;
		close(r->fd);
		r->fd = -1;
		if (waitpid(pid, NULL, WNOHANG) == pid)
			return -1;
		usleep(100000);
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return -1;
}

static void bench_redis(void)
{
	size_t keys = (short_mode ? 1 : 16) * MIB / PAGE;
	const double periods_s[] = { 1, 5, 10 };
	double duration_s = short_mode ? 1 : 30;
	struct redis r = { .fd = -1 };
	size_t i, pi;
	pid_t pid;
	int t;

	if (access(redis_server(), X_OK)) {
		printf("# redis: skipped: no %s (boot with the initrd of images/build-redis.sh)\n",
		       redis_server());
		return;
	}
	pid = redis_start(&r);
	if (pid < 0) {
		printf("# redis: cannot start %s\n", redis_server());
		errors++;
		return;
	}
	/* Every key once, so the store is resident before any tracking. */
	for (i = 0; i < keys; i += REDIS_DEPTH) {
		if (!redis_round(&r, keys, true, i)) {
			printf("# redis: loading the keys failed\n");
			errors++;
			goto out;
		}
	}
	for (t = 0; t < NR_TRACKERS; t++) {
		for (pi = 0; pi < 3; pi++) {
			struct kv_tracker k = { 0 };
			struct ext_tracked e;
			unsigned long ops = 0;
			double period = periods_s[pi] * (short_mode ? 100 : 1000);
			double t0, t1;
			pthread_t th;
			int err;

			if (t == NONE && pi)
				break;
			err = ext_track(&e, t, pid);
			if (err) {
				printf("# redis: %s: cannot track: %s\n",
				       tracker_name[t], strerror(-err));
				errors++;
				ext_untrack(&e);
				break;
			}
			k.ext = &e;
			k.period_ms = period;
			if (t != NONE && pthread_create(&th, NULL, kv_tracker_fn, &k)) {
				errors++;
				ext_untrack(&e);
				break;
			}
			t0 = now_ms();
			do {
				if (!redis_round(&r, keys, false, 0)) {
					printf("# redis: request failed\n");
					errors++;
					break;
				}
				ops += REDIS_DEPTH;
				t1 = now_ms();
			} while (t1 - t0 < duration_s * 1e3);
			t1 = now_ms();
			__atomic_store_n(&k.stop, true, __ATOMIC_RELAXED);
			if (t != NONE)
				pthread_join(th, NULL);
			printf("{\"bench\":\"redis\",\"tracker\":\"%s\",\"keys\":%zu,"
			       "\"period_s\":%.1f,\"duration_s\":%.1f,\"ops\":%lu,"
			       "\"ops_per_s\":%.0f,\"rounds\":%lu,\"collect_ms_mean\":%.3f,"
			       "\"dirty_pages_mean\":%.0f}\n",
			       t == PAGEMAP_SCAN_WP ? "pagemap-scan-sd" : tracker_name[t],
			       keys, t == NONE ? 0 : period / 1e3, (t1 - t0) / 1e3, ops,
			       ops / ((t1 - t0) / 1e3), k.rounds,
			       k.rounds ? k.collect_ms / k.rounds : 0,
			       k.rounds ? (double)k.dirty / k.rounds : 0);
			ext_untrack(&e);
		}
	}
out:
	close(r.fd);
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
	unlink(REDIS_SOCK);
}

/* ---- experiment 4: time to collect the dirty information ------------------ */

static void bench_collect(void)
{
	size_t len = (short_mode ? 16 : 128) * MIB;
	unsigned char *p;
	int t, pct;

	if (len > max_mib * MIB)
		len = max_mib * MIB;
	p = map_region(len);
	if (!p) {
		errors++;
		return;
	}
	for (t = SOFT_DIRTY; t < NR_TRACKERS; t++) {
		struct tracked tr;

		if (!setup(&tr, t, p, len, "collect"))
			continue;
		for (pct = 10; pct <= 100; pct += 10) {
			size_t pages = len / PAGE, n = pages * pct / 100, i;
			double t0, t1;
			long dirty;

			/* Every (100/pct)-th page, spread over the region. */
			for (i = 0; i < n; i++)
				p[i * pages / n * PAGE] = (unsigned char)i;
			t0 = now_ms();
			dirty = collect(&tr);
			t1 = now_ms();
			if (dirty < 0)
				errors++;
			printf("{\"bench\":\"collect\",\"tracker\":\"%s\",\"region_mib\":%zu,"
			       "\"written_pct\":%d,\"written_pages\":%zu,\"collect_ms\":%.3f,"
			       "\"dirty_pages\":%ld}\n",
			       tracker_name[t], len / MIB, pct, n, t1 - t0, dirty);
		}
		untrack(&tr);
	}
	munmap(p, len);
}

/* One JSON object naming the run's conditions, before the results. */
static void print_meta(void)
{
	struct utsname u;

	if (uname(&u))
		memset(&u, 0, sizeof(u));
	printf("{\"bench\":\"meta\",\"mode\":\"%s\",\"max_mib\":%lu,"
	       "\"kernel\":\"%s\",\"kernel_version\":\"%s\",\"machine\":\"%s\","
	       "\"cpus\":%ld,\"tsc_khz\":%.0f}\n",
	       short_mode ? "short" : "full", max_mib, u.release, u.version,
	       u.machine, sysconf(_SC_NPROCESSORS_ONLN), tsc_per_ms);
}

static const struct {
	const char *name;
	void (*fn)(void);
} benches[] = {
	{ "write", bench_write },
	{ "timeline", bench_timeline },
	{ "kv", bench_kv },
	{ "redis", bench_redis },
	{ "collect", bench_collect },
};

int main(int argc, char **argv)
{
	bool any = false;
	size_t b;
	int i;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--short"))
			short_mode = true;
		else if (!strcmp(argv[i], "--max-mib") && i + 1 < argc)
			max_mib = strtoul(argv[++i], NULL, 0);
		else if (argv[i][0] == '-') {
			fprintf(stderr, "usage: %s [--short] [--max-mib N] [write|timeline|kv|redis|collect]...\n",
				argv[0]);
			return 2;
		}
	}
	if (!max_mib)
		max_mib = short_mode ? 16 : 128;
	pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
	if (pagemap_fd < 0) {
		perror("/proc/self/pagemap");
		return 1;
	}
	printf("# ldt-bench: %s mode, up to %lu MiB; one JSON object per line\n",
	       short_mode ? "short" : "full", max_mib);
	calibrate();
	print_meta();
	for (i = 1; i < argc; i++) {
		for (b = 0; b < sizeof(benches) / sizeof(benches[0]); b++) {
			if (!strcmp(argv[i], benches[b].name)) {
				benches[b].fn();
				any = true;
			}
		}
	}
	if (!any)
		for (b = 0; b < sizeof(benches) / sizeof(benches[0]); b++)
			benches[b].fn();
	printf("# ldt-bench: %s\n", errors ? "errors" : "done");
	return errors ? 1 : 0;
}
