/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * Lightweight dirty tracking (LDT): which pages of a process were written
 * since the last harvest.  See Documentation/admin-guide/mm/lwdt.rst.
 *
 * LWDT_START on /proc/PID/pagemap starts a tracking session and returns
 * its file descriptor; LWDT_HARVEST and LWDT_STOP work on that descriptor
 * only, so the tracker that started the session is the only one that can
 * collect its pages.  Closing the descriptor (or the tracker's death)
 * stops tracking and drops what was not harvested.
 */
#ifndef _UAPI_LINUX_LWDT_H
#define _UAPI_LINUX_LWDT_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* Pages [start, end) were written. */
struct lwdt_region {
	__u64 start;
	__u64 end;
};

/*
 * LWDT_START, on /proc/PID/pagemap: track [start, end) (start page
 * aligned, end rounded up to a page) of the process, forgetting what was
 * written in the range before.  Returns a new session file descriptor
 * (close-on-exec).  One session per address space at a time: EBUSY while
 * another session tracks it.
 */
struct lwdt_start_arg {
	__u64 size;		/* sizeof(struct lwdt_start_arg) */
	__u64 flags;		/* none defined, must be 0 */
	__u64 start;
	__u64 end;
};

/*
 * LWDT_HARVEST, on a session descriptor: report the pages of [start, end)
 * written since the last harvest (or LWDT_START) into vec, as regions in
 * ascending address order, and forget them.  Returns the number of
 * regions written.  Stops early when vec is full, max_pages pages were
 * reported, or vec turned out not to be writable after some regions were
 * written; walk_end then says where: call again from there for the rest.
 * EFAULT only when no region could be written (nothing is lost: the pages
 * are reported again).
 */
struct lwdt_harvest_arg {
	__u64 size;		/* in: sizeof(struct lwdt_harvest_arg) */
	__u64 flags;		/* in: none defined, must be 0 */
	__u64 start;		/* in: page aligned */
	__u64 end;		/* in: rounded up to a page */
	__u64 walk_end;		/* out: end, or where the harvest stopped */
	__u64 vec;		/* in: address of struct lwdt_region[vec_len] */
	__u64 vec_len;		/* in: at least 1 */
	__u64 max_pages;	/* in: 0 for no limit */
};

#define LWDT_START	_IOW('f', 0x40, struct lwdt_start_arg)
#define LWDT_HARVEST	_IOWR('f', 0x41, struct lwdt_harvest_arg)
/*
 * LWDT_STOP, on a session descriptor: stop tracking now and drop what was
 * not harvested (as closing it does); EINVAL if it was stopped already.
 */
#define LWDT_STOP	_IO('f', 0x42)

#endif /* _UAPI_LINUX_LWDT_H */
