// SPDX-License-Identifier: GPL-2.0
/*
 * ldt-memcheck: a writer whose memory can be checked, for live-migration
 * tests of the guest.  It keeps a region whose every page is a function of
 * (page number, version), rewrites random pages (bumping their version) at
 * a steady rate until a deadline, then recomputes the checksum of the
 * region from memory and from its record of versions: they agree unless a
 * write was lost (e.g. a page a dirty source missed during a migration).
 * It also checks every page it rewrites still held its previous contents.
 *
 * Usage: ldt-memcheck [--mib N] [--rate PAGES_PER_S] [--until-uptime S]
 *                     [--progress-ms MS]
 *   --mib N           region size (default 32)
 *   --rate P          page rewrites per second (default 4000; 0: as fast
 *                     as it can, the max-rate mode)
 *   --until-uptime S  write until the system uptime reaches S seconds
 *                     (default: 10 s from the start)
 *   --progress-ms MS  every MS ms, print its own throughput:
 *                     "ldt-memcheck: progress UPTIME_S PAGES INTERVAL_S"
 *                     (page rewrites in the interval that ended at UPTIME_S)
 * Prints the checksum before the writes and after, and
 * "ldt-memcheck: PASS" or "ldt-memcheck: FAIL ..."; exit status 0 or 1.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

#define PAGE		4096UL
#define WORDS		(PAGE / 8)

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* Word j of page i at version v. */
static uint64_t word(size_t i, uint32_t v, size_t j)
{
	return mix(((uint64_t)i << 32 | v) * WORDS + j);
}

static void fill(uint64_t *p, size_t i, uint32_t v)
{
	size_t j;

	for (j = 0; j < WORDS; j++)
		p[j] = word(i, v, j);
}

/* The first word that differs from version v, or -1. */
static long check(const uint64_t *p, size_t i, uint32_t v)
{
	size_t j;

	for (j = 0; j < WORDS; j++)
		if (p[j] != word(i, v, j))
			return (long)j;
	return -1;
}

/* Checksum of the region as it is in memory. */
static uint64_t sum_memory(const uint64_t *p, size_t pages)
{
	uint64_t s = 0;
	size_t k;

	for (k = 0; k < pages * WORDS; k++)
		s = mix(s ^ p[k]);
	return s;
}

/* Checksum the region should have, from the versions alone. */
static uint64_t sum_record(const uint32_t *ver, size_t pages)
{
	uint64_t s = 0;
	size_t i, j;

	for (i = 0; i < pages; i++)
		for (j = 0; j < WORDS; j++)
			s = mix(s ^ word(i, ver[i], j));
	return s;
}

static double uptime_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_BOOTTIME, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	size_t mib = 32, pages, i, writes = 0, bad = 0;
	double rate = 4000, until = 0, t0, next, progress = 0, last_report;
	size_t last_writes = 0;
	uint64_t rng = 0x2545f4914f6cdd1dULL, before, mem, rec;
	uint32_t *ver;
	uint64_t *p;
	int a;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (a = 1; a + 1 < argc; a += 2) {
		if (!strcmp(argv[a], "--mib"))
			mib = strtoul(argv[a + 1], NULL, 0);
		else if (!strcmp(argv[a], "--rate"))
			rate = strtod(argv[a + 1], NULL);
		else if (!strcmp(argv[a], "--until-uptime"))
			until = strtod(argv[a + 1], NULL);
		else if (!strcmp(argv[a], "--progress-ms"))
			progress = strtod(argv[a + 1], NULL) / 1e3;
		else
			break;
	}
	if (a != argc || !mib || rate < 0 || progress < 0) {
		fprintf(stderr, "usage: %s [--mib N] [--rate PAGES_PER_S] [--until-uptime S] [--progress-ms MS]\n",
			argv[0]);
		return 2;
	}
	pages = mib * (1 << 20) / PAGE;
	p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ver = calloc(pages, sizeof(*ver));
	if (p == MAP_FAILED || !ver) {
		perror("ldt-memcheck: memory");
		return 1;
	}
	for (i = 0; i < pages; i++)
		fill(p + i * WORDS, i, 0);
	before = sum_memory(p, pages);
	t0 = uptime_s();
	if (!until)
		until = t0 + 10;
	printf("ldt-memcheck: %zu MiB, checksum before 0x%016llx, writing %.0f pages/s until uptime %.0f s\n",
	       mib, (unsigned long long)before, rate, until);

	/* Bursts of up to 64 pages, paced to the rate (rate 0: not paced). */
	next = t0;
	last_report = t0;
	while (uptime_s() < until) {
		double now;
		int b;

		for (b = 0; b < 64; b++) {
			long j;

			rng = mix(rng);
			i = rng % pages;
			j = check(p + i * WORDS, i, ver[i]);
			if (j >= 0 && bad++ < 10)
				printf("ldt-memcheck: page %zu word %ld lost its version %u contents\n",
				       i, j, ver[i]);
			fill(p + i * WORDS, i, ++ver[i]);
			writes++;
		}
		now = uptime_s();
		if (progress && now - last_report >= progress) {
			printf("ldt-memcheck: progress %.3f %zu %.3f\n", now,
			       writes - last_writes, now - last_report);
			last_report = now;
			last_writes = writes;
		}
		if (!rate)
			continue;
		next += 64 / rate;
		while (uptime_s() < next)
			usleep(1000);
	}

	mem = sum_memory(p, pages);
	rec = sum_record(ver, pages);
	for (i = 0; i < pages; i++)
		if (check(p + i * WORDS, i, ver[i]) >= 0 && bad++ < 10)
			printf("ldt-memcheck: page %zu differs from its version %u\n", i, ver[i]);
	printf("ldt-memcheck: %zu page writes in %.1f s; checksum after 0x%016llx (memory) 0x%016llx (record)\n",
	       writes, uptime_s() - t0, (unsigned long long)mem, (unsigned long long)rec);
	if (mem != rec || bad) {
		printf("ldt-memcheck: FAIL (%zu bad pages)\n", bad);
		return 1;
	}
	printf("ldt-memcheck: PASS\n");
	return 0;
}
