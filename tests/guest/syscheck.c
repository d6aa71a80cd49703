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
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define SELF_EXIT_ARG "--exit-with"
#define SELF_EXIT_CODE 7
#define CHILD_EXIT_CODE 42
#define ANON_SIZE (4UL << 20)
#define FILE_SIZE (256UL << 10)
#define PIPE_BYTES (256UL << 10) /* several times the pipe buffer */

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
		int ok;

		fflush(stdout);
		ok = tests[i].run() == 0;
		if (!ok)
			failures++;
		printf("%sok %zu %s\n", ok ? "" : "not ", i + 1, tests[i].name);
	}
	if (failures)
		printf("ldt-syscheck: FAIL (%d failures)\n", failures);
	else
		printf("ldt-syscheck: PASS\n");
	return failures;
}
