// SPDX-License-Identifier: GPL-2.0
/*
 * ldt-selftest: tests of lightweight dirty tracking (LDT, CONFIG_LWDT; see
 * Documentation/admin-guide/mm/lwdt.rst in the patched kernel).
 *
 * The property tested everywhere: LDT never misses a write.  Each test
 * writes pages (at random, over anonymous memory, shmem, private file
 * mappings, THPs and small pages), keeps its own record of what it wrote,
 * then harvests with LWDT_HARVEST and checks that every written page was
 * reported.  Where it makes sense the same writes are also tracked by
 * soft-dirty (/proc/self/clear_refs + pagemap bit 55) and by PAGEMAP_SCAN
 * with userfaultfd async write-protection, and all three are compared with
 * the writer's record.  Pages reported but not written (false positives)
 * are counted and printed, never hidden; they fail no test.  The tests also
 * go through the paths where the kernel itself cleans or drops page table
 * entries (fork, mprotect, mremap, MADV_DONTNEED, munmap, MADV_FREE, swap,
 * THP split, KSM, compaction, writes through GUP) and check the OS side:
 * data written and then harvested by LDT is still swapped out and back in.
 *
 * Output is kselftest (TAP) style: "ok N name" / "not ok N name", with
 * diagnostics on "# " lines; the exit status is the number of failures.
 * A test whose prerequisite is missing (no swap, no THP, no KSM, no DAX
 * device, no memory cgroups, no fault injection) is reported as
 * "ok N name # SKIP reason".
 *
 * Usage: ldt-selftest [-q] [-s SEED] [-v] [TEST...]
 *   -q       quick: smaller areas, fewer rounds (for machines where page
 *            faults are slow)
 *   -s SEED  seed of the random write patterns (default: from the clock;
 *            printed, so a failure can be replayed)
 *   -v       print per-round details
 *   TEST     run only the named tests
 *
 * In the LDT guest image this runs as /bin/ldt-selftest.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>

#if __has_include("linux/lwdt.h")
#include <linux/lwdt.h>
#else
/* Built outside the kernel tree against older headers: a copy of the uapi. */
#include "lwdt-uapi.h"
#endif

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
#define PAGE_IS_HUGE		(1 << 6)
#define PM_SCAN_WP_MATCHING	(1 << 0)
#define PM_SCAN_CHECK_WPASYNC	(1 << 1)
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
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

#define PM_SOFT_DIRTY	(1ULL << 55)
#define PM_PRESENT	(1ULL << 63)

#define THP_SIZE	(2UL << 20)

static size_t page_size;
static int pagemap_fd = -1;
/* The session of the tests that track this process (lwdt_start()). */
static int session_fd = -1;
/* LWDT_START returned 0: a kernel without session descriptors. */
static bool first_revision;
static bool verbose;
static uint64_t rng_state;
static int test_nr, failures;

/* Print a diagnostic line; kselftest readers skip lines starting with '#'. */
static void diag(const char *fmt, ...)
{
	va_list ap;

	fputs("# ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
}

static void result(bool ok, const char *name)
{
	printf("%sok %d %s\n", ok ? "" : "not ", ++test_nr, name);
	fflush(stdout);
	if (!ok)
		failures++;
}

static void skip(const char *name, const char *why)
{
	printf("ok %d %s # SKIP %s\n", ++test_nr, name, why);
	fflush(stdout);
}

static uint64_t rnd(void)
{
	/* xorshift64* */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1DULL;
}

static size_t rnd_below(size_t n)
{
	return n ? rnd() % n : 0;
}

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = write(fd, text, strlen(text));
	close(fd);
	return n == (ssize_t)strlen(text) ? 0 : -EIO;
}

static long read_long(const char *path)
{
	char buf[64] = "";
	int fd = open(path, O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	return n > 0 ? strtol(buf, NULL, 10) : -1;
}

static int write_long(const char *path, long v)
{
	char buf[32];

	snprintf(buf, sizeof(buf), "%ld", v);
	return write_file(path, buf);
}

/* A "name value" line of a /proc file such as /proc/vmstat. */
static long proc_value(const char *path, const char *key)
{
	char line[256];
	size_t klen = strlen(key);
	long v = -1;
	FILE *f = fopen(path, "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, key, klen) &&
		    (line[klen] == ' ' || line[klen] == ':')) {
			v = strtol(line + klen + 1, NULL, 10);
			break;
		}
	}
	fclose(f);
	return v;
}

/* ---- LDT ------------------------------------------------------------- */

/*
 * LWDT_START on the pagemap file @fd: the new session's descriptor, or
 * -errno.  (The series' first revision returned 0 and kept the session on
 * the pagemap file itself: then a duplicate of @fd stands for it, so that
 * these tests can show what that revision missed.)
 */
static int lwdt_start_fd(int fd, const void *p, size_t len)
{
	struct lwdt_start_arg arg = {
		.size = sizeof(arg),
		.start = (uintptr_t)p,
		.end = (uintptr_t)p + len,
	};
	int ret = ioctl(fd, LWDT_START, &arg);

	if (ret < 0)
		return -errno;
	if (!ret)
		first_revision = true;
	return ret ? ret : dup(fd);
}

static int lwdt_start(const void *p, size_t len)
{
	int fd = lwdt_start_fd(pagemap_fd, p, len);

	if (fd < 0)
		return fd;
	session_fd = fd;
	return 0;
}

/* LWDT_STOP on session @fd, then close it: 0 or -errno of LWDT_STOP. */
static int lwdt_stop_fd(int fd)
{
	int ret = ioctl(fd, LWDT_STOP) ? -errno : 0;

	close(fd);
	return ret;
}

static int lwdt_stop(void)
{
	int ret = session_fd >= 0 ? lwdt_stop_fd(session_fd) : -EBADF;

	session_fd = -1;
	return ret;
}

#define VEC_MAX 4096
static struct lwdt_region lwdt_vec[VEC_MAX];

struct harvest_stats {
	long calls, regions, pages, outside;
};

/*
 * Harvest [p, p + len) of the process behind @fd, marking map[i] for every
 * page i reported; regions of vec_len at most and max_pages per call
 * (0: none), resuming from walk_end until the range is covered.  Returns
 * 0 or -errno.
 */
static int lwdt_collect_fd(int fd, const void *p, size_t len,
			  unsigned char *map, size_t vec_len, size_t max_pages,
			  struct harvest_stats *st)
{
	uintptr_t base = (uintptr_t)p, end = base + len;
	struct lwdt_harvest_arg arg = {
		.size = sizeof(arg),
		.start = base,
		.end = end,
		.vec = (uintptr_t)lwdt_vec,
		.vec_len = vec_len,
		.max_pages = max_pages,
	};
	struct harvest_stats dummy = { 0 };

	if (!st)
		st = &dummy;
	if (vec_len > VEC_MAX)
		return -EINVAL;
	for (;;) {
		long n = ioctl(fd, LWDT_HARVEST, &arg);
		long i;

		if (n < 0)
			return -errno;
		st->calls++;
		st->regions += n;
		for (i = 0; i < n; i++) {
			uint64_t a;

			if (lwdt_vec[i].start < arg.start || lwdt_vec[i].end > end ||
			    lwdt_vec[i].start >= lwdt_vec[i].end) {
				st->outside++;
				continue;
			}
			for (a = lwdt_vec[i].start; a < lwdt_vec[i].end;
			     a += page_size) {
				if (map)
					map[(a - base) / page_size] = 1;
				st->pages++;
			}
		}
		if (arg.walk_end >= end)
			return 0;
		if (arg.walk_end < arg.start)
			return -ERANGE;
		if (arg.walk_end == arg.start && n == 0)
			return -ELOOP;	/* no progress */
		arg.start = arg.walk_end;
	}
}

static int lwdt_collect(const void *p, size_t len, unsigned char *map)
{
	return lwdt_collect_fd(session_fd, p, len, map, VEC_MAX, 0, NULL);
}

/* ---- soft-dirty and PAGEMAP_SCAN, the references ----------------------- */

static int sd_clear(void)
{
	return write_file("/proc/self/clear_refs", "4");
}

static int pagemap_entries(const void *p, size_t npages, uint64_t *ent)
{
	off_t off = (uintptr_t)p / page_size * sizeof(uint64_t);
	ssize_t n = pread(pagemap_fd, ent, npages * sizeof(uint64_t), off);

	return n == (ssize_t)(npages * sizeof(uint64_t)) ? 0 : -EIO;
}

static int sd_collect(const void *p, size_t npages, unsigned char *map)
{
	uint64_t *ent = calloc(npages, sizeof(*ent));
	size_t i;
	int ret;

	if (!ent)
		return -ENOMEM;
	ret = pagemap_entries(p, npages, ent);
	for (i = 0; !ret && i < npages; i++)
		map[i] = !!(ent[i] & PM_SOFT_DIRTY);
	free(ent);
	return ret;
}

/* PAGEMAP_SCAN over a range registered for async uffd write-protection. */
struct scan {
	int uffd;
	const void *p;
	size_t len;
};

static struct page_region scan_vec[VEC_MAX];

/* Report written pages into map (if any) and write-protect them again. */
static int scan_collect(struct scan *s, unsigned char *map)
{
	uintptr_t base = (uintptr_t)s->p, end = base + s->len;
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
		.start = base,
		.end = end,
		.vec = (uintptr_t)scan_vec,
		.vec_len = VEC_MAX,
		.category_mask = PAGE_IS_WRITTEN,
		.return_mask = PAGE_IS_WRITTEN,
	};

	for (;;) {
		long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
		long i;

		if (n < 0)
			return -errno;
		for (i = 0; map && i < n; i++) {
			uint64_t a;

			for (a = scan_vec[i].start; a < scan_vec[i].end;
			     a += page_size)
				map[(a - base) / page_size] = 1;
		}
		if (arg.walk_end >= end)
			return 0;
		arg.start = arg.walk_end;
	}
}

static int scan_init(struct scan *s, const void *p, size_t len)
{
	struct uffdio_api api = {
		.api = UFFD_API,
		.features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED |
			    UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
	};
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)p, .len = len },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};

	s->p = p;
	s->len = len;
	s->uffd = syscall(__NR_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
	if (s->uffd < 0)
		return -errno;
	if (ioctl(s->uffd, UFFDIO_API, &api) ||
	    ioctl(s->uffd, UFFDIO_REGISTER, &reg) || scan_collect(s, NULL)) {
		int err = -errno;

		close(s->uffd);
		s->uffd = -1;
		return err ? err : -EIO;
	}
	return 0;
}

static void scan_fini(struct scan *s)
{
	if (s->uffd >= 0)
		close(s->uffd);
	s->uffd = -1;
}

/* ---- test areas ---------------------------------------------------------- */

enum area_kind { ANON, SHMEM, PRIVATE_FILE, THP };

static const char *const kind_name[] = {
	[ANON] = "anon", [SHMEM] = "shmem", [PRIVATE_FILE] = "private-file",
	[THP] = "thp",
};

/* A mapping under test with the writer's record and what each tracker saw. */
struct area {
	enum area_kind kind;
	unsigned char *p;
	size_t len, npages;
	void *raw;		/* what to munmap */
	size_t raw_len;
	int fd;
	unsigned char *written, *ldt, *sd, *scan;
};

static void area_clear_maps(struct area *a)
{
	memset(a->written, 0, a->npages);
	memset(a->ldt, 0, a->npages);
	memset(a->sd, 0, a->npages);
	memset(a->scan, 0, a->npages);
}

/* Whether THPs can be had: enabled is "always" or "madvise". */
static bool thp_ok;

static void thp_setup(void)
{
	const char *path = "/sys/kernel/mm/transparent_hugepage/enabled";
	char buf[128] = "";
	int fd = open(path, O_RDONLY);

	if (fd >= 0) {
		if (read(fd, buf, sizeof(buf) - 1) < 0)
			buf[0] = 0;
		close(fd);
	}
	if (strstr(buf, "[never]")) {
		/* The kernel turns THP off below 512 MiB of RAM. */
		if (write_file(path, "madvise"))
			diag("THP is off and cannot be turned on");
		else
			diag("THP was off; set to madvise");
	}
	fd = open(path, O_RDONLY);
	buf[0] = 0;
	if (fd >= 0) {
		if (read(fd, buf, sizeof(buf) - 1) < 0)
			buf[0] = 0;
		close(fd);
	}
	thp_ok = strstr(buf, "[always]") || strstr(buf, "[madvise]");
	/* For MADV_COLLAPSE of shmem. */
	path = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
	fd = open(path, O_RDONLY);
	buf[0] = 0;
	if (fd >= 0) {
		if (read(fd, buf, sizeof(buf) - 1) < 0)
			buf[0] = 0;
		close(fd);
	}
	if (strstr(buf, "[never]"))
		write_file(path, "advise");
}

/* How many pages of [p, p + len) are mapped by THPs (PAGEMAP_SCAN). */
static long thp_pages(const void *p, size_t len)
{
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.start = (uintptr_t)p,
		.end = (uintptr_t)p + len,
		.vec = (uintptr_t)scan_vec,
		.vec_len = VEC_MAX,
		.category_mask = PAGE_IS_HUGE,
		.return_mask = PAGE_IS_HUGE,
	};
	long n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg), i, pages = 0;

	for (i = 0; i < n; i++)
		pages += (scan_vec[i].end - scan_vec[i].start) / page_size;
	return n < 0 ? -errno : pages;
}

static int area_map(struct area *a, enum area_kind kind, size_t len)
{
	int flags = MAP_PRIVATE | MAP_ANONYMOUS;
	/* THP-aligned for all kinds: MADV_COLLAPSE may be asked for later. */
	size_t align = THP_SIZE;
	char path[] = "/tmp/ldt-selftest-XXXXXX";
	unsigned char *raw;

	memset(a, 0, sizeof(*a));
	a->kind = kind;
	a->fd = -1;
	a->len = len;
	a->npages = len / page_size;
	if (kind == SHMEM) {
		a->fd = memfd_create("ldt-selftest", MFD_CLOEXEC);
		flags = MAP_SHARED;
	} else if (kind == PRIVATE_FILE) {
		a->fd = mkstemp(path);
		if (a->fd >= 0)
			unlink(path);
		flags = MAP_PRIVATE;
	}
	if (a->fd >= 0 && ftruncate(a->fd, len))
		return -errno;
	if ((kind == SHMEM || kind == PRIVATE_FILE) && a->fd < 0)
		return -errno;
	if (kind == PRIVATE_FILE) {
		/* Give the file contents, so the private mapping has pages to COW. */
		unsigned char *buf = calloc(1, len);
		ssize_t n;

		if (!buf)
			return -ENOMEM;
		memset(buf, 0x5a, len);
		n = pwrite(a->fd, buf, len, 0);
		free(buf);
		if (n != (ssize_t)len)
			return -EIO;
	}
	/* Reserve, then map at an aligned address inside the reservation. */
	a->raw_len = len + align;
	raw = mmap(NULL, a->raw_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS |
		   MAP_NORESERVE, -1, 0);
	if (raw == MAP_FAILED)
		return -errno;
	a->raw = raw;
	a->p = (unsigned char *)(((uintptr_t)raw + align - 1) & ~(align - 1));
	if (mmap(a->p, len, PROT_READ | PROT_WRITE, flags | MAP_FIXED, a->fd,
		 0) == MAP_FAILED)
		return -errno;
	if (kind == THP && madvise(a->p, len, MADV_HUGEPAGE))
		return -errno;
	a->written = calloc(a->npages, 1);
	a->ldt = calloc(a->npages, 1);
	a->sd = calloc(a->npages, 1);
	a->scan = calloc(a->npages, 1);
	if (!a->written || !a->ldt || !a->sd || !a->scan)
		return -ENOMEM;
	return 0;
}

static void area_unmap(struct area *a)
{
	if (a->raw)
		munmap(a->raw, a->raw_len);
	if (a->fd >= 0)
		close(a->fd);
	free(a->written);
	free(a->ldt);
	free(a->sd);
	free(a->scan);
	memset(a, 0, sizeof(*a));
	a->fd = -1;
}

/* A store and a load the compiler must emit, of whatever type. */
#define STORE(p, v)	__atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define LOAD(p)		__atomic_load_n((p), __ATOMIC_RELAXED)

/* Write one byte (value v) at a random offset of page i. */
static void write_page(struct area *a, size_t i, unsigned char v)
{
	STORE(a->p + i * page_size + rnd_below(page_size), v);
	a->written[i] = 1;
}

static unsigned char read_page(struct area *a, size_t i)
{
	return LOAD(a->p + i * page_size + rnd_below(page_size));
}

/*
 * Write about frac of pages [from, to), at random, and read as many.
 */
static size_t write_random_range(struct area *a, size_t from, size_t to,
				 double frac)
{
	size_t k = (to - from) * frac, j;

	if (!k)
		k = 1;
	for (j = 0; j < k; j++) {
		write_page(a, from + rnd_below(to - from), (unsigned char)rnd());
		(void)read_page(a, from + rnd_below(to - from));
	}
	return k;
}

static size_t write_random(struct area *a, double frac)
{
	return write_random_range(a, 0, a->npages, frac);
}

/* Write every page (to populate it). */
static void write_all(struct area *a, unsigned char v)
{
	size_t i;

	for (i = 0; i < a->npages; i++)
		a->p[i * page_size] = v;
}

/*
 * Map and populate an area for test @name.  Returns 0, or reports the test
 * (failed, or skipped when THPs cannot be had) and returns -1.
 */
static int area_setup(const char *name, struct area *a, enum area_kind kind,
		      size_t len)
{
	int err;

	if (kind == THP && !thp_ok) {
		skip(name, "THP not available");
		memset(a, 0, sizeof(*a));
		a->fd = -1;
		return -1;
	}
	err = area_map(a, kind, len);
	if (err) {
		diag("%s: mapping failed: %s", name, strerror(-err));
		result(false, name);
		area_unmap(a);
		return -1;
	}
	write_all(a, 1);
	if (kind == THP) {
		long n = thp_pages(a->p, a->len);

		if (n <= 0) {
			skip(name, "no THP allocated");
			area_unmap(a);
			return -1;
		}
		if (verbose)
			diag("%s: %ld of %zu pages in THPs", name, n, a->npages);
	}
	return 0;
}

static size_t count(const unsigned char *m, size_t n)
{
	size_t c = 0, i;

	for (i = 0; i < n; i++)
		c += !!m[i];
	return c;
}

/*
 * Compare the trackers with the writer's record.  Returns the pages LDT
 * missed; the references' counts are printed (a negative have_* skips
 * one).
 */
static size_t compare(const char *what, struct area *a, bool have_sd,
		      bool have_scan)
{
	size_t i, w = 0, l = 0, lm = 0, lf = 0, s = 0, sm = 0, sf = 0;
	size_t c = 0, cm = 0, cf = 0;
	char sdtext[96] = "", sctext[96] = "";

	for (i = 0; i < a->npages; i++) {
		w += a->written[i];
		l += a->ldt[i];
		lm += a->written[i] && !a->ldt[i];
		lf += !a->written[i] && a->ldt[i];
		s += a->sd[i];
		sm += a->written[i] && !a->sd[i];
		sf += !a->written[i] && a->sd[i];
		c += a->scan[i];
		cm += a->written[i] && !a->scan[i];
		cf += !a->written[i] && a->scan[i];
	}
	if (have_sd)
		snprintf(sdtext, sizeof(sdtext),
			 "; soft-dirty %zu (missed %zu, extra %zu)", s, sm, sf);
	if (have_scan)
		snprintf(sctext, sizeof(sctext),
			 "; pagemap_scan %zu (missed %zu, extra %zu)", c, cm, cf);
	if (verbose || lm)
		diag("%s: written %zu; ldt %zu (missed %zu, extra %zu)%s%s",
		     what, w, l, lm, lf, sdtext, sctext);
	for (i = 0, c = 0; lm && i < a->npages && c < 8; i++) {
		if (a->written[i] && !a->ldt[i]) {
			diag("%s: missed page %zu (%p)", what, i,
			     a->p + i * page_size);
			c++;
		}
	}
	return lm;
}

/* Totals over the rounds of one test, for its summary line. */
struct totals {
	size_t written, lwdt_missed, lwdt_extra, sd_missed, sd_extra;
	size_t scan_missed, scan_extra;
};

static void add_totals(struct totals *t, struct area *a)
{
	size_t i;

	for (i = 0; i < a->npages; i++) {
		t->written += a->written[i];
		t->lwdt_missed += a->written[i] && !a->ldt[i];
		t->lwdt_extra += !a->written[i] && a->ldt[i];
		t->sd_missed += a->written[i] && !a->sd[i];
		t->sd_extra += !a->written[i] && a->sd[i];
		t->scan_missed += a->written[i] && !a->scan[i];
		t->scan_extra += !a->written[i] && a->scan[i];
	}
}

/* ---- tests --------------------------------------------------------------- */

/* Size of most test areas, and rounds of random writes (-q halves both). */
static size_t area_len = 8UL << 20;
static int rounds = 4;

/* Error handling of the interface. */
static void test_api(void)
{
	const char *name = "api";
	struct lwdt_start_arg sa = { .size = sizeof(sa) };
	struct lwdt_harvest_arg ha = { .size = sizeof(ha) };
	unsigned char *p;
	bool ok = true;
	int fd;

	p = mmap(NULL, 16 * page_size, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		result(false, name);
		return;
	}
#define EXPECT(cond) do { if (!(cond)) { diag("%s: line %d: %s (errno %d)", \
		name, __LINE__, #cond, errno); ok = false; } } while (0)
	ha.start = (uintptr_t)p;
	ha.end = (uintptr_t)p + 16 * page_size;
	ha.vec = (uintptr_t)lwdt_vec;
	ha.vec_len = 16;
	/* Harvest and stop only work on a session (ENOTTY since 6.12.118). */
	EXPECT(ioctl(pagemap_fd, LWDT_HARVEST, &ha) == -1 && (errno == ENOTTY || errno == EINVAL));
	EXPECT(ioctl(pagemap_fd, LWDT_STOP) == -1 && (errno == ENOTTY || errno == EINVAL));
	/* Bad arguments. */
	sa.start = (uintptr_t)p;
	sa.end = (uintptr_t)p + 16 * page_size;
	sa.size = sizeof(sa) + 8;
	EXPECT(ioctl(pagemap_fd, LWDT_START, &sa) == -1 && errno == EINVAL);
	sa.size = sizeof(sa);
	sa.flags = 1;
	EXPECT(ioctl(pagemap_fd, LWDT_START, &sa) == -1 && errno == EINVAL);
	sa.flags = 0;
	sa.start = (uintptr_t)p + 1;
	EXPECT(ioctl(pagemap_fd, LWDT_START, &sa) == -1 && errno == EINVAL);
	sa.start = sa.end;
	EXPECT(ioctl(pagemap_fd, LWDT_START, &sa) == -1 && errno == EINVAL);
	sa.start = (uintptr_t)p;
	fd = ioctl(pagemap_fd, LWDT_START, &sa);
	EXPECT(fd > 2);
	EXPECT(fcntl(fd, F_GETFD) == FD_CLOEXEC);
	ha.vec_len = 0;
	EXPECT(ioctl(fd, LWDT_HARVEST, &ha) == -1 && errno == EINVAL);
	ha.vec_len = 16;
	ha.flags = 1;
	EXPECT(ioctl(fd, LWDT_HARVEST, &ha) == -1 && errno == EINVAL);
	ha.flags = 0;
	ha.size = 8;
	EXPECT(ioctl(fd, LWDT_HARVEST, &ha) == -1 && errno == EINVAL);
	ha.size = sizeof(ha);
	/* Nothing written yet: nothing reported, walk_end at the end. */
	EXPECT(ioctl(fd, LWDT_HARVEST, &ha) == 0);
	EXPECT(ha.walk_end == ha.end);
	p[3 * page_size] = 1;
	EXPECT(ioctl(fd, LWDT_HARVEST, &ha) == 1);
	EXPECT(lwdt_vec[0].start == (uintptr_t)p + 3 * page_size &&
	       lwdt_vec[0].end == (uintptr_t)p + 4 * page_size);
	/* Outside the tracked range nothing is reported. */
	p[3 * page_size] = 2;
	ha.end = (uintptr_t)p + 32 * page_size;
	EXPECT(ioctl(fd, LWDT_HARVEST, &ha) == 1);
	EXPECT(ha.walk_end == ha.end);
	/* The pagemap file's other ioctls are not the session's. */
	EXPECT(ioctl(fd, 0x7777, NULL) == -1 && errno == ENOTTY);
	EXPECT(ioctl(fd, LWDT_STOP) == 0);
	EXPECT(ioctl(fd, LWDT_STOP) == -1 && errno == EINVAL);
	EXPECT(ioctl(fd, LWDT_HARVEST, &ha) == -1 && errno == EINVAL);
	EXPECT(close(fd) == 0);
	EXPECT(ioctl(pagemap_fd, 0x7777, NULL) == -1);
#undef EXPECT
	munmap(p, 16 * page_size);
	result(ok, name);
}

/*
 * Random writes over one kind of memory, in rounds; after each round LDT,
 * soft-dirty and PAGEMAP_SCAN report what they saw.
 */
static void test_random(enum area_kind kind)
{
	char name[64];
	struct totals t = { 0 };
	struct scan sc = { .uffd = -1 };
	bool have_scan, ok = true;
	struct area a;
	int r, err;

	snprintf(name, sizeof(name), "random_%s", kind_name[kind]);
	if (area_setup(name, &a, kind, area_len))
		return;
	err = scan_init(&sc, a.p, a.len);
	have_scan = !err;
	if (err)
		diag("%s: no PAGEMAP_SCAN reference: %s", name, strerror(-err));
	if (lwdt_start(a.p, a.len) || sd_clear()) {
		result(false, name);
		goto out;
	}
	for (r = 0; r < rounds; r++) {
		char what[96];

		area_clear_maps(&a);
		write_random(&a, (r + 1) * 0.05);
		if (sd_collect(a.p, a.npages, a.sd) || sd_clear() ||
		    (have_scan && scan_collect(&sc, a.scan)) ||
		    lwdt_collect(a.p, a.len, a.ldt)) {
			diag("%s: collecting failed: %s", name, strerror(errno));
			ok = false;
			break;
		}
		snprintf(what, sizeof(what), "%s round %d", name, r);
		if (compare(what, &a, true, have_scan))
			ok = false;
		add_totals(&t, &a);
	}
	diag("%s: %d rounds, %zu pages written: ldt missed %zu extra %zu; "
	     "soft-dirty missed %zu extra %zu; pagemap_scan %s missed %zu extra %zu",
	     name, rounds, t.written, t.lwdt_missed, t.lwdt_extra, t.sd_missed,
	     t.sd_extra, have_scan ? "" : "(unavailable)", t.scan_missed,
	     t.scan_extra);
	if (lwdt_stop())
		ok = false;
	result(ok, name);
out:
	scan_fini(&sc);
	area_unmap(&a);
}

/* Harvests stopped by a small vector or max_pages resume without loss. */
static void test_resume(void)
{
	const char *name = "resume";
	struct harvest_stats st1 = { 0 }, st2 = { 0 };
	bool ok = true;
	struct area a;
	size_t i, j;

	if (area_setup(name, &a, ANON, area_len))
		return;
	lwdt_start(a.p, a.len);
	/* Scattered pages: many regions. */
	for (i = 0; i < a.npages; i += 3)
		write_page(&a, i, 2);
	if (lwdt_collect_fd(session_fd, a.p, a.len, a.ldt, 1, 0, &st1))
		ok = false;
	if (compare("resume vec_len=1", &a, false, false))
		ok = false;
	area_clear_maps(&a);
	/* Runs of pages, cut by max_pages. */
	for (i = 0; i < a.npages; i += 64)
		for (j = 0; j < 20 && i + j < a.npages; j++)
			write_page(&a, i + j, 3);
	if (lwdt_collect_fd(session_fd, a.p, a.len, a.ldt, 7, 13, &st2))
		ok = false;
	if (compare("resume max_pages=13", &a, false, false))
		ok = false;
	/* The stopped harvests left nothing behind. */
	memset(a.ldt, 0, a.npages);
	if (lwdt_collect(a.p, a.len, a.ldt) || count(a.ldt, a.npages))
		ok = false;
	diag("%s: vec_len 1: %ld calls %ld regions %ld pages", name,
	     st1.calls, st1.regions, st1.pages);
	diag("%s: max_pages 13: %ld calls %ld regions %ld pages", name,
	     st2.calls, st2.regions, st2.pages);
	if (st1.outside || st2.outside)
		ok = false;
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/* After a harvest, reads alone make LDT report nothing. */
static void test_clean(void)
{
	const char *name = "reads_are_clean";
	bool ok = true;
	struct area a;
	size_t i, n;

	if (area_setup(name, &a, ANON, area_len))
		return;
	lwdt_start(a.p, a.len);
	for (i = 0; i < a.npages; i++)
		(void)read_page(&a, i);
	if (lwdt_collect(a.p, a.len, a.ldt))
		ok = false;
	n = count(a.ldt, a.npages);
	diag("%s: %zu pages read, %zu reported", name, a.npages, n);
	if (n)
		ok = false;
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/*
 * fork(): the parent's pages written before the fork (now write-protected
 * for COW) and after it (COW copies) are all reported; the child is not
 * tracked, and its writes do not show in the parent.
 */
static void test_fork(enum area_kind kind)
{
	char name[64];
	bool ok = true;
	struct area a;
	int status, i;
	pid_t pid;

	snprintf(name, sizeof(name), "fork_%s", kind_name[kind]);
	if (area_setup(name, &a, kind, area_len))
		return;
	lwdt_start(a.p, a.len);
	for (i = 0; i < 3; i++) {
		write_random(&a, 0.05);
		pid = fork();
		if (pid == 0) {
			struct lwdt_harvest_arg ha = {
				.size = sizeof(ha),
				.start = (uintptr_t)a.p,
				.end = (uintptr_t)a.p + a.len,
				.vec = (uintptr_t)lwdt_vec,
				.vec_len = 1,
			};
			int bad = 0, fd;

			/*
			 * Tracking is not inherited: the child's own mm
			 * takes a session.  (The inherited pagemap_fd
			 * still stands for the parent's mm.)
			 */
			pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
			if (pagemap_fd < 0 ||
			    ioctl(pagemap_fd, LWDT_HARVEST, &ha) != -1 ||
			    (errno != ENOTTY && errno != EINVAL))
				bad = 1;
			fd = lwdt_start_fd(pagemap_fd, a.p, a.len);
			if (fd < 0 || lwdt_stop_fd(fd))
				bad = 1;
			if (kind != SHMEM)
				write_random(&a, 0.1);
			_exit(bad);
		}
		if (pid < 0 || waitpid(pid, &status, 0) != pid ||
		    !WIFEXITED(status) || WEXITSTATUS(status)) {
			diag("%s: child failed", name);
			ok = false;
		}
		write_random(&a, 0.05);
		if (lwdt_collect(a.p, a.len, a.ldt)) {
			ok = false;
			break;
		}
		if (compare(name, &a, false, false))
			ok = false;
		area_clear_maps(&a);
	}
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/* mprotect() read-only, PROT_NONE and back keeps what was written. */
static void test_mprotect(enum area_kind kind)
{
	char name[64];
	bool ok = true;
	struct area a;
	int r;

	snprintf(name, sizeof(name), "mprotect_%s", kind_name[kind]);
	if (area_setup(name, &a, kind, area_len))
		return;
	lwdt_start(a.p, a.len);
	for (r = 0; r < 3; r++) {
		int prot = r == 1 ? PROT_NONE : PROT_READ;

		write_random(&a, 0.1);
		if (mprotect(a.p, a.len / 2, prot) ||
		    mprotect(a.p + a.len / 4, a.len / 2, PROT_READ) ||
		    (r == 2 && lwdt_collect(a.p, a.len, a.ldt)) ||
		    mprotect(a.p, a.len, PROT_READ | PROT_WRITE)) {
			ok = false;
			break;
		}
		if (r != 2 && lwdt_collect(a.p, a.len, a.ldt))
			ok = false;
		if (compare(name, &a, false, false))
			ok = false;
		area_clear_maps(&a);
	}
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/*
 * mremap() moves the written pages; LDT reports them at their new
 * addresses (the tracked range covers both).
 */
static void test_mremap(enum area_kind kind)
{
	char name[64];
	size_t len = area_len / 2, half = len / page_size, i;
	bool ok = true;
	struct area a;
	unsigned char *dst;

	snprintf(name, sizeof(name), "mremap_%s", kind_name[kind]);
	/* One area: the first half is mapped, the second is where it moves. */
	if (area_setup(name, &a, kind, area_len))
		return;
	dst = a.p + len;
	if (munmap(dst, len)) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	lwdt_start(a.p, a.len);
	write_random_range(&a, 0, half, 0.1);
	if (mremap(a.p, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, dst) != dst) {
		diag("%s: mremap: %s", name, strerror(errno));
		result(false, name);
		area_unmap(&a);
		return;
	}
	/* The writes now live at dst. */
	for (i = 0; i < half; i++) {
		a.written[half + i] = a.written[i];
		a.written[i] = 0;
	}
	if (lwdt_collect(a.p, a.len, a.ldt) ||
	    compare(name, &a, false, false))
		ok = false;
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/* Pages zapped by MADV_DONTNEED or munmap() are reported from the log. */
static void test_zap(enum area_kind kind, bool unmap)
{
	char name[64];
	bool ok = true;
	struct area a;
	int r;

	snprintf(name, sizeof(name), "%s_%s", unmap ? "munmap" : "dontneed",
		 kind_name[kind]);
	if (area_setup(name, &a, kind, area_len))
		return;
	lwdt_start(a.p, a.len);
	for (r = 0; r < 3; r++) {
		size_t off = rnd_below(a.npages / 2) * page_size;
		size_t len = (1 + rnd_below(a.npages / 4)) * page_size;

		if (kind == THP)
			off &= ~(THP_SIZE - 1);
		write_random(&a, 0.1);
		if (unmap) {
			if (munmap(a.p + off, len) ||
			    mmap(a.p + off, len, PROT_READ | PROT_WRITE,
				 MAP_FIXED | (a.fd >= 0 && kind == SHMEM ?
				 MAP_SHARED : MAP_PRIVATE) |
				 (a.fd >= 0 ? 0 : MAP_ANONYMOUS),
				 a.fd, a.fd >= 0 ? off : 0) == MAP_FAILED)
				ok = false;
		} else if (madvise(a.p + off, len, MADV_DONTNEED)) {
			ok = false;
		}
		if (lwdt_collect(a.p, a.len, a.ldt) ||
		    compare(name, &a, false, false))
			ok = false;
		area_clear_maps(&a);
	}
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/*
 * Pre-copy migration in miniature: a writer thread keeps writing random
 * values while the tracker harvests and copies the reported pages to a
 * destination; after the writer stops and a last round, the copy must
 * equal the source byte for byte.  This also catches writes through
 * stale TLB entries after a harvest.
 */
struct copy_writer {
	struct area *a;
	bool stop;
	uint64_t seed;
	unsigned long writes, zaps;
};

static void *copy_writer_fn(void *arg)
{
	struct copy_writer *cw = arg;
	uint64_t x = cw->seed | 1;

	while (!LOAD(&cw->stop)) {
		size_t i, off;

		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		/*
		 * Mostly a few hot pages, whose translations stay in the
		 * TLB (a harvest that did not flush them would never see
		 * their later writes), sometimes any page.
		 */
		if (x & 31)
			i = cw->a->npages / 2 + (x >> 8) % 8;
		else
			i = (x >> 8) % cw->a->npages;
		off = (x >> 32) % (page_size / 8) * 8;
		STORE((uint64_t *)(cw->a->p + i * page_size + off), x);
		cw->writes++;
	}
	return NULL;
}

/*
 * With it, a second thread keeps zapping THP-sized blocks (MADV_DONTNEED)
 * while the harvests run: huge PMDs and PTEs torn down concurrently with
 * the walk must reach the copy either as entries or through the log (a
 * race the test exercises but cannot force).
 */
static void *copy_zapper_fn(void *arg)
{
	struct copy_writer *cw = arg;
	uint64_t x = (cw->seed ^ 0x9e3779b97f4a7c15ULL) | 1;
	size_t blocks = cw->a->len / THP_SIZE;

	while (!LOAD(&cw->stop)) {
		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		madvise(cw->a->p + (x >> 8) % blocks * THP_SIZE, THP_SIZE,
			MADV_DONTNEED);
		cw->zaps++;
		usleep(300);
	}
	return NULL;
}

static void test_copy(enum area_kind kind, bool zap)
{
	char name[64];
	struct copy_writer cw = { 0 };
	unsigned char *dst;
	pthread_t th, zth;
	bool ok = true;
	struct area a;
	size_t i, copied = 0, diff = 0;
	int r;

	snprintf(name, sizeof(name), "precopy_%s%s", zap ? "zap_" : "",
		 kind_name[kind]);
	if (area_setup(name, &a, kind, area_len / 2))
		return;
	dst = malloc(a.len);
	if (!dst) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	lwdt_start(a.p, a.len);
	memcpy(dst, a.p, a.len);	/* round 0: everything */
	cw.a = &a;
	cw.seed = rnd();
	if (pthread_create(&th, NULL, copy_writer_fn, &cw)) {
		result(false, name);
		goto out;
	}
	if (zap && pthread_create(&zth, NULL, copy_zapper_fn, &cw)) {
		STORE(&cw.stop, true);
		pthread_join(th, NULL);
		result(false, name);
		goto out;
	}
	for (r = 0; r < 20; r++) {
		usleep(2000);
		memset(a.ldt, 0, a.npages);
		if (lwdt_collect(a.p, a.len, a.ldt)) {
			ok = false;
			break;
		}
		for (i = 0; i < a.npages; i++) {
			if (a.ldt[i]) {
				memcpy(dst + i * page_size, a.p + i * page_size,
				       page_size);
				copied++;
			}
		}
	}
	STORE(&cw.stop, true);
	pthread_join(th, NULL);
	if (zap)
		pthread_join(zth, NULL);
	/* Last round, with the writer stopped. */
	memset(a.ldt, 0, a.npages);
	if (lwdt_collect(a.p, a.len, a.ldt))
		ok = false;
	for (i = 0; i < a.npages; i++) {
		if (a.ldt[i]) {
			memcpy(dst + i * page_size, a.p + i * page_size,
			       page_size);
			copied++;
		}
	}
	for (i = 0; i < a.npages; i++) {
		if (memcmp(dst + i * page_size, a.p + i * page_size,
			   page_size)) {
			if (diff < 10)
				diag("%s: page %zu differs", name, i);
			diff++;
		}
	}
	diag("%s: %lu writes, %lu zaps, %zu pages copied in 21 rounds, %zu pages differ",
	     name, cw.writes, cw.zaps, copied, diff);
	if (diff)
		ok = false;
	result(ok, name);
out:
	lwdt_stop();
	free(dst);
	area_unmap(&a);
}

/* Writes from another process: the tracker uses the child's pagemap. */
static void test_remote(void)
{
	const char *name = "remote";
	int go[2], done[2], fd = -1, sfd = -1;
	bool ok = true;
	struct area a;
	char path[64];
	pid_t pid;
	char c;

	if (area_map(&a, ANON, area_len) || pipe(go) || pipe(done)) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	write_all(&a, 1);
	/* Same seed in both: the child writes what the parent expects. */
	pid = fork();
	if (pid == 0) {
		if (read(go[0], &c, 1) != 1)
			_exit(1);
		write_random(&a, 0.1);
		if (write(done[1], "x", 1) != 1)
			_exit(1);
		if (read(go[0], &c, 1) != 1)
			_exit(1);
		_exit(0);
	}
	snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
	fd = open(path, O_RDONLY);
	if (pid > 0 && fd >= 0)
		sfd = lwdt_start_fd(fd, a.p, a.len);
	if (sfd < 0) {
		ok = false;
		goto out;
	}
	if (write(go[1], "x", 1) != 1 || read(done[0], &c, 1) != 1) {
		ok = false;
		goto out;
	}
	/* The parent replays the child's choices to know what it wrote. */
	write_random(&a, 0.1);
	if (lwdt_collect_fd(sfd, a.p, a.len, a.ldt, VEC_MAX, 0, NULL) ||
	    compare(name, &a, false, false))
		ok = false;
	if (lwdt_stop_fd(sfd))
		ok = false;
out:
	if (pid > 0) {
		if (write(go[1], "x", 1) != 1)
			ok = false;
		waitpid(pid, NULL, 0);
	}
	if (fd >= 0)
		close(fd);
	close(go[0]);
	close(go[1]);
	close(done[0]);
	close(done[1]);
	area_unmap(&a);
	result(ok, name);
}

/* ---- the OS side: swap, MADV_FREE, writeback ----------------------------- */

/* Swap on zram, set up here if the system has none. */
static bool swap_ok;

static long swap_total_kb(void)
{
	return proc_value("/proc/meminfo", "SwapTotal");
}

/* A zram device of @mb MiB: its number, or -1. */
static int zram_add(long mb)
{
	char path[96];
	long id = read_long("/sys/class/zram-control/hot_add");

	if (id < 0) {
		/* No hot_add: use zram0 if it is still unused. */
		if (read_long("/sys/block/zram0/disksize") != 0)
			return -1;
		id = 0;
	}
	snprintf(path, sizeof(path), "/sys/block/zram%ld/disksize", id);
	if (write_long(path, mb << 20))
		return -1;
	return id;
}

static void swap_setup(void)
{
	char cmd[128];
	int id;

	if (swap_total_kb() > 0) {
		swap_ok = true;
		return;
	}
	id = zram_add(128);
	if (id < 0) {
		diag("no swap, and no zram device to swap on");
		return;
	}
	snprintf(cmd, sizeof(cmd),
		 "mkswap /dev/zram%d >/dev/null && swapon /dev/zram%d", id, id);
	if (system(cmd))
		diag("no swap: '%s' failed", cmd);
	swap_ok = swap_total_kb() > 0;
	if (swap_ok)
		diag("swap on /dev/zram%d, %ld kB", id, swap_total_kb());
}

/* Page i's content: one word at each end, from its index and a version. */
static void put_version(struct area *a, size_t i, uint32_t ver)
{
	uint64_t v = ((uint64_t)ver << 32) | i;
	uint64_t *q = (uint64_t *)(a->p + i * page_size);

	STORE(&q[0], v);
	STORE(&q[page_size / 8 - 1], v);
	a->written[i] = 1;
}

/* Pages whose content is not version ver[i]. */
static size_t check_versions(const char *name, struct area *a,
			     const uint32_t *ver)
{
	size_t i, bad = 0;

	for (i = 0; i < a->npages; i++) {
		uint64_t want = ((uint64_t)ver[i] << 32) | i;
		uint64_t *q = (uint64_t *)(a->p + i * page_size);
		uint64_t first = LOAD(&q[0]), last = LOAD(&q[page_size / 8 - 1]);

		if (first != want || last != want) {
			if (bad < 5)
				diag("%s: page %zu has %#" PRIx64 ", want %#" PRIx64,
				     name, i, first, want);
			bad++;
		}
	}
	return bad;
}

/* Pages of the area not in memory (mincore()), i.e. swapped out. */
static size_t swapped_pages(struct area *a)
{
	unsigned char *vec = calloc(a->npages, 1);
	size_t i, n = 0;

	if (vec && !mincore(a->p, a->len, vec))
		for (i = 0; i < a->npages; i++)
			n += !(vec[i] & 1);
	free(vec);
	return n;
}

/*
 * Swap-out and swap-in: pages written and harvested (hardware dirty bit
 * moved to OSB) must still be written to swap, and pages written and
 * swapped out before a harvest must still be reported.  Contents are
 * checked after every swap-in.
 */
static void test_swap(enum area_kind kind)
{
	char name[64];
	uint32_t *ver = NULL;
	bool ok = true;
	struct area a;
	size_t i, out;
	int r;

	snprintf(name, sizeof(name), "swap_%s", kind_name[kind]);
	if (!swap_ok) {
		skip(name, "no swap");
		return;
	}
	if (kind == THP && !thp_ok) {
		skip(name, "THP not available");
		return;
	}
	if (area_map(&a, kind, area_len / 2)) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	ver = calloc(a.npages, sizeof(*ver));
	if (!ver) {
		result(false, name);
		goto out;
	}
	/*
	 * Fresh pages, written once and harvested: a new shmem folio is not
	 * marked dirty by the fault, only its entry is, so if the harvest
	 * left the OS no dirty bit (OSB), reclaim would drop the data.
	 */
	lwdt_start(a.p, a.len);
	for (i = 0; i < a.npages; i++)
		put_version(&a, i, ver[i] = 1);
	if (lwdt_collect(a.p, a.len, a.ldt) || compare(name, &a, false, false))
		ok = false;
	lwdt_stop();
	area_clear_maps(&a);
	/* Out and back in for reading: pages now in the swap cache, clean. */
	if (madvise(a.p, a.len, MADV_PAGEOUT)) {
		diag("%s: MADV_PAGEOUT: %s", name, strerror(errno));
		result(false, name);
		goto out;
	}
	out = swapped_pages(&a);
	/*
	 * Swap in through the swap cache (MADV_WILLNEED; a read fault alone
	 * would bypass it on zram): the folios stay there, clean, mapped
	 * writable, and a write only sets the entry's dirty bit.
	 */
	madvise(a.p, a.len, MADV_WILLNEED);
	if (check_versions(name, &a, ver))
		ok = false;
	lwdt_start(a.p, a.len);
	area_clear_maps(&a);
	for (r = 2; r < 6; r++) {
		size_t k = a.npages / 8, j, bad;

		for (j = 0; j < k; j++) {
			i = rnd_below(a.npages);
			put_version(&a, i, ver[i] = r);
		}
		/* Even rounds: harvest first, so only OSB keeps them dirty. */
		if (r % 2 == 0 && lwdt_collect(a.p, a.len, a.ldt))
			ok = false;
		if (madvise(a.p, a.len, MADV_PAGEOUT))
			ok = false;
		out = swapped_pages(&a);
		if (r % 2 && lwdt_collect(a.p, a.len, a.ldt))
			ok = false;
		if (compare(name, &a, false, false))
			ok = false;
		madvise(a.p, a.len, MADV_WILLNEED);
		bad = check_versions(name, &a, ver);
		if (bad)
			ok = false;
		diag("%s: round %d: %zu pages written, %zu swapped out, %zu wrong after swap-in",
		     name, r, count(a.written, a.npages),
		     out, bad);
		area_clear_maps(&a);
	}
	lwdt_stop();
	result(ok, name);
out:
	free(ver);
	area_unmap(&a);
}

/*
 * MADV_FREE cleans the entries (the tracker keeps them in TB), then
 * reclaim discards the clean pages (the tracker's log keeps them).
 */
static void test_madv_free(enum area_kind kind)
{
	char name[64];
	bool ok = true;
	struct area a;
	size_t zero = 0, i;
	int r;

	snprintf(name, sizeof(name), "madvfree_%s", kind_name[kind]);
	if (area_setup(name, &a, kind, area_len / 2))
		return;
	lwdt_start(a.p, a.len);
	for (r = 0; r < 4; r++) {
		write_random(&a, 0.1);
		if (madvise(a.p, a.len, MADV_FREE))
			ok = false;
		/* Odd rounds: and reclaim what MADV_FREE made discardable. */
		if (r % 2 && swap_ok && madvise(a.p, a.len, MADV_PAGEOUT))
			ok = false;
		if (lwdt_collect(a.p, a.len, a.ldt) ||
		    compare(name, &a, false, false))
			ok = false;
		area_clear_maps(&a);
	}
	for (i = 0; i < a.npages; i++)
		zero += !LOAD(a.p + i * page_size);
	diag("%s: %zu pages were discarded", name, zero);
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/*
 * Writeback: a shared mapping of a block device (zram) has write-notify
 * and real writeback, so msync() cleans its entries with folio_mkclean().
 * Pages written before that must still be reported (TB), and pages
 * harvested before it must still be written back (their folios were
 * dirtied by the write fault; checked on the device after dropping the
 * page cache).
 */
static void test_writeback(void)
{
	const char *name = "writeback_blockdev";
	size_t len = area_len / 2, i;
	uint32_t *ver = NULL;
	struct area a;
	char path[32];
	bool ok = true;
	int id, fd, r;

	id = zram_add(len >> 20);
	if (id < 0) {
		skip(name, "no zram device");
		return;
	}
	snprintf(path, sizeof(path), "/dev/zram%d", id);
	fd = open(path, O_RDWR);
	memset(&a, 0, sizeof(a));
	a.len = len;
	a.npages = len / page_size;
	a.fd = -1;
	a.p = fd < 0 ? MAP_FAILED : mmap(NULL, len, PROT_READ | PROT_WRITE,
					 MAP_SHARED, fd, 0);
	a.written = calloc(a.npages, 1);
	a.ldt = calloc(a.npages, 1);
	a.sd = calloc(a.npages, 1);
	a.scan = calloc(a.npages, 1);
	ver = calloc(a.npages, sizeof(*ver));
	if (a.p == MAP_FAILED || !a.written || !a.ldt || !ver) {
		diag("%s: cannot map %s: %s", name, path, strerror(errno));
		result(false, name);
		goto out;
	}
	for (i = 0; i < a.npages; i++)
		put_version(&a, i, ver[i] = 1);
	if (msync(a.p, len, MS_SYNC))
		ok = false;
	lwdt_start(a.p, len);
	area_clear_maps(&a);
	for (r = 2; r < 6; r++) {
		size_t k = a.npages / 8, j;

		for (j = 0; j < k; j++) {
			i = rnd_below(a.npages);
			put_version(&a, i, ver[i] = r);
		}
		/* Even rounds harvest before the writeback, odd ones after. */
		if (r % 2 == 0 && lwdt_collect(a.p, len, a.ldt))
			ok = false;
		if (msync(a.p, len, MS_SYNC))
			ok = false;
		if (r % 2 && lwdt_collect(a.p, len, a.ldt))
			ok = false;
		if (compare(name, &a, false, false))
			ok = false;
		area_clear_maps(&a);
	}
	lwdt_stop();
	/* What is on the device? */
	munmap(a.p, len);
	a.p = NULL;
	if (fsync(fd) || write_file("/proc/sys/vm/drop_caches", "1"))
		ok = false;
	a.p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
	if (a.p == MAP_FAILED || check_versions(name, &a, ver))
		ok = false;
	if (a.p != MAP_FAILED)
		munmap(a.p, len);
	a.p = NULL;
	result(ok, name);
out:
	if (a.p && a.p != MAP_FAILED)
		munmap(a.p, len);
	if (fd >= 0)
		close(fd);
	free(ver);
	free(a.written);
	free(a.ldt);
	free(a.sd);
	free(a.scan);
}

/* ---- THP split and collapse, KSM, migration, GUP ------------------------- */

/*
 * Splitting a huge PMD into PTEs keeps its dirty state as it is: dirty for
 * the tracker only (after MADV_FREE cleaned it: TB), or for the OS only
 * (after a harvest: OSB, which must not turn into 512 false positives).
 * A split of the folio itself (partial MADV_PAGEOUT) goes through
 * migration entries.
 */
static void test_thp_split(void)
{
	const char *name = "thp_split";
	size_t thp_pages_nr = THP_SIZE / page_size, extra;
	bool ok = true;
	struct area a;
	long huge;

	if (area_setup(name, &a, THP, 2 * THP_SIZE))
		return;
	lwdt_start(a.p, a.len);

	/* TB: written, cleaned by MADV_FREE, split by mprotect(). */
	write_random_range(&a, 0, thp_pages_nr, 0.05);
	if (madvise(a.p, THP_SIZE, MADV_FREE) ||
	    mprotect(a.p + page_size, page_size, PROT_READ))
		ok = false;
	huge = thp_pages(a.p, THP_SIZE);
	if (lwdt_collect(a.p, a.len, a.ldt) ||
	    compare("thp_split TB", &a, false, false))
		ok = false;
	diag("%s: split with TB: %ld huge pages left, %zu reported",
	     name, huge, count(a.ldt, a.npages));
	area_clear_maps(&a);

	/* OSB: written, harvested, split. */
	write_random_range(&a, thp_pages_nr, 2 * thp_pages_nr, 0.05);
	if (lwdt_collect(a.p, a.len, a.ldt) ||
	    compare("thp_split OSB (before)", &a, false, false))
		ok = false;
	area_clear_maps(&a);
	if (mprotect(a.p + THP_SIZE + page_size, page_size, PROT_READ))
		ok = false;
	if (lwdt_collect(a.p, a.len, a.ldt))
		ok = false;
	extra = count(a.ldt, a.npages);
	diag("%s: split with OSB: %zu reported (false positives)", name, extra);
	area_clear_maps(&a);
	if (mprotect(a.p, a.len, PROT_READ | PROT_WRITE))
		ok = false;

	/* Written, then the folio split through migration entries. */
	if (swap_ok) {
		area_unmap(&a);
		if (area_setup(name, &a, THP, 2 * THP_SIZE))
			return;
		lwdt_start(a.p, a.len);
		write_random(&a, 0.05);
		if (madvise(a.p + THP_SIZE / 2, THP_SIZE, MADV_PAGEOUT))
			ok = false;
		if (lwdt_collect(a.p, a.len, a.ldt) ||
		    compare("thp_split folio", &a, false, false))
			ok = false;
		diag("%s: folio split by partial pageout: %ld huge pages left",
		     name, thp_pages(a.p, a.len));
	}
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/* MADV_COLLAPSE of written small pages into a THP. */
static void test_collapse(enum area_kind kind)
{
	char name[64];
	bool ok = true;
	struct area a;
	int err;

	snprintf(name, sizeof(name), "collapse_%s", kind_name[kind]);
	if (!thp_ok) {
		skip(name, "THP not available");
		return;
	}
	err = area_map(&a, kind == THP ? ANON : kind, area_len / 2);
	if (err || madvise(a.p, a.len, MADV_NOHUGEPAGE)) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	write_all(&a, 1);
	lwdt_start(a.p, a.len);
	write_random(&a, 0.05);
	if (madvise(a.p, a.len, MADV_HUGEPAGE) ||
	    madvise(a.p, a.len, MADV_COLLAPSE)) {
		diag("%s: MADV_COLLAPSE: %s", name, strerror(errno));
		skip(name, "MADV_COLLAPSE failed");
		lwdt_stop();
		area_unmap(&a);
		return;
	}
	if (lwdt_collect(a.p, a.len, a.ldt) || compare(name, &a, false, false))
		ok = false;
	diag("%s: %ld pages in THPs after collapse, %zu reported", name,
	     thp_pages(a.p, a.len), count(a.ldt, a.npages));
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/*
 * KSM merges written pages: write_protect_page() cleans their entries
 * (TB) and replace_page() drops them (log).
 */
static void test_ksm(void)
{
	const char *name = "ksm";
	const char *run = "/sys/kernel/mm/ksm/run";
	long old_run = read_long(run);
	long old_scan = read_long("/sys/kernel/mm/ksm/pages_to_scan");
	long old_sleep = read_long("/sys/kernel/mm/ksm/sleep_millisecs");
	long merged = 0;
	bool ok = true;
	struct area a;
	size_t i;
	int t;

	if (old_run < 0) {
		skip(name, "no KSM");
		return;
	}
	if (area_setup(name, &a, ANON, area_len / 8))
		return;
	write_long("/sys/kernel/mm/ksm/pages_to_scan", 10000);
	write_long("/sys/kernel/mm/ksm/sleep_millisecs", 10);
	lwdt_start(a.p, a.len);
	for (i = 0; i < a.npages; i++) {
		memset(a.p + i * page_size, 0x77, page_size);
		a.written[i] = 1;
	}
	if (madvise(a.p, a.len, MADV_MERGEABLE) || write_long(run, 1)) {
		skip(name, "cannot enable KSM");
		goto out;
	}
	for (t = 0; t < 300; t++) {
		merged = read_long("/proc/self/ksm_merging_pages");
		if (merged >= (long)a.npages / 2)
			break;
		usleep(20000);
	}
	diag("%s: %ld of %zu pages merged", name, merged, a.npages);
	if (lwdt_collect(a.p, a.len, a.ldt) || compare(name, &a, false, false))
		ok = false;
	area_clear_maps(&a);
	/* Nothing written since: nothing to report. */
	if (lwdt_collect(a.p, a.len, a.ldt))
		ok = false;
	diag("%s: %zu reported with no writes", name, count(a.ldt, a.npages));
	area_clear_maps(&a);
	/* Writes break the sharing (COW) and are reported. */
	write_random(&a, 0.2);
	if (lwdt_collect(a.p, a.len, a.ldt) || compare(name, &a, false, false))
		ok = false;
	if (merged <= 0)
		diag("%s: KSM merged nothing in time", name);
	result(ok, name);
out:
	madvise(a.p, a.len, MADV_UNMERGEABLE);
	write_long(run, old_run);
	write_long("/sys/kernel/mm/ksm/pages_to_scan", old_scan);
	write_long("/sys/kernel/mm/ksm/sleep_millisecs", old_sleep);
	lwdt_stop();
	area_unmap(&a);
}

/* Compaction migrates pages; PFNs in pagemap show which ones moved. */
static void test_compaction(void)
{
	const char *name = "compaction";
	uint64_t *before = NULL, *after = NULL;
	size_t i, moved = 0;
	bool ok = true;
	struct area a;
	int r;

	if (access("/proc/sys/vm/compact_memory", W_OK)) {
		skip(name, "no compaction");
		return;
	}
	if (area_setup(name, &a, ANON, area_len))
		return;
	before = calloc(a.npages, sizeof(*before));
	after = calloc(a.npages, sizeof(*after));
	if (!before || !after) {
		result(false, name);
		goto out;
	}
	lwdt_start(a.p, a.len);
	for (r = 0; r < 2; r++) {
		write_random(&a, 0.2);
		if (pagemap_entries(a.p, a.npages, before) ||
		    write_file("/proc/sys/vm/compact_memory", "1") ||
		    pagemap_entries(a.p, a.npages, after))
			ok = false;
		for (i = 0; i < a.npages; i++)
			moved += (before[i] & ((1ULL << 55) - 1)) !=
				 (after[i] & ((1ULL << 55) - 1));
		if (lwdt_collect(a.p, a.len, a.ldt) ||
		    compare(name, &a, false, false))
			ok = false;
		area_clear_maps(&a);
	}
	diag("%s: %zu page moves seen", name, moved);
	lwdt_stop();
	result(ok, name);
out:
	free(before);
	free(after);
	area_unmap(&a);
}

/*
 * Writes through the kernel's own mapping of a user page (GUP:
 * process_vm_writev(), /proc/PID/mem) never set the user PTE's dirty bit;
 * LDT marks the entry dirty when the page is pinned for writing.
 */
static void test_gup(enum area_kind kind)
{
	char name[64];
	uint64_t v = 0x1234;
	bool ok = true;
	struct area a;
	int memfd = -1, r;

	snprintf(name, sizeof(name), "gup_%s", kind_name[kind]);
	if (area_setup(name, &a, kind, area_len / 2))
		return;
	memfd = open("/proc/self/mem", O_RDWR);
	lwdt_start(a.p, a.len);
	for (r = 0; r < 3; r++) {
		size_t k = a.npages / 16, j;

		for (j = 0; j < k; j++) {
			size_t i = rnd_below(a.npages);
			struct iovec local = { &v, sizeof(v) };
			struct iovec remote = { a.p + i * page_size +
						rnd_below(page_size / 8) * 8,
						sizeof(v) };

			if (j % 2) {
				if (process_vm_writev(getpid(), &local, 1,
						      &remote, 1, 0) != sizeof(v))
					ok = false;
			} else if (memfd < 0 ||
				   pwrite(memfd, &v, sizeof(v),
					  (uintptr_t)remote.iov_base) != sizeof(v)) {
				ok = false;
			}
			a.written[i] = 1;
		}
		if (lwdt_collect(a.p, a.len, a.ldt) ||
		    compare(name, &a, false, false))
			ok = false;
		area_clear_maps(&a);
	}
	if (memfd >= 0)
		close(memfd);
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/* ---- sessions ------------------------------------------------------------ */

/* Start a session on /proc/@pid/pagemap: its descriptor, or -errno. */
static int start_on_pid(pid_t pid, const void *p, size_t len)
{
	char path[64];
	int fd, ret;

	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)pid);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -errno;
	ret = lwdt_start_fd(fd, p, len);
	close(fd);
	return ret;
}

/* Whether child @pid exited with status 0. */
static bool child_ok(pid_t pid)
{
	int status;

	return pid > 0 && waitpid(pid, &status, 0) == pid &&
	       WIFEXITED(status) && !WEXITSTATUS(status);
}

/* Whether a new session of @a can start (and stop) now. */
static bool can_start(const char *name, struct area *a, const char *after)
{
	int fd = lwdt_start_fd(pagemap_fd, a->p, a->len);

	if (fd < 0) {
		diag("%s: LWDT_START after %s: %s", name, after, strerror(-fd));
		return false;
	}
	return !lwdt_stop_fd(fd);
}

/*
 * One session per address space: a second LWDT_START, from this process or
 * another, over the tracked range or a part of it, is refused with EBUSY
 * (and does not drop the first session's unharvested writes).
 */
static void test_session_busy(void)
{
	const char *name = "session_busy";
	bool ok = true;
	struct area a;
	pid_t pid;
	int fd;

	if (area_setup(name, &a, ANON, area_len / 4))
		return;
	if (lwdt_start(a.p, a.len)) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	write_random(&a, 0.2);
	fd = lwdt_start_fd(pagemap_fd, a.p + page_size, 4 * page_size);
	if (fd != -EBUSY) {
		diag("%s: second LWDT_START: %s", name,
		     fd < 0 ? strerror(-fd) : "succeeded");
		ok = false;
		if (fd >= 0)
			close(fd);
	}
	pid = fork();
	if (pid == 0) {
		close(session_fd);
		fd = start_on_pid(getppid(), a.p, a.len);
		_exit(fd == -EBUSY ? 0 : 1);
	}
	if (!child_ok(pid)) {
		diag("%s: LWDT_START from another process was not refused",
		     name);
		ok = false;
	}
	/* The first session still has all its writes. */
	if (lwdt_collect(a.p, a.len, a.ldt) || compare(name, &a, false, false))
		ok = false;
	if (lwdt_stop())
		ok = false;
	area_unmap(&a);
	result(ok, name);
}

/* Closing the session stops tracking: a new session can start. */
static void test_session_close(void)
{
	const char *name = "session_close_stops";
	bool ok = true;
	struct area a;
	int fd;

	if (area_setup(name, &a, ANON, area_len / 4))
		return;
	fd = lwdt_start_fd(pagemap_fd, a.p, a.len);
	if (fd < 0) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	write_random(&a, 0.2);
	close(fd);
	ok = can_start(name, &a, "close");
	area_unmap(&a);
	result(ok, name);
}

/*
 * A tracker that dies without stopping takes its session with it: the
 * process can be tracked again at once.
 */
static void test_session_tracker_exit(void)
{
	const char *name = "session_tracker_exit";
	bool ok = true;
	struct area a;
	pid_t pid;

	if (area_setup(name, &a, ANON, area_len / 4))
		return;
	pid = fork();
	if (pid == 0)
		_exit(start_on_pid(getppid(), a.p, a.len) < 0);
	if (!child_ok(pid)) {
		diag("%s: the tracker child failed", name);
		ok = false;
	}
	if (!can_start(name, &a, "the tracker died"))
		ok = false;
	area_unmap(&a);
	result(ok, name);
}

/*
 * Another process that can open our pagemap file cannot take the
 * session's pages (nor stop it): the session still reports every write.
 */
static void test_session_no_steal(void)
{
	const char *name = "session_no_steal";
	bool ok = true;
	struct area a;
	int status;
	pid_t pid;

	if (area_setup(name, &a, ANON, area_len / 4))
		return;
	if (lwdt_start(a.p, a.len)) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	write_random(&a, 0.2);
	pid = fork();
	if (pid == 0) {
		struct lwdt_harvest_arg ha = {
			.size = sizeof(ha),
			.start = (uintptr_t)a.p,
			.end = (uintptr_t)a.p + a.len,
			.vec = (uintptr_t)lwdt_vec,
			.vec_len = VEC_MAX,
		};
		char path[64];
		int fd;

		close(session_fd);
		snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)getppid());
		fd = open(path, O_RDONLY);
		if (fd < 0)
			_exit(2);
		/* Both must fail; the exit status says which did not. */
		_exit((ioctl(fd, LWDT_HARVEST, &ha) >= 0 ? 4 : 0) |
		      (ioctl(fd, LWDT_STOP) == 0 ? 8 : 0));
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
	    WEXITSTATUS(status)) {
		diag("%s: the other process's harvest or stop worked (status %d)",
		     name, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
		ok = false;
	}
	if (lwdt_collect(a.p, a.len, a.ldt) || compare(name, &a, false, false))
		ok = false;
	if (lwdt_stop())
		ok = false;
	area_unmap(&a);
	result(ok, name);
}

/* ---- holes: what a harvest must report, and did not ------------------------ */

/*
 * A harvest whose vector turns out unwritable after its first batch (256
 * regions) was copied out: the regions copied are returned with where to
 * resume, and resuming reports the rest.  A harvest that failed with
 * EFAULT after copying some out lost them.
 */
static void test_harvest_efault(void)
{
	const char *name = "harvest_efault_keeps_pages";
	size_t vec_bytes = 256 * sizeof(struct lwdt_region);
	struct lwdt_region *vec;
	struct lwdt_harvest_arg ha;
	bool ok = true;
	struct area a;
	long n, i;
	uint64_t addr;

	if (area_setup(name, &a, ANON, area_len))
		return;
	/* Room for 256 regions, then a page that cannot be written. */
	vec = mmap(NULL, vec_bytes + page_size, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (vec == MAP_FAILED ||
	    mprotect((char *)vec + vec_bytes, page_size, PROT_READ) ||
	    lwdt_start(a.p, a.len)) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	/* Every other page: one region each, more than two batches. */
	for (i = 0; i < (long)a.npages; i += 2)
		write_page(&a, i, 9);
	memset(&ha, 0, sizeof(ha));
	ha.size = sizeof(ha);
	ha.start = (uintptr_t)a.p;
	ha.end = (uintptr_t)a.p + a.len;
	ha.vec = (uintptr_t)vec;
	ha.vec_len = 2 * 256;
	n = ioctl(session_fd, LWDT_HARVEST, &ha);
	diag("%s: harvest into a half-writable vector: %ld (%s), walk_end +%#lx",
	     name, n, n < 0 ? strerror(errno) : "ok",
	     (unsigned long)(ha.walk_end - ha.start));
	if (n < 0) {
		/* The caller cannot know what it got: start again. */
		ha.walk_end = ha.start;
	}
	for (i = 0; i < n; i++)
		for (addr = vec[i].start; addr < vec[i].end; addr += page_size)
			a.ldt[(addr - (uintptr_t)a.p) / page_size] = 1;
	if (n == 0 || ha.walk_end < ha.start || ha.walk_end > ha.end ||
	    lwdt_collect_fd(session_fd, (void *)(uintptr_t)ha.walk_end,
			    ha.end - ha.walk_end,
			    a.ldt + (ha.walk_end - ha.start) / page_size,
			    VEC_MAX, 0, NULL))
		ok = false;
	if (compare(name, &a, false, false))
		ok = false;
	lwdt_stop();
	munmap(vec, vec_bytes + page_size);
	area_unmap(&a);
	result(ok, name);
}

/* How zap_clean() takes pages away. */
enum zap_how {
	ZAP_DONTNEED, ZAP_FREE_RECLAIM, ZAP_REMOVE, ZAP_PUNCH, ZAP_TRUNCATE,
	ZAP_SWAP_DONTNEED, ZAP_SWAP_FREE,
};

static const char *const zap_name[] = {
	[ZAP_DONTNEED] = "dontneed", [ZAP_FREE_RECLAIM] = "madvfree_reclaim",
	[ZAP_REMOVE] = "madv_remove", [ZAP_PUNCH] = "punch_hole",
	[ZAP_TRUNCATE] = "truncate", [ZAP_SWAP_DONTNEED] = "swapped_dontneed",
	[ZAP_SWAP_FREE] = "swapped_madvfree",
};

/*
 * Pages written and harvested (clean for the tracker, which copied them)
 * and then zapped or discarded read as zeros afterwards: a tracker that
 * copies what each harvest reports must be told, or it keeps the old
 * bytes.  Every page of the zapped range must be reported.
 */
static void test_zap_clean(enum zap_how how, enum area_kind kind)
{
	char name[80];
	bool ok = true, swapped = how == ZAP_SWAP_DONTNEED || how == ZAP_SWAP_FREE;
	size_t off, len, i, nonzero = 0;
	struct area a;
	int err = 0;

	snprintf(name, sizeof(name), "zap_clean_%s_%s", zap_name[how],
		 kind_name[kind]);
	if ((swapped || how == ZAP_FREE_RECLAIM) && !swap_ok) {
		skip(name, "no swap");
		return;
	}
	if (area_setup(name, &a, kind, 4 * THP_SIZE))
		return;
	/* One THP-aligned quarter of the area, in its middle. */
	off = a.len / 4;
	len = a.len / 4;
	write_all(&a, 7);
	if (lwdt_start(a.p, a.len) || lwdt_collect(a.p, a.len, NULL)) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	if (swapped && madvise(a.p + off, len, MADV_PAGEOUT))
		err = errno;
	switch (how) {
	case ZAP_DONTNEED:
	case ZAP_SWAP_DONTNEED:
		if (madvise(a.p + off, len, MADV_DONTNEED))
			err = errno;
		break;
	case ZAP_FREE_RECLAIM:
		if (madvise(a.p + off, len, MADV_FREE) ||
		    madvise(a.p + off, len, MADV_PAGEOUT))
			err = errno;
		break;
	case ZAP_SWAP_FREE:
		if (madvise(a.p + off, len, MADV_FREE))
			err = errno;
		break;
	case ZAP_REMOVE:
		if (madvise(a.p + off, len, MADV_REMOVE))
			err = errno;
		break;
	case ZAP_PUNCH:
		if (fallocate(a.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			      off, len))
			err = errno;
		break;
	case ZAP_TRUNCATE:
		/* Cut the file at off + len, then give it its size back. */
		if (ftruncate(a.fd, off) || ftruncate(a.fd, a.len))
			err = errno;
		len = a.len - off;
		break;
	}
	if (err) {
		diag("%s: %s", name, strerror(err));
		result(false, name);
		lwdt_stop();
		area_unmap(&a);
		return;
	}
	for (i = off / page_size; i < (off + len) / page_size; i++)
		a.written[i] = 1;
	if (lwdt_collect(a.p, a.len, a.ldt) || compare(name, &a, false, false))
		ok = false;
	/* The pages really changed (else the test proves nothing). */
	for (i = off / page_size; i < (off + len) / page_size; i++)
		nonzero += LOAD(a.p + i * page_size) != 0;
	diag("%s: %zu pages zapped, %zu reported, %zu still not zero", name,
	     len / page_size, count(a.ldt, a.npages), nonzero);
	lwdt_stop();
	area_unmap(&a);
	if (nonzero == len / page_size)
		skip(name, "nothing was discarded");
	else
		result(ok, name);
}

/* Whether MAP_HUGETLB of 2 MiB can be had; reserves two pages once. */
static bool hugetlb_ok(void)
{
	static int ok = -1;
	void *p;

	if (ok >= 0)
		return ok;
	if (read_long("/proc/sys/vm/nr_hugepages") < 2)
		write_long("/proc/sys/vm/nr_hugepages", 2);
	p = mmap(NULL, THP_SIZE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	ok = p != MAP_FAILED;
	if (ok)
		munmap(p, THP_SIZE);
	return ok;
}

/*
 * Mappings that are not tracked (hugetlb here) are reported in full while
 * they may have been written: also after mprotect(PROT_READ) took their
 * VM_WRITE away.  (GUP refuses FOLL_FORCE writes to hugetlb.)
 */
static void test_hugetlb_readonly(void)
{
	const char *name = "hugetlb_readonly";
	size_t npages = THP_SIZE / page_size;
	unsigned char *p, *map;
	bool ok = true;

	if (!hugetlb_ok()) {
		skip(name, "no hugetlb pages");
		return;
	}
	p = mmap(NULL, THP_SIZE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	map = calloc(npages, 1);
	if (p == MAP_FAILED || !map || lwdt_start(p, THP_SIZE)) {
		result(false, name);
		goto out;
	}
	p[5 * page_size] = 1;
	if (mprotect(p, THP_SIZE, PROT_READ) || lwdt_collect(p, THP_SIZE, map)) {
		ok = false;
	} else if (!map[5]) {
		diag("%s: the written page was not reported", name);
		ok = false;
	}
	diag("%s: %zu of %zu pages reported", name, count(map, npages),
	     npages);
	lwdt_stop();
out:
	free(map);
	if (p != MAP_FAILED)
		munmap(p, THP_SIZE);
	result(ok, name);
}

/*
 * FOLL_FORCE writes (/proc/PID/mem, as ptrace does) into a private mapping
 * that was never writable: the page they copy is reported.
 */
static void test_foll_force(void)
{
	const char *name = "foll_force_readonly_anon";
	bool ok = true;
	struct area a;
	int memfd, r;

	if (area_setup(name, &a, ANON, area_len / 4))
		return;
	memfd = open("/proc/self/mem", O_RDWR);
	if (memfd < 0 || mprotect(a.p, a.len, PROT_READ) ||
	    lwdt_start(a.p, a.len)) {
		result(false, name);
		goto out;
	}
	for (r = 0; r < 2; r++) {
		size_t k = a.npages / 8, j;

		for (j = 0; j < k; j++) {
			size_t i = rnd_below(a.npages);

			if (pwrite(memfd, "x", 1, (uintptr_t)a.p + i * page_size +
				   rnd_below(page_size)) != 1)
				ok = false;
			a.written[i] = 1;
		}
		if (lwdt_collect(a.p, a.len, a.ldt) ||
		    compare(name, &a, false, false))
			ok = false;
		area_clear_maps(&a);
	}
	lwdt_stop();
	result(ok, name);
out:
	if (memfd >= 0)
		close(memfd);
	area_unmap(&a);
}

/* Pages of [p, p + len) not in memory (mincore()), or 0. */
static size_t swapped_range(const void *p, size_t len)
{
	size_t n = len / page_size, i, out = 0;
	unsigned char *vec = calloc(n, 1);

	if (vec && !mincore((void *)p, len, vec))
		for (i = 0; i < n; i++)
			out += !(vec[i] & 1);
	free(vec);
	return out;
}

/*
 * mremap() moves pages whose dirtiness is in the log (swapped out while
 * dirty for the tracker): the log must move with them, so they are
 * reported at their new address.
 */
static void test_mremap_logged(void)
{
	const char *name = "mremap_logged_anon";
	size_t len = area_len / 4, half = len / page_size, i, out = 0;
	unsigned char *dst;
	bool ok = true;
	struct area a;

	if (!swap_ok) {
		skip(name, "no swap");
		return;
	}
	if (area_setup(name, &a, ANON, 2 * len))
		return;
	dst = a.p + len;
	if (munmap(dst, len) || lwdt_start(a.p, a.len)) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	write_random_range(&a, 0, half, 0.2);
	/* Swapped out: the dirtiness is now in the log only. */
	if (!madvise(a.p, len, MADV_PAGEOUT))
		out = swapped_range(a.p, len);
	if (!out ||
	    mremap(a.p, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, dst) != dst) {
		diag("%s: %s, %zu pages swapped out", name, strerror(errno),
		     out);
		result(false, name);
		lwdt_stop();
		area_unmap(&a);
		return;
	}
	diag("%s: %zu of %zu pages swapped out before the move", name, out,
	     half);
	for (i = 0; i < half; i++) {
		a.written[half + i] = a.written[i];
		a.written[i] = 0;
	}
	if (lwdt_collect(a.p, a.len, a.ldt) || compare(name, &a, false, false))
		ok = false;
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/*
 * CONFIG_LWDT_DEBUG's hold of a huge PMD zap (mm/lwdt_debug.c): write 1 to
 * arm it (0 disarms); reads 0 idle, 1 armed, 2 holding, 3 passed.
 */
#define ZAP_HOLD	"/sys/kernel/debug/lwdt/pmd_zap_hold"
#define ZAP_HOLDING	2

struct zap_hold {
	void *p;
	int cpu, err;
	int done;
};

static void *zap_hold_fn(void *arg)
{
	struct zap_hold *z = arg;
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(z->cpu, &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
	z->err = madvise(z->p, THP_SIZE, MADV_DONTNEED) ? errno : 0;
	__atomic_store_n(&z->done, 1, __ATOMIC_RELEASE);
	return NULL;
}

/*
 * A THP zapped (MADV_DONTNEED) while a harvest walks it: the harvest must
 * see the PMD or its log entry, never neither.  The zap clears the PMD
 * under the PMD lock; a harvest that finds it none without taking that
 * lock, and reads the log before the zap wrote it, reports nothing for the
 * 2 MiB page, which then reads as zeros.  The window is a few instructions
 * wide, too narrow to hit reliably by racing, so CONFIG_LWDT_DEBUG's hold
 * stops the zap (in a thread on another CPU) right after it cleared the
 * PMD, until a harvest walked past the hole (or two seconds passed); the
 * harvest runs while the zap holds.  On one CPU nothing can run in that
 * window (the zap holds a spinlock), so the test is skipped there.
 */
static void test_zap_thp_during_harvest(void)
{
	const char *name = "zap_thp_during_harvest";
	size_t npages = THP_SIZE / page_size, reported = 0;
	cpu_set_t old_set, set;
	struct zap_hold z = { 0 };
	bool ok = true;
	struct area a;
	long state = -1;
	pthread_t th;

	if (sysconf(_SC_NPROCESSORS_ONLN) < 2) {
		skip(name, "one CPU: nothing runs while the zap holds its lock");
		return;
	}
	if (access(ZAP_HOLD, W_OK))
		mount("debugfs", "/sys/kernel/debug", "debugfs", 0, NULL);
	if (access(ZAP_HOLD, W_OK)) {
		skip(name, "no " ZAP_HOLD " (CONFIG_LWDT_DEBUG=n)");
		return;
	}
	if (area_setup(name, &a, THP, THP_SIZE))
		return;
	if (thp_pages(a.p, a.len) != (long)npages) {
		skip(name, "not mapped by one THP");
		area_unmap(&a);
		return;
	}
	if (sched_getaffinity(0, sizeof(old_set), &old_set) ||
	    lwdt_start(a.p, a.len)) {
		result(false, name);
		area_unmap(&a);
		return;
	}
	/* Clean for the tracker now: the zap alone must be reported. */
	CPU_ZERO(&set);
	CPU_SET(0, &set);
	sched_setaffinity(0, sizeof(set), &set);
	z.p = a.p;
	z.cpu = 1;
	if (write_long(ZAP_HOLD, 1) ||
	    pthread_create(&th, NULL, zap_hold_fn, &z)) {
		diag("%s: cannot arm the hold or start the zap", name);
		write_long(ZAP_HOLD, 0);
		ok = false;
		goto out;
	}
	/* Harvest while the zap holds the cleared PMD under its lock. */
	while (!__atomic_load_n(&z.done, __ATOMIC_ACQUIRE) &&
	       (state = read_long(ZAP_HOLD)) != ZAP_HOLDING)
		sched_yield();
	if (state == ZAP_HOLDING) {
		if (lwdt_collect(a.p, a.len, a.ldt))
			ok = false;
		reported = count(a.ldt, npages);
	}
	pthread_join(th, NULL);
	write_long(ZAP_HOLD, 0);
	if (z.err || state != ZAP_HOLDING) {
		diag("%s: the zap did not hold (%s)", name, strerror(z.err));
		ok = false;
	} else if (reported != npages) {
		diag("%s: %zu of %zu pages of the zapped THP reported", name,
		     reported, npages);
		ok = false;
	}
out:
	sched_setaffinity(0, sizeof(old_set), &old_set);
	lwdt_stop();
	area_unmap(&a);
	result(ok, name);
}

/* ---- device DAX: PUD leaves ------------------------------------------- */

#define DAX_DEV		"/dev/dax0.0"
#define DAX_SYS		"/sys/bus/dax/devices/dax0.0"
#define ND_SYS		"/sys/bus/nd/devices"
#define PUD_LEAF_SIZE	(1UL << 30)

/* Why there is no usable DAX_DEV (NULL: there is one). */
static const char *dax_missing = "not set up yet";

static int read_str(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -EIO;
	buf[n] = 0;
	buf[strcspn(buf, "\n")] = 0;
	return 0;
}

/*
 * Make the first legacy pmem region (memmap=nn!ss on the kernel command
 * line) a device-dax namespace with 1 GiB alignment, as "ndctl
 * create-namespace -m devdax -a 1G" does, through /sys/bus/nd: configure
 * the region's dax seed and bind it to dax_pmem, which writes the info
 * block and creates DAX_DEV.
 */
static void dax_setup(void)
{
	char seed[64], path[192];
	long align;

	if (access(DAX_DEV, F_OK) && !access(ND_SYS "/region0", F_OK) &&
	    !read_str(ND_SYS "/region0/dax_seed", seed, sizeof(seed)) &&
	    seed[0]) {
		uint64_t u0 = rnd(), u1 = rnd();
		char uuid[40];

		snprintf(uuid, sizeof(uuid),
			 "%08x-%04x-%04x-%04x-%012" PRIx64, (unsigned int)u0,
			 (unsigned int)(u0 >> 32) & 0xffff,
			 (unsigned int)(u0 >> 48), (unsigned int)u1 & 0xffff,
			 (uint64_t)(u1 >> 16) & 0xffffffffffff);
		snprintf(path, sizeof(path), ND_SYS "/%s/uuid", seed);
		write_file(path, uuid);
		snprintf(path, sizeof(path), ND_SYS "/%s/mode", seed);
		write_file(path, "pmem");
		snprintf(path, sizeof(path), ND_SYS "/%s/align", seed);
		write_long(path, PUD_LEAF_SIZE);
		snprintf(path, sizeof(path), ND_SYS "/%s/namespace", seed);
		if (write_file(path, "namespace0.0") ||
		    write_file("/sys/bus/nd/drivers/dax_pmem/bind", seed))
			diag("dax: cannot make %s a devdax namespace: %s",
			     seed, strerror(errno));
	}
	if (access(DAX_DEV, F_OK)) {
		dax_missing = "no " DAX_DEV " (no memmap=nn!ss pmem region)";
		return;
	}
	align = read_long(DAX_SYS "/align");
	if (align != (long)PUD_LEAF_SIZE) {
		diag("dax: %s has align %ld", DAX_DEV, align);
		dax_missing = DAX_DEV " is not 1 GiB aligned";
		return;
	}
	dax_missing = NULL;
}

/* A tracked 1 GiB shared mapping of DAX_DEV (one PUD leaf once written). */
static unsigned char *dax_map_tracked(const char *name)
{
	unsigned char *p;
	int fd;

	if (dax_missing) {
		skip(name, dax_missing);
		return NULL;
	}
	fd = open(DAX_DEV, O_RDWR);
	if (fd < 0) {
		diag("%s: open %s: %s", name, DAX_DEV, strerror(errno));
		result(false, name);
		return NULL;
	}
	p = mmap(NULL, PUD_LEAF_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED || ((uintptr_t)p & (PUD_LEAF_SIZE - 1)) ||
	    lwdt_start(p, PUD_LEAF_SIZE)) {
		diag("%s: cannot map and track %s (%s)", name, DAX_DEV,
		     p == MAP_FAILED ? strerror(errno) : "misaligned or START");
		if (p != MAP_FAILED)
			munmap(p, PUD_LEAF_SIZE);
		result(false, name);
		return NULL;
	}
	return p;
}

/*
 * Pick @k random pages of the DAX mapping into @written and return them
 * in @idx.
 */
static void dax_pick(size_t *idx, size_t k, unsigned char *written)
{
	size_t j;

	for (j = 0; j < k; j++) {
		idx[j] = rnd_below(PUD_LEAF_SIZE / page_size);
		written[idx[j]] = 1;
	}
}

/* Every page of @written is in @map; prints the counts. */
static bool dax_check(const char *name, const unsigned char *written,
		      const unsigned char *map)
{
	size_t npages = PUD_LEAF_SIZE / page_size, i, missed = 0;

	for (i = 0; i < npages; i++)
		missed += written[i] && !map[i];
	diag("%s: %zu written, %zu reported, %zu missed", name,
	     count(written, npages), count(map, npages), missed);
	return !missed;
}

enum dax_how { DAX_DIRECT, DAX_PROC_MEM, DAX_MUNMAP };

/*
 * Writes into a device-dax mapping with 1 GiB alignment, mapped by a PUD
 * leaf: DAX is not tracked but reported in full while VM_MAYWRITE, so
 *   direct:   the harvest reports stores through the mapping, and does not
 *             split the PUD leaf on its walk (a split zaps it unlogged);
 *   proc_mem: a FOLL_FORCE write through /proc/self/mem (GUP, no store
 *             through the user entry) is reported after mprotect(PROT_READ);
 *   munmap:   stores followed by munmap() before the harvest are reported
 *             from the log (zap_huge_pud() logs the leaf).
 */
static void test_dax(enum dax_how how)
{
	static const char *const names[] = {
		"dax_pud_direct_write", "dax_pud_proc_mem_write",
		"dax_pud_munmap",
	};
	const char *name = names[how];
	size_t npages = PUD_LEAF_SIZE / page_size, idx[32], j;
	unsigned char *p, *written = NULL, *map = NULL;
	bool ok = true, mapped = true;
	int memfd = -1, r;

	p = dax_map_tracked(name);
	if (!p)
		return;
	written = calloc(npages, 1);
	map = calloc(npages, 1);
	memfd = open("/proc/self/mem", O_RDWR);
	if (!written || !map || memfd < 0) {
		ok = false;
		goto out;
	}
	/* munmap ends the mapping: one round there. */
	for (r = 0; r < (how == DAX_MUNMAP ? 1 : 2) && ok; r++) {
		memset(written, 0, npages);
		memset(map, 0, npages);
		dax_pick(idx, 32, written);
		for (j = 0; j < 32; j++) {
			unsigned char *q = p + idx[j] * page_size;
			unsigned char v = 0x41 + r;

			if (how != DAX_PROC_MEM)
				STORE(q, v);
			else if (pwrite(memfd, &v, 1, (uintptr_t)q) != 1)
				ok = false;
			if (LOAD(q) != v)
				ok = false;
		}
		if (!ok) {
			diag("%s: a write did not land", name);
			break;
		}
		if (how == DAX_PROC_MEM &&
		    mprotect(p, PUD_LEAF_SIZE, PROT_READ)) {
			ok = false;
			break;
		}
		if (how == DAX_MUNMAP) {
			munmap(p, PUD_LEAF_SIZE);
			mapped = false;
		}
		if (lwdt_collect(p, PUD_LEAF_SIZE, map) ||
		    !dax_check(name, written, map))
			ok = false;
		if (how == DAX_PROC_MEM &&
		    mprotect(p, PUD_LEAF_SIZE, PROT_READ | PROT_WRITE))
			ok = false;
	}
out:
	if (memfd >= 0)
		close(memfd);
	lwdt_stop();
	if (mapped)
		munmap(p, PUD_LEAF_SIZE);
	free(written);
	free(map);
	result(ok, name);
}

/* ---- memory cgroup charge of the log ---------------------------------- */

#define CG_ROOT		"/sys/fs/cgroup"
#define CG_TEST		CG_ROOT "/lwdt-selftest"
/* Chunks of the log the test makes (one bitmap of 512 bits each). */
#define CG_CHUNKS	2048

/* A "key value" line of the test cgroup's memory.stat, or -1. */
static long cg_stat(const char *key)
{
	return proc_value(CG_TEST "/memory.stat", key);
}

/*
 * The log's chunk bitmaps are charged to the tracker's memory cgroup: a
 * tracked process in its own cgroup zaps one page in each of CG_CHUNKS
 * PMD-sized chunks of a sparse range (every zapped page is logged), and
 * the cgroup's slab memory grows by at least the bitmaps' size.
 */
static void test_memcg(void)
{
	const char *name = "memcg_log_charged";
	size_t len = (size_t)CG_CHUNKS * THP_SIZE, npages = len / page_size;
	long before, after, expect = CG_CHUNKS * (THP_SIZE / page_size / 8);
	unsigned char *p = MAP_FAILED, *map = NULL;
	char controllers[256] = "", pid[32];
	bool ok = true, moved = false;
	size_t c;

	if (access(CG_ROOT "/cgroup.controllers", F_OK))
		mount("cgroup2", CG_ROOT, "cgroup2", 0, NULL);
	if (read_str(CG_ROOT "/cgroup.controllers", controllers,
		     sizeof(controllers)) || !strstr(controllers, "memory")) {
		skip(name, "no memory cgroup controller (CONFIG_MEMCG=n)");
		return;
	}
	snprintf(pid, sizeof(pid), "%d", getpid());
	write_file(CG_ROOT "/cgroup.subtree_control", "+memory");
	if ((mkdir(CG_TEST, 0755) && errno != EEXIST) ||
	    write_file(CG_TEST "/cgroup.procs", pid)) {
		diag("%s: cannot enter %s: %s", name, CG_TEST, strerror(errno));
		result(false, name);
		return;
	}
	moved = true;
	p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	map = calloc(npages, 1);
	if (p == MAP_FAILED || !map) {
		ok = false;
		goto out;
	}
	madvise(p, len, MADV_NOHUGEPAGE);
	for (c = 0; c < CG_CHUNKS; c++)
		STORE(&p[c * THP_SIZE], 1);
	if (lwdt_start(p, len)) {
		ok = false;
		goto out;
	}
	before = cg_stat("slab");
	if (madvise(p, len, MADV_DONTNEED))
		ok = false;
	after = cg_stat("slab");
	if (lwdt_collect(p, len, map))
		ok = false;
	for (c = 0; c < CG_CHUNKS; c++)
		if (!map[c * THP_SIZE / page_size]) {
			diag("%s: zapped page of chunk %zu not reported", name, c);
			ok = false;
			break;
		}
	lwdt_stop();
	diag("%s: memcg slab %ld -> %ld bytes (+%ld) for %d log chunks; expected at least +%ld",
	     name, before, after, after - before, CG_CHUNKS, expect);
	if (before < 0 || after - before < expect)
		ok = false;
out:
	free(map);
	if (p != MAP_FAILED)
		munmap(p, len);
	if (moved) {
		write_file(CG_ROOT "/cgroup.procs", pid);
		rmdir(CG_TEST);
	}
	result(ok, name);
}

/* ---- LWDT_START's failure unwind (fault injection) --------------------- */

#define FAIL_NTH	"/proc/thread-self/fail-nth"
#define FI_DIR		"/sys/kernel/debug"

/* Let failslab and fail_page_alloc fail sleeping order-0 allocations too. */
static void fault_injection_setup(bool on)
{
	write_file(FI_DIR "/failslab/ignore-gfp-wait", on ? "N" : "Y");
	write_file(FI_DIR "/fail_page_alloc/ignore-gfp-wait", on ? "N" : "Y");
	write_long(FI_DIR "/fail_page_alloc/min-order", on ? 0 : 1);
	write_long(FI_DIR "/failslab/verbose", on ? 0 : 2);
	write_long(FI_DIR "/fail_page_alloc/verbose", on ? 0 : 2);
}

/*
 * Fail each allocation of LWDT_START in turn (fail-nth: the n-th
 * allocation of this task fails): whichever fails, nothing stays
 * installed, so a new LWDT_START succeeds and tracks.
 */
static void test_start_unwind(void)
{
	const char *name = "start_failure_unwinds";
	size_t len = 16 * page_size;
	unsigned char *p, map[16];
	int nth, n, fd, failed = 0;
	char buf[16];
	bool ok = true;

	nth = open(FAIL_NTH, O_RDWR);
	if (nth < 0) {
		skip(name, "no " FAIL_NTH " (CONFIG_FAULT_INJECTION=n)");
		return;
	}
	if (access(FI_DIR "/failslab", F_OK))
		mount("debugfs", FI_DIR, "debugfs", 0, NULL);
	if (access(FI_DIR "/failslab", F_OK)) {
		close(nth);
		skip(name, "no failslab (CONFIG_FAILSLAB=n)");
		return;
	}
	fault_injection_setup(true);
	p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		ok = false;
		goto out;
	}
	memset(p, 1, len);
	for (n = 1; n <= 200 && ok; n++) {
		long left;

		snprintf(buf, sizeof(buf), "%d", n);
		if (pwrite(nth, buf, strlen(buf), 0) < 0) {
			ok = false;
			break;
		}
		fd = lwdt_start_fd(pagemap_fd, p, len);
		memset(buf, 0, sizeof(buf));
		left = pread(nth, buf, sizeof(buf) - 1, 0) > 0 ?
		       strtol(buf, NULL, 10) : -1;
		pwrite(nth, "0", 1, 0);
		if (fd >= 0) {
			lwdt_stop_fd(fd);
			if (left > 0)
				break;	/* no allocation left to fail */
			continue;
		}
		failed++;
		/* Not EBUSY: the failed START left no tracking behind. */
		fd = lwdt_start_fd(pagemap_fd, p, len);
		if (fd < 0) {
			diag("%s: allocation %d failed LWDT_START; the next START fails: %s",
			     name, n, strerror(-fd));
			ok = false;
			break;
		}
		memset(map, 0, sizeof(map));
		STORE(&p[3 * page_size], n);
		if (lwdt_collect_fd(fd, p, len, map, VEC_MAX, 0, NULL) ||
		    !map[3]) {
			diag("%s: after failure %d, a write was not reported",
			     name, n);
			ok = false;
		}
		lwdt_stop_fd(fd);
	}
	diag("%s: %d of the first %d allocations made LWDT_START fail",
	     name, failed, n);
	if (!failed)
		ok = false;
out:
	fault_injection_setup(false);
	close(nth);
	if (p != MAP_FAILED)
		munmap(p, len);
	result(ok, name);
}

struct test {
	const char *name;
	void (*fn)(void);
};

static void t_random_anon(void) { test_random(ANON); }
static void t_random_shmem(void) { test_random(SHMEM); }
static void t_random_private_file(void) { test_random(PRIVATE_FILE); }
static void t_random_thp(void) { test_random(THP); }
static void t_fork_anon(void) { test_fork(ANON); }
static void t_fork_shmem(void) { test_fork(SHMEM); }
static void t_fork_thp(void) { test_fork(THP); }
static void t_mprotect_anon(void) { test_mprotect(ANON); }
static void t_mprotect_shmem(void) { test_mprotect(SHMEM); }
static void t_mprotect_thp(void) { test_mprotect(THP); }
static void t_mremap_anon(void) { test_mremap(ANON); }
static void t_mremap_shmem(void) { test_mremap(SHMEM); }
static void t_mremap_thp(void) { test_mremap(THP); }
static void t_dontneed_anon(void) { test_zap(ANON, false); }
static void t_dontneed_shmem(void) { test_zap(SHMEM, false); }
static void t_dontneed_thp(void) { test_zap(THP, false); }
static void t_munmap_anon(void) { test_zap(ANON, true); }
static void t_munmap_shmem(void) { test_zap(SHMEM, true); }
static void t_munmap_thp(void) { test_zap(THP, true); }
static void t_precopy_anon(void) { test_copy(ANON, false); }
static void t_precopy_shmem(void) { test_copy(SHMEM, false); }
static void t_precopy_thp(void) { test_copy(THP, false); }
static void t_precopy_zap_anon(void) { test_copy(ANON, true); }
static void t_precopy_zap_thp(void) { test_copy(THP, true); }
static void t_swap_anon(void) { test_swap(ANON); }
static void t_swap_shmem(void) { test_swap(SHMEM); }
static void t_swap_thp(void) { test_swap(THP); }
static void t_madvfree_anon(void) { test_madv_free(ANON); }
static void t_madvfree_thp(void) { test_madv_free(THP); }
static void t_collapse_anon(void) { test_collapse(ANON); }
static void t_collapse_shmem(void) { test_collapse(SHMEM); }
static void t_gup_anon(void) { test_gup(ANON); }
static void t_gup_shmem(void) { test_gup(SHMEM); }
static void t_gup_thp(void) { test_gup(THP); }
static void t_zc_dontneed_anon(void) { test_zap_clean(ZAP_DONTNEED, ANON); }
static void t_zc_dontneed_thp(void) { test_zap_clean(ZAP_DONTNEED, THP); }
static void t_zc_free_anon(void) { test_zap_clean(ZAP_FREE_RECLAIM, ANON); }
static void t_zc_free_thp(void) { test_zap_clean(ZAP_FREE_RECLAIM, THP); }
static void t_zc_remove_shmem(void) { test_zap_clean(ZAP_REMOVE, SHMEM); }
static void t_zc_punch_shmem(void) { test_zap_clean(ZAP_PUNCH, SHMEM); }
static void t_zc_truncate_shmem(void) { test_zap_clean(ZAP_TRUNCATE, SHMEM); }
static void t_zc_swap_dontneed(void) { test_zap_clean(ZAP_SWAP_DONTNEED, ANON); }
static void t_zc_swap_free(void) { test_zap_clean(ZAP_SWAP_FREE, ANON); }
static void t_dax_direct(void) { test_dax(DAX_DIRECT); }
static void t_dax_proc_mem(void) { test_dax(DAX_PROC_MEM); }
static void t_dax_munmap(void) { test_dax(DAX_MUNMAP); }

static const struct test tests[] = {
	{ "api", test_api },
	{ "random_anon", t_random_anon },
	{ "random_shmem", t_random_shmem },
	{ "random_private_file", t_random_private_file },
	{ "random_thp", t_random_thp },
	{ "resume", test_resume },
	{ "reads_are_clean", test_clean },
	{ "fork_anon", t_fork_anon },
	{ "fork_shmem", t_fork_shmem },
	{ "fork_thp", t_fork_thp },
	{ "mprotect_anon", t_mprotect_anon },
	{ "mprotect_shmem", t_mprotect_shmem },
	{ "mprotect_thp", t_mprotect_thp },
	{ "mremap_anon", t_mremap_anon },
	{ "mremap_shmem", t_mremap_shmem },
	{ "mremap_thp", t_mremap_thp },
	{ "dontneed_anon", t_dontneed_anon },
	{ "dontneed_shmem", t_dontneed_shmem },
	{ "dontneed_thp", t_dontneed_thp },
	{ "munmap_anon", t_munmap_anon },
	{ "munmap_shmem", t_munmap_shmem },
	{ "munmap_thp", t_munmap_thp },
	{ "remote", test_remote },
	{ "precopy_anon", t_precopy_anon },
	{ "precopy_shmem", t_precopy_shmem },
	{ "precopy_thp", t_precopy_thp },
	{ "precopy_zap_anon", t_precopy_zap_anon },
	{ "precopy_zap_thp", t_precopy_zap_thp },
	{ "swap_anon", t_swap_anon },
	{ "swap_shmem", t_swap_shmem },
	{ "swap_thp", t_swap_thp },
	{ "madvfree_anon", t_madvfree_anon },
	{ "madvfree_thp", t_madvfree_thp },
	{ "writeback_blockdev", test_writeback },
	{ "thp_split", test_thp_split },
	{ "collapse_anon", t_collapse_anon },
	{ "collapse_shmem", t_collapse_shmem },
	{ "ksm", test_ksm },
	{ "compaction", test_compaction },
	{ "gup_anon", t_gup_anon },
	{ "gup_shmem", t_gup_shmem },
	{ "gup_thp", t_gup_thp },
	{ "session_busy", test_session_busy },
	{ "session_close_stops", test_session_close },
	{ "session_tracker_exit", test_session_tracker_exit },
	{ "session_no_steal", test_session_no_steal },
	{ "harvest_efault_keeps_pages", test_harvest_efault },
	{ "zap_clean_dontneed_anon", t_zc_dontneed_anon },
	{ "zap_clean_dontneed_thp", t_zc_dontneed_thp },
	{ "zap_clean_madvfree_reclaim_anon", t_zc_free_anon },
	{ "zap_clean_madvfree_reclaim_thp", t_zc_free_thp },
	{ "zap_clean_madv_remove_shmem", t_zc_remove_shmem },
	{ "zap_clean_punch_hole_shmem", t_zc_punch_shmem },
	{ "zap_clean_truncate_shmem", t_zc_truncate_shmem },
	{ "zap_clean_swapped_dontneed_anon", t_zc_swap_dontneed },
	{ "zap_clean_swapped_madvfree_anon", t_zc_swap_free },
	{ "hugetlb_readonly", test_hugetlb_readonly },
	{ "foll_force_readonly_anon", test_foll_force },
	{ "mremap_logged_anon", test_mremap_logged },
	{ "zap_thp_during_harvest", test_zap_thp_during_harvest },
	{ "dax_pud_direct_write", t_dax_direct },
	{ "dax_pud_proc_mem_write", t_dax_proc_mem },
	{ "dax_pud_munmap", t_dax_munmap },
	{ "memcg_log_charged", test_memcg },
	{ "start_failure_unwinds", test_start_unwind },
};

#ifndef ARRAY_SIZE
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#endif
#define NR_TESTS ARRAY_SIZE(tests)

static bool selected(const char *name, int argc, char **argv)
{
	int i;

	if (!argc)
		return true;
	for (i = 0; i < argc; i++)
		if (!strcmp(argv[i], name))
			return true;
	return false;
}

int main(int argc, char **argv)
{
	uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
	size_t i, n = 0;
	void *probe;
	int opt;

	while ((opt = getopt(argc, argv, "qs:v")) != -1) {
		switch (opt) {
		case 'q':
			area_len = 4UL << 20;
			rounds = 2;
			break;
		case 's':
			seed = strtoull(optarg, NULL, 0);
			break;
		case 'v':
			verbose = true;
			break;
		default:
			fprintf(stderr, "usage: %s [-q] [-s SEED] [-v] [TEST...]\n",
				argv[0]);
			return 255;
		}
	}
	argc -= optind;
	argv += optind;
	setvbuf(stdout, NULL, _IOLBF, 0);
	page_size = sysconf(_SC_PAGESIZE);
	thp_setup();
	swap_setup();
	rng_state = seed ? seed : 1;
	dax_setup();

	for (i = 0; i < NR_TESTS; i++)
		n += selected(tests[i].name, argc, argv);
	printf("TAP version 13\n1..%zu\n", n);
	diag("ldt-selftest: seed %#" PRIx64 " (replay with -s)", seed);

	pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
	if (pagemap_fd < 0) {
		diag("cannot open /proc/self/pagemap: %s", strerror(errno));
		return 255;
	}
	/* Is LDT there at all?  (Unknown pagemap ioctls fail with EINVAL.) */
	probe = mmap(NULL, page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS,
		     -1, 0);
	if (probe == MAP_FAILED || lwdt_start(probe, page_size) || lwdt_stop()) {
		diag("LDT ioctls not supported by this kernel (CONFIG_LWDT=n?)");
		for (i = 0; i < NR_TESTS; i++)
			if (selected(tests[i].name, argc, argv))
				skip(tests[i].name, "no LDT");
		return 0;
	}
	if (first_revision)
		diag("LWDT_START returned 0: no session descriptors (first revision)");
	for (i = 0; i < NR_TESTS; i++)
		if (selected(tests[i].name, argc, argv))
			tests[i].fn();

	diag("ldt-selftest: %d failures", failures);
	printf("ldt-selftest: %s\n", failures ? "FAIL" : "PASS");
	return failures;
}
