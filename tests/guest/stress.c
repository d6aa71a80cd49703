// SPDX-License-Identifier: GPL-2.0
/*
 * ldt-stress: keep the guest kernel busy on the paths where page table
 * entries, page tables and pages come and go, so that a dirty tracker
 * running meanwhile (guest-ldt under migration, with or without
 * --audit-dirty) is exercised where it is easiest to miss a write:
 *
 *   fork/exec  a child forks and execs busybox true in a loop (page
 *              tables created and freed, COW, exit zaps);
 *   tmpfs      a child writes, rewrites, truncates and unlinks files in
 *              /tmp (page cache written through the direct map, freed);
 *   thp        a child maps 8 MiB with MADV_HUGEPAGE, writes it, punches
 *              holes with MADV_DONTNEED and munmaps it (THP zaps/splits);
 *   swap       when /sys/block/zram0 exists: a 32 MiB zram swap, and a
 *              child in a memory cgroup limited to 8 MiB that rewrites
 *              24 MiB (swap-out and swap-in).
 *
 * Usage: ldt-stress [--until-uptime S]   (default 30)
 * Prints one line per worker at the end with its iteration count; exits 0
 * when every worker ran at least once, 1 otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/swap.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

static double until = 30;

static double uptime(void)
{
	double up = 0;
	FILE *f = fopen("/proc/uptime", "r");

	if (f) {
		if (fscanf(f, "%lf", &up) != 1)
			up = 0;
		fclose(f);
	}
	return up;
}

static int write_file(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, s, strlen(s));
	close(fd);
	return n == (ssize_t)strlen(s) ? 0 : -1;
}

static long fork_exec(void)
{
	long n = 0;

	while (uptime() < until) {
		pid_t p = fork();

		if (p == 0) {
			execl("/bin/busybox", "true", (char *)NULL);
			_exit(127);
		}
		if (p > 0)
			waitpid(p, NULL, 0);
		n++;
	}
	return n;
}

static long tmpfs(void)
{
	static char buf[256 << 10];
	long n = 0;

	while (uptime() < until) {
		char path[64];
		int fd;

		snprintf(path, sizeof(path), "/tmp/ldt-stress.%ld", n % 8);
		memset(buf, (int)n, sizeof(buf));
		fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0600);
		if (fd < 0)
			return -1;
		if (write(fd, buf, sizeof(buf)) != sizeof(buf) ||
		    pwrite(fd, buf, 4096, 8192) != 4096 ||
		    ftruncate(fd, 64 << 10)) {
			close(fd);
			return -1;
		}
		close(fd);
		if (n % 3 == 0)
			unlink(path);
		n++;
	}
	return n;
}

static long thp(void)
{
	const size_t len = 8 << 20;
	long n = 0;

	while (uptime() < until) {
		char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		size_t off;

		if (p == MAP_FAILED)
			return -1;
		madvise(p, len, MADV_HUGEPAGE);
		for (off = 0; off < len; off += 4096)
			p[off] = (char)(n + off);
		madvise(p + (2 << 20) + 8192, 64 << 10, MADV_DONTNEED);
		mprotect(p + (4 << 20), 4096, PROT_READ);
		munmap(p + (6 << 20), 2 << 20);
		munmap(p, 6 << 20);
		n++;
	}
	return n;
}

/* A zram swap and a cgroup too small for what the worker rewrites. */
static int swap_setup(void)
{
	if (access("/sys/block/zram0", F_OK))
		return -1;
	if (write_file("/sys/block/zram0/disksize", "32M") &&
	    errno != EBUSY)
		return -1;
	if (access("/dev/zram0", F_OK))
		mknod("/dev/zram0", S_IFBLK | 0600, makedev(252, 0));
	if (system("/bin/mkswap /dev/zram0 >/dev/null 2>&1") != 0)
		return -1;
	if (swapon("/dev/zram0", 0) && errno != EBUSY)
		return -1;
	mkdir("/sys/fs/cgroup", 0755);
	if (access("/sys/fs/cgroup/cgroup.procs", F_OK) &&
	    mount("none", "/sys/fs/cgroup", "cgroup2", 0, NULL))
		return -1;
	write_file("/sys/fs/cgroup/cgroup.subtree_control", "+memory");
	mkdir("/sys/fs/cgroup/ldt-stress", 0755);
	return write_file("/sys/fs/cgroup/ldt-stress/memory.max", "8M");
}

static long swap_worker(void)
{
	const size_t len = 24 << 20;
	char pid[32];
	long n = 0;
	char *p;

	snprintf(pid, sizeof(pid), "%d", getpid());
	if (write_file("/sys/fs/cgroup/ldt-stress/cgroup.procs", pid))
		return -1;
	p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return -1;
	madvise(p, len, MADV_NOHUGEPAGE);
	while (uptime() < until) {
		size_t off;

		for (off = 0; off < len; off += 4096)
			p[off] += 1;
		n++;
	}
	return n;
}

struct worker {
	const char *name;
	long (*fn)(void);
	int result;	/* read end of the pipe its count comes through */
};

int main(int argc, char **argv)
{
	struct worker w[] = {
		{ "fork-exec", fork_exec, -1 },
		{ "tmpfs", tmpfs, -1 },
		{ "thp", thp, -1 },
		{ "swap", swap_worker, -1 },
	};
	int nr = 4, i, fails = 0;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--until-uptime") && i + 1 < argc) {
			until = atof(argv[++i]);
		} else {
			fprintf(stderr, "usage: %s [--until-uptime S]\n", argv[0]);
			return 2;
		}
	}
	if (swap_setup()) {
		printf("ldt-stress: no zram swap or memory cgroup: no swap worker\n");
		nr = 3;
	}
	printf("ldt-stress: %d workers until uptime %.0f s\n", nr, until);
	fflush(stdout);
	for (i = 0; i < nr; i++) {
		int fd[2];

		if (pipe(fd))
			return 1;
		pid_t pid = fork();

		if (pid == 0) {
			long n = w[i].fn();

			close(fd[0]);
			if (write(fd[1], &n, sizeof(n)) != sizeof(n))
				_exit(1);
			_exit(0);
		}
		close(fd[1]);
		w[i].result = pid > 0 ? fd[0] : -1;
	}
	for (i = 0; i < nr; i++) {
		long n = -1;

		if (w[i].result < 0 ||
		    read(w[i].result, &n, sizeof(n)) != sizeof(n))
			n = -1;
		printf("ldt-stress: %s: %ld iterations\n", w[i].name, n);
		if (n < 1)
			fails++;
	}
	while (wait(NULL) > 0)
		;
	printf("ldt-stress: %s\n", fails ? "FAIL" : "PASS");
	return fails ? 1 : 0;
}
