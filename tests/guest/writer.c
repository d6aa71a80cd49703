// SPDX-License-Identifier: GPL-2.0
/*
 * ldt-writer: the ring-3 writer of `bench-dirty-l2` (the Linux-guest
 * variant of `ldt-vmm bench dirty`).  It maps a working set of S pages
 * (no THP, locked, every page touched), prints the guest-physical frames
 * behind it, then writes W random pages of it each time the console asks:
 *
 *   ldt-writer: frames N in R ranges
 *   ldt-writer: frame FIRST COUNT          (R lines, hex FIRST, decimal COUNT)
 *   ldt-writer: ready
 *   < go K                                 (a line on stdin)
 *   ldt-writer: round K pages W us T       (T: the writes' time, microseconds)
 *   < quit
 *   ldt-writer: frames unchanged | frames moved
 *
 * The frames let the VMM check every written page against a harvest
 * (`ldt-vmm ctl dirty-harvest --expect FILE`); they are read again at the
 * end, so a page that moved meanwhile cannot make that check pass.
 *
 * Usage: ldt-writer [--ws-pages S] [--write-pages W] [--bytes B] [--seed N]
 * Exit status 0; 1 on a bad option, a failed setup or moved frames.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define PFN_MASK ((1ULL << 55) - 1)
#define PRESENT (1ULL << 63)

static uint64_t rng = 1;

/* xorshift64*, as the flat benchmark's. */
static uint64_t next_u64(void)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 0x2545f4914f6cdd1dULL;
}

/* The frame behind every page of [buf, buf + n pages); 0 when not present. */
static int read_frames(const char *buf, unsigned long n, uint64_t *pfn)
{
	int fd = open("/proc/self/pagemap", O_RDONLY);
	unsigned long i;

	if (fd < 0) {
		perror("ldt-writer: /proc/self/pagemap");
		return -1;
	}
	for (i = 0; i < n; i++) {
		uint64_t e;
		off_t off = ((uintptr_t)buf / PAGE + i) * sizeof(e);

		if (pread(fd, &e, sizeof(e), off) != sizeof(e)) {
			perror("ldt-writer: pagemap read");
			close(fd);
			return -1;
		}
		pfn[i] = (e & PRESENT) ? (e & PFN_MASK) : 0;
	}
	close(fd);
	return 0;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void print_ranges(const uint64_t *pfn, unsigned long n)
{
	uint64_t *s = malloc(n * sizeof(*s));
	unsigned long i, ranges = 0, start = 0;

	if (!s)
		exit(1);
	memcpy(s, pfn, n * sizeof(*s));
	qsort(s, n, sizeof(*s), cmp_u64);
	for (i = 1; i <= n; i++)
		if (i == n || s[i] != s[i - 1] + 1)
			ranges++;
	printf("ldt-writer: frames %lu in %lu ranges\n", n, ranges);
	for (i = 1; i <= n; i++) {
		if (i == n || s[i] != s[i - 1] + 1) {
			printf("ldt-writer: frame %#llx %lu\n",
			       (unsigned long long)s[start], i - start);
			start = i;
		}
	}
	free(s);
}

static double now_us(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
	unsigned long ws = 8192, w = 4096, bytes = 1, i;
	uint64_t *pfn, *again, *order;
	char line[64], *buf;
	int a;

	for (a = 1; a + 1 < argc; a += 2) {
		if (!strcmp(argv[a], "--ws-pages"))
			ws = strtoul(argv[a + 1], NULL, 0);
		else if (!strcmp(argv[a], "--write-pages"))
			w = strtoul(argv[a + 1], NULL, 0);
		else if (!strcmp(argv[a], "--bytes"))
			bytes = strtoul(argv[a + 1], NULL, 0);
		else if (!strcmp(argv[a], "--seed"))
			rng = strtoull(argv[a + 1], NULL, 0) ?: 1;
		else
			break;
	}
	if (a != argc || !ws || w > ws || !bytes || bytes > PAGE) {
		fprintf(stderr, "usage: %s [--ws-pages S] [--write-pages W<=S] [--bytes 1..4096] [--seed N]\n",
			argv[0]);
		return 1;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	buf = mmap(NULL, ws * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	pfn = calloc(ws, sizeof(*pfn));
	again = calloc(ws, sizeof(*again));
	order = calloc(ws, sizeof(*order));
	if (buf == MAP_FAILED || !pfn || !again || !order) {
		perror("ldt-writer: allocation");
		return 1;
	}
	/* 4 KiB pages that stay where they are: one frame per written page. */
	madvise(buf, ws * PAGE, MADV_NOHUGEPAGE);
	if (mlock(buf, ws * PAGE))
		perror("ldt-writer: mlock (frames may move)");
	for (i = 0; i < ws; i++) {
		buf[i * PAGE] = 1;
		order[i] = i;
	}
	if (read_frames(buf, ws, pfn))
		return 1;
	for (i = 0; i < ws; i++) {
		if (!pfn[i]) {
			fprintf(stderr, "ldt-writer: page %lu has no frame (not root?)\n", i);
			return 1;
		}
	}
	print_ranges(pfn, ws);
	printf("ldt-writer: ready\n");

	while (fgets(line, sizeof(line), stdin)) {
		unsigned long k;
		double t0, t;

		if (!strncmp(line, "quit", 4))
			break;
		if (sscanf(line, "go %lu", &k) != 1)
			continue;
		/* W distinct pages in random order: a partial Fisher-Yates. */
		for (i = 0; i < w; i++) {
			unsigned long j = i + next_u64() % (ws - i);
			uint64_t x = order[i];

			order[i] = order[j];
			order[j] = x;
		}
		t0 = now_us();
		for (i = 0; i < w; i++)
			memset(buf + order[i] * PAGE, (int)k, bytes);
		t = now_us() - t0;
		printf("ldt-writer: round %lu pages %lu us %.1f\n", k, w, t);
	}
	if (read_frames(buf, ws, again))
		return 1;
	if (memcmp(pfn, again, ws * sizeof(*pfn))) {
		printf("ldt-writer: frames moved\n");
		return 1;
	}
	printf("ldt-writer: frames unchanged\n");
	return 0;
}
