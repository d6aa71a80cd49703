// SPDX-License-Identifier: GPL-2.0
/*
 * ldt-syscheck: smoke test of the guest kernel's basic process, memory and
 * file services, run inside the guest image as /bin/ldt-syscheck.
 *
 * Output is kselftest/TAP style ("ok N name" / "not ok N name", diagnostics
 * prefixed with "# "), then one summary line:
 *   ldt-syscheck: PASS            or   ldt-syscheck: FAIL (k failures)
 * The exit status is the number of failed tests.
 *
 * Built static (glibc) with -mno-avx: see images/initramfs/init for why
 * guest user code stays off AVX.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SELF_EXIT_ARG "--exit-with"
#define SELF_EXIT_CODE 7
#define CHILD_EXIT_CODE 42
#define ANON_SIZE (4UL << 20)
#define FILE_SIZE (256UL << 10)
#define PIPE_BYTES (256UL << 10) /* several times the pipe buffer */
#define XMM_ROUNDS 300 /* ping-pong rounds per process */
#define XMM_BYTES (16 * 16) /* xmm0..xmm15 */

/* Print a diagnostic line; kselftest readers skip lines starting with '#'. */
static void diag(const char *fmt, ...)
{
	va_list ap;

	fputs("# ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
}

/* Seconds on the monotonic clock. */
static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Deterministic byte pattern that differs between pages and seeds. */
static unsigned char pattern(size_t i, unsigned int seed)
{
	uint32_t x = (uint32_t)i * 2654435761u + seed;

	return (unsigned char)(x ^ (x >> 13) ^ (x >> 24));
}

static void fill(unsigned char *buf, size_t len, size_t offset, unsigned int seed)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = pattern(offset + i, seed);
}

/* Returns the index of the first mismatch, or len if the buffer matches. */
static size_t check(const unsigned char *buf, size_t len, size_t offset,
		    unsigned int seed)
{
	for (size_t i = 0; i < len; i++)
		if (buf[i] != pattern(offset + i, seed))
			return i;
	return len;
}

/*
 * Wait for pid and check it exited normally with the expected code.
 * Returns 0 when it did.
 */
static int wait_for_exit(pid_t pid, int expected)
{
	int status;
	pid_t got;

	do {
		got = waitpid(pid, &status, 0);
	} while (got < 0 && errno == EINTR);
	if (got != pid) {
		diag("waitpid(%d) returned %d: %s", (int)pid, (int)got,
		     strerror(errno));
		return -1;
	}
	if (!WIFEXITED(status)) {
		diag("child %d did not exit normally (wait status 0x%x)",
		     (int)pid, status);
		return -1;
	}
	if (WEXITSTATUS(status) != expected) {
		diag("child %d exited with %d, expected %d", (int)pid,
		     WEXITSTATUS(status), expected);
		return -1;
	}
	return 0;
}

/* fork() a child that exits with CHILD_EXIT_CODE; waitpid() must see it. */
static int test_fork_waitpid(void)
{
	pid_t pid = fork();

	if (pid < 0) {
		diag("fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0)
		_exit(CHILD_EXIT_CODE);
	return wait_for_exit(pid, CHILD_EXIT_CODE);
}

/* fork() + execv() of path with argv; the child must exit with expected. */
static int spawn(const char *path, char *const argv[], int expected)
{
	pid_t pid = fork();

	if (pid < 0) {
		diag("fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		execv(path, argv);
		/* Only reached when exec failed: report it through the status. */
		fprintf(stderr, "# execv %s: %s\n", path, strerror(errno));
		_exit(127);
	}
	return wait_for_exit(pid, expected);
}

static int test_exec_busybox_true(void)
{
	char *argv[] = { "true", NULL };

	return spawn("/bin/busybox", argv, 0);
}

/* Re-execute this binary, which then exits with SELF_EXIT_CODE. */
static int test_exec_self(void)
{
	char *argv[] = { "ldt-syscheck", SELF_EXIT_ARG, NULL };

	return spawn("/proc/self/exe", argv, SELF_EXIT_CODE);
}

/* Anonymous private mapping: write a 4 MiB pattern, read it back. */
static int test_mmap_anon(void)
{
	unsigned char *p = mmap(NULL, ANON_SIZE, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	size_t bad;
	int ret = 0;

	if (p == MAP_FAILED) {
		diag("mmap anonymous %lu bytes: %s", ANON_SIZE, strerror(errno));
		return -1;
	}
	/* Fresh anonymous memory must read as zero. */
	for (size_t i = 0; i < ANON_SIZE; i++) {
		if (p[i]) {
			diag("fresh anonymous byte %zu is 0x%02x", i, p[i]);
			ret = -1;
			break;
		}
	}
	fill(p, ANON_SIZE, 0, 1);
	bad = check(p, ANON_SIZE, 0, 1);
	if (bad != ANON_SIZE) {
		diag("anonymous mapping differs at byte %zu", bad);
		ret = -1;
	}
	if (munmap(p, ANON_SIZE)) {
		diag("munmap: %s", strerror(errno));
		ret = -1;
	}
	return ret;
}

/* Create an empty temporary file in $TMPDIR (default /tmp); -1 on error. */
static int make_temp_file(char *path, size_t size)
{
	const char *dir = getenv("TMPDIR");
	int fd;

	if (!dir || !*dir)
		dir = "/tmp";
	snprintf(path, size, "%s/ldt-syscheck.XXXXXX", dir);
	fd = mkstemp(path);
	if (fd < 0)
		diag("mkstemp %s: %s", path, strerror(errno));
	return fd;
}

/* read() exactly len bytes at offset; 0 on success. */
static int pread_all(int fd, unsigned char *buf, size_t len, off_t offset)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(fd, buf + done, len - done, offset + done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			diag("pread at %lld: %s", (long long)(offset + done),
			     n < 0 ? strerror(errno) : "unexpected end of file");
			return -1;
		}
		done += n;
	}
	return 0;
}

static int write_all(int fd, const unsigned char *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = write(fd, buf + done, len - done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			diag("write: %s", n < 0 ? strerror(errno) : "wrote 0 bytes");
			return -1;
		}
		done += n;
	}
	return 0;
}

/*
 * Shared file mapping: write through the mapping, msync(), then the data
 * must be visible through read() on the file.
 */
static int test_mmap_shared_file(void)
{
	char path[256];
	unsigned char *p, *buf;
	size_t bad;
	int fd, ret = -1;

	fd = make_temp_file(path, sizeof(path));
	if (fd < 0)
		return -1;
	buf = malloc(FILE_SIZE);
	if (!buf) {
		diag("malloc %lu bytes failed", FILE_SIZE);
		goto out_close;
	}
	if (ftruncate(fd, FILE_SIZE)) {
		diag("ftruncate: %s", strerror(errno));
		goto out_free;
	}
	p = mmap(NULL, FILE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		diag("mmap shared file: %s", strerror(errno));
		goto out_free;
	}
	fill(p, FILE_SIZE, 0, 2);
	if (msync(p, FILE_SIZE, MS_SYNC)) {
		diag("msync: %s", strerror(errno));
		goto out_unmap;
	}
	if (pread_all(fd, buf, FILE_SIZE, 0))
		goto out_unmap;
	bad = check(buf, FILE_SIZE, 0, 2);
	if (bad != FILE_SIZE) {
		diag("read() after msync differs at byte %zu", bad);
		goto out_unmap;
	}
	ret = 0;
out_unmap:
	if (munmap(p, FILE_SIZE)) {
		diag("munmap: %s", strerror(errno));
		ret = -1;
	}
out_free:
	free(buf);
out_close:
	close(fd);
	unlink(path);
	return ret;
}

/* write() + fsync() a file, then read() it back from a new descriptor. */
static int test_file_io(void)
{
	char path[256];
	unsigned char *buf;
	size_t bad;
	int fd, ret = -1;

	fd = make_temp_file(path, sizeof(path));
	if (fd < 0)
		return -1;
	buf = malloc(FILE_SIZE);
	if (!buf) {
		diag("malloc %lu bytes failed", FILE_SIZE);
		close(fd);
		goto out_unlink;
	}
	fill(buf, FILE_SIZE, 0, 3);
	if (write_all(fd, buf, FILE_SIZE))
		goto out_close;
	if (fsync(fd)) {
		diag("fsync: %s", strerror(errno));
		goto out_close;
	}
	close(fd);

	fd = open(path, O_RDONLY);
	if (fd < 0) {
		diag("open %s: %s", path, strerror(errno));
		goto out_free;
	}
	memset(buf, 0, FILE_SIZE);
	if (pread_all(fd, buf, FILE_SIZE, 0))
		goto out_close;
	bad = check(buf, FILE_SIZE, 0, 3);
	if (bad != FILE_SIZE) {
		diag("file read back differs at byte %zu", bad);
		goto out_close;
	}
	ret = 0;
out_close:
	close(fd);
out_free:
	free(buf);
out_unlink:
	unlink(path);
	return ret;
}

/*
 * A child writes PIPE_BYTES of pattern into a pipe (blocking several times
 * on the full pipe buffer); the parent reads it all and compares.
 */
static int test_pipe(void)
{
	static unsigned char chunk[4096];
	size_t got = 0;
	int fds[2], ret = 0;
	pid_t pid;

	if (pipe(fds)) {
		diag("pipe: %s", strerror(errno));
		return -1;
	}
	pid = fork();
	if (pid < 0) {
		diag("fork: %s", strerror(errno));
		close(fds[0]);
		close(fds[1]);
		return -1;
	}
	if (pid == 0) {
		close(fds[0]);
		for (size_t off = 0; off < PIPE_BYTES; off += sizeof(chunk)) {
			fill(chunk, sizeof(chunk), off, 4);
			if (write_all(fds[1], chunk, sizeof(chunk)))
				_exit(1);
		}
		_exit(0);
	}
	close(fds[1]);
	for (;;) {
		ssize_t n = read(fds[0], chunk, sizeof(chunk));
		size_t bad;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			diag("pipe read: %s", strerror(errno));
			ret = -1;
			break;
		}
		if (n == 0)
			break;
		if (got + n > PIPE_BYTES) {
			diag("pipe delivered more than %lu bytes", PIPE_BYTES);
			ret = -1;
			break;
		}
		bad = check(chunk, n, got, 4);
		if (bad != (size_t)n) {
			diag("pipe data differs at byte %zu", got + bad);
			ret = -1;
			break;
		}
		got += n;
	}
	if (!ret && got != PIPE_BYTES) {
		diag("pipe delivered %zu bytes, expected %lu", got, PIPE_BYTES);
		ret = -1;
	}
	close(fds[0]);
	if (wait_for_exit(pid, 0))
		ret = -1;
	return ret;
}

/*
 * Load xmm0..xmm15 from in, spin a little (a timer interrupt may come),
 * make two one-byte system calls with SYSCALL (nr1 on fd1, then nr2 on
 * fd2: the ping-pong of test_xmm_switch, where one of them blocks until
 * the other process ran), and store xmm0..xmm15 to out.  All in one asm
 * statement, so nothing but the kernel can touch the registers between the
 * load and the store.
 */
static bool xmm_syscalls_roundtrip(const unsigned char *in, unsigned char *out,
				   long spins, long nr1, long fd1, long nr2,
				   long fd2)
{
	long ret1, ret2;
	char byte = 'x';

	asm volatile(
		"movdqu 0x00(%[in]), %%xmm0\n\t"
		"movdqu 0x10(%[in]), %%xmm1\n\t"
		"movdqu 0x20(%[in]), %%xmm2\n\t"
		"movdqu 0x30(%[in]), %%xmm3\n\t"
		"movdqu 0x40(%[in]), %%xmm4\n\t"
		"movdqu 0x50(%[in]), %%xmm5\n\t"
		"movdqu 0x60(%[in]), %%xmm6\n\t"
		"movdqu 0x70(%[in]), %%xmm7\n\t"
		"movdqu 0x80(%[in]), %%xmm8\n\t"
		"movdqu 0x90(%[in]), %%xmm9\n\t"
		"movdqu 0xa0(%[in]), %%xmm10\n\t"
		"movdqu 0xb0(%[in]), %%xmm11\n\t"
		"movdqu 0xc0(%[in]), %%xmm12\n\t"
		"movdqu 0xd0(%[in]), %%xmm13\n\t"
		"movdqu 0xe0(%[in]), %%xmm14\n\t"
		"movdqu 0xf0(%[in]), %%xmm15\n\t"
		"1: dec %[spins]\n\t"
		"jg 1b\n\t"
		"mov %[nr1], %%rax\n\t"
		"mov %[fd1], %%rdi\n\t"
		"mov %[buf], %%rsi\n\t"
		"mov $1, %%edx\n\t"
		"syscall\n\t"
		"mov %%rax, %[ret1]\n\t"
		"mov %[nr2], %%rax\n\t"
		"mov %[fd2], %%rdi\n\t"
		"mov %[buf], %%rsi\n\t"
		"mov $1, %%edx\n\t"
		"syscall\n\t"
		"mov %%rax, %[ret2]\n\t"
		"movdqu %%xmm0, 0x00(%[out])\n\t"
		"movdqu %%xmm1, 0x10(%[out])\n\t"
		"movdqu %%xmm2, 0x20(%[out])\n\t"
		"movdqu %%xmm3, 0x30(%[out])\n\t"
		"movdqu %%xmm4, 0x40(%[out])\n\t"
		"movdqu %%xmm5, 0x50(%[out])\n\t"
		"movdqu %%xmm6, 0x60(%[out])\n\t"
		"movdqu %%xmm7, 0x70(%[out])\n\t"
		"movdqu %%xmm8, 0x80(%[out])\n\t"
		"movdqu %%xmm9, 0x90(%[out])\n\t"
		"movdqu %%xmm10, 0xa0(%[out])\n\t"
		"movdqu %%xmm11, 0xb0(%[out])\n\t"
		"movdqu %%xmm12, 0xc0(%[out])\n\t"
		"movdqu %%xmm13, 0xd0(%[out])\n\t"
		"movdqu %%xmm14, 0xe0(%[out])\n\t"
		"movdqu %%xmm15, 0xf0(%[out])\n\t"
		: [spins] "+r"(spins), [ret1] "=m"(ret1), [ret2] "=m"(ret2)
		: [in] "r"(in), [out] "r"(out), [buf] "r"(&byte),
		  [nr1] "m"(nr1), [fd1] "m"(fd1), [nr2] "m"(nr2), [fd2] "m"(fd2)
		: "rax", "rcx", "rdx", "rsi", "rdi", "r11", "cc", "memory",
		  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
		  "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
		  "xmm14", "xmm15");
	return ret1 == 1 && ret2 == 1;
}

/*
 * One of the two processes of test_xmm_switch: pinned to CPU 0, then
 * XMM_ROUNDS times loads a pattern unique to (seed, round) into
 * xmm0..xmm15, passes the one token to the other process and waits for it
 * to come back (first != 0: write then read; else read then write), and
 * checks the registers came back intact.  Both on one CPU with one token,
 * the other process must run before the token comes back: a context switch
 * a round with the registers live.  Exits 0 when they always came back intact and
 * the switches happened.
 */
static void xmm_switch_child(int to_other, int from_other, bool first,
			     unsigned int seed)
{
	unsigned char in[XMM_BYTES], out[XMM_BYTES];
	struct rusage ru;
	cpu_set_t cpus;
	long switches;

	CPU_ZERO(&cpus);
	CPU_SET(0, &cpus);
	if (sched_setaffinity(0, sizeof(cpus), &cpus)) {
		diag("xmm %u: sched_setaffinity: %s", seed, strerror(errno));
		_exit(1);
	}
	for (unsigned int round = 0; round < XMM_ROUNDS; round++) {
		long nr1 = first ? SYS_write : SYS_read;
		long fd1 = first ? to_other : from_other;
		size_t bad;

		fill(in, sizeof(in), (size_t)round * XMM_BYTES, seed);
		memset(out, 0, sizeof(out));
		if (!xmm_syscalls_roundtrip(in, out, 1000 + 97 * (long)(round % 11),
					    nr1, fd1,
					    first ? SYS_read : SYS_write,
					    first ? from_other : to_other)) {
			diag("xmm %u: round %u: the other process is gone", seed, round);
			_exit(1);
		}
		bad = check(out, sizeof(out), (size_t)round * XMM_BYTES, seed);
		if (bad != sizeof(out)) {
			diag("xmm %u: round %u: xmm%zu byte %zu is 0x%02x, expected 0x%02x",
			     seed, round, bad / 16, bad % 16, out[bad], in[bad]);
			_exit(1);
		}
	}
	if (getrusage(RUSAGE_SELF, &ru)) {
		diag("xmm %u: getrusage: %s", seed, strerror(errno));
		_exit(1);
	}
	/*
	 * The token's round trip needs the other process to run on this CPU
	 * in between: a switch a round, voluntary when the wait blocks,
	 * involuntary when the wakeup at the write preempts this process.
	 */
	switches = ru.ru_nvcsw + ru.ru_nivcsw;
	diag("xmm %u: %d rounds, %ld context switches (%ld voluntary)", seed,
	     XMM_ROUNDS, switches, ru.ru_nvcsw);
	if (switches < XMM_ROUNDS - 1) {
		diag("xmm %u: too few context switches to test anything", seed);
		_exit(1);
	}
	_exit(0);
}

/*
 * Two processes on one CPU check their SSE registers across many context
 * switches: the guest kernel must save and restore user vector state.
 * SSE only: guest user code stays off AVX (see images/initramfs/init).
 */
static int test_xmm_switch(void)
{
	int ab[2], ba[2], ret = 0;
	pid_t pids[2] = { -1, -1 };

	if (pipe(ab)) {
		diag("pipe: %s", strerror(errno));
		return -1;
	}
	if (pipe(ba)) {
		diag("pipe: %s", strerror(errno));
		close(ab[0]);
		close(ab[1]);
		return -1;
	}
	for (int i = 0; i < 2; i++) {
		pids[i] = fork();
		if (pids[i] < 0) {
			diag("fork: %s", strerror(errno));
			ret = -1;
			break;
		}
		if (pids[i] == 0) {
			if (i == 0)
				xmm_switch_child(ab[1], ba[0], true, 11);
			xmm_switch_child(ba[1], ab[0], false, 12);
		}
	}
	/* A child whose peer dies sees EOF or EPIPE and fails, never hangs. */
	close(ab[0]);
	close(ab[1]);
	close(ba[0]);
	close(ba[1]);
	for (int i = 0; i < 2; i++) {
		if (pids[i] > 0 && wait_for_exit(pids[i], 0))
			ret = -1;
	}
	return ret;
}

struct syscheck_test {
	const char *name;
	int (*run)(void);
};

static const struct syscheck_test tests[] = {
	{ "fork_waitpid_exit_status", test_fork_waitpid },
	{ "fork_exec_busybox_true", test_exec_busybox_true },
	{ "fork_exec_self_with_arg", test_exec_self },
	{ "mmap_anon_4mib_pattern", test_mmap_anon },
	{ "mmap_shared_file_msync_read", test_mmap_shared_file },
	{ "file_write_fsync_read", test_file_io },
	{ "pipe_parent_child", test_pipe },
	{ "xmm_regs_across_context_switches", test_xmm_switch },
};

int main(int argc, char **argv)
{
	const size_t ntests = sizeof(tests) / sizeof(tests[0]);
	int failures = 0;

	/* Child mode of fork_exec_self_with_arg. */
	if (argc == 2 && !strcmp(argv[1], SELF_EXIT_ARG))
		return SELF_EXIT_CODE;
	if (argc != 1) {
		fprintf(stderr, "usage: %s\n", argv[0]);
		return 2;
	}

	/* Line-buffered so fork() never duplicates unwritten output. */
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("TAP version 13\n1..%zu\n", ntests);
	for (size_t i = 0; i < ntests; i++) {
		double t0;
		int ok;

		fflush(stdout);
		t0 = now();
		ok = tests[i].run() == 0;
		if (!ok)
			failures++;
		/* Timing helps where guest kernel code is slow (see DESIGN.md). */
		diag("%s took %.3f s", tests[i].name, now() - t0);
		printf("%sok %zu %s\n", ok ? "" : "not ", i + 1, tests[i].name);
	}
	if (failures)
		printf("ldt-syscheck: FAIL (%d failures)\n", failures);
	else
		printf("ldt-syscheck: PASS\n");
	return failures;
}
