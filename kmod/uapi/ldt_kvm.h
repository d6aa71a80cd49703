/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * ldt_kvm.h: user-space API of the ldt_kvm module ("host-ldt"): harvest the
 * hardware dirty bits of a KVM VM's two-dimensional page tables (AMD NPT,
 * Intel EPT with A/D bits) without write-protection faults.
 *
 * Device: /dev/ldt-kvm (misc character device).  One open file tracks at
 * most one VM; one VM is tracked by at most one file.
 *
 * Order of calls (see kmod/UAPI.md for the details and error codes):
 *   kvm = open("/dev/kvm"); vm = ioctl(kvm, KVM_CREATE_VM, 0);
 *   ioctl(vm, KVM_SET_USER_MEMORY_REGION, ...)   memslots (any time)
 *   t = open("/dev/ldt-kvm", O_RDWR);
 *   ioctl(t, LDT_KVM_GET_VERSION, &v)            check v.api_version
 *   ioctl(t, LDT_KVM_ATTACH, &a)                 a.vm_fd = vm: tracking starts
 *   loop: n = ioctl(t, LDT_KVM_HARVEST, &h)      per slot or range:
 *                                                harvest-and-reset
 *   ioctl(t, LDT_KVM_STATS, &s)                  optional
 *   ioctl(t, LDT_KVM_DETACH)                     or close(t)
 *
 * Every struct starts with a __u32 size that user space sets to
 * sizeof(struct); the module refuses any other value (EINVAL).  Reserved
 * fields must be zero on input.  All structs have the same layout on
 * x86-64 and i386 (explicit padding, 64-bit fields 8-byte aligned).
 */
#ifndef _UAPI_LDT_KVM_H
#define _UAPI_LDT_KVM_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define LDT_KVM_DEVICE		"/dev/ldt-kvm"
#define LDT_KVM_API_VERSION	1

/* ioctl type byte; numbers 0x80..0x84 (own device, no collision). */
#define LDT_KVM_IOC_MAGIC	'L'

/* --- LDT_KVM_GET_VERSION -------------------------------------------------- */

/* features (ldt_kvm_version.features) */
#define LDT_KVM_FEAT_HARVEST_BY_GPA	(1ULL << 0)	/* LDT_KVM_HARVEST_BY_GPA */
#define LDT_KVM_FEAT_STATS		(1ULL << 1)	/* LDT_KVM_STATS */
#define LDT_KVM_FEAT_NPT		(1ULL << 2)	/* this host: AMD NPT (D = bit 6) */
#define LDT_KVM_FEAT_EPT		(1ULL << 3)	/* this host: Intel EPT (D = bit 9) */
#define LDT_KVM_FEAT_CONSUME_KVM_LOG	(1ULL << 4)	/* LDT_KVM_ATTACH_CONSUME_KVM_LOG */

struct ldt_kvm_version {
	__u32 size;		/* in: sizeof(struct ldt_kvm_version) = 64 */
	__u32 api_version;	/* out: LDT_KVM_API_VERSION */
	__u64 features;		/* out: LDT_KVM_FEAT_* */
	__u64 reserved[6];	/* out: zero */
};

/* --- LDT_KVM_ATTACH ------------------------------------------------------- */

/*
 * flags (ldt_kvm_attach.flags)
 * CONSUME_KVM_LOG: the module owns KVM's dirty bitmap of every memslot that
 * has KVM_MEM_LOG_DIRTY_PAGES: each harvest takes (and clears) its bits for
 * the harvested pages, so writes KVM itself makes to guest memory (kvmclock,
 * steal time, PV EOI, async PF, emulated instructions, nested state), which
 * never set a TDP dirty bit, are reported too.  Use it with
 * KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
 * KVM_DIRTY_LOG_INITIALLY_SET, and never call KVM_GET_DIRTY_LOG or
 * KVM_CLEAR_DIRTY_LOG yourself: then KVM never write-protects a page.
 * Refused (EINVAL) if the VM uses a dirty ring.
 */
#define LDT_KVM_ATTACH_CONSUME_KVM_LOG	(1U << 0)

struct ldt_kvm_attach {
	__u32 size;		/* in: sizeof(struct ldt_kvm_attach) = 64 */
	__s32 vm_fd;		/* in: a KVM VM fd (from KVM_CREATE_VM) of the calling process */
	__u32 flags;		/* in: 0 or LDT_KVM_ATTACH_CONSUME_KVM_LOG */
	__u32 reserved0;	/* in: 0 */
	__u64 reserved[6];	/* in: 0 */
};

/* --- LDT_KVM_HARVEST ------------------------------------------------------ */

/* flags (ldt_kvm_harvest.flags) */
#define LDT_KVM_HARVEST_BY_GPA	(1U << 0)	/* start is a guest-physical address */

struct ldt_kvm_harvest {
	__u32 size;		/* in: sizeof(struct ldt_kvm_harvest) = 96 */
	__u32 flags;		/* in: 0 or LDT_KVM_HARVEST_BY_GPA */
	__u32 slot;		/* in: (address space << 16) | memslot id, as in
				 *     kvm_userspace_memory_region.slot; with
				 *     BY_GPA only the address space (slot >> 16)
				 *     is used */
	__u32 reserved0;	/* in: 0 */
	__u64 start;		/* in: first page: a page index within the slot
				 *     (0 = the slot's first page), or with BY_GPA
				 *     a page-aligned guest-physical address; the
				 *     range must lie inside one memslot */
	__u64 num_pages;	/* in: number of 4 KiB pages, >= 1 */
	__u64 bitmap;		/* in: user pointer to the bitmap */
	__u64 bitmap_size;	/* in: its size in bytes, >= 8 * ceil(num_pages / 64) */
	__u64 dirty_pages;	/* out: number of bits set */
	__u64 reserved[5];	/* in: 0 */
};
/*
 * Bitmap: bit i (word i / 64, bit i % 64 of an array of __u64; on x86 the
 * same as byte i / 8, bit i % 8) set = page (start page + i) may have been
 * written since the previous harvest of that page (or since ATTACH).  The
 * module writes exactly 8 * ceil(num_pages / 64) bytes; bits >= num_pages
 * are zero.  Harvest-and-reset: a reported page is not reported again
 * until it is written again.  Never a missed write; false positives are
 * possible and counted (LDT_KVM_STATS).
 * Return value of the ioctl: the number of dirty pages (capped at INT_MAX;
 * dirty_pages has the exact count), or -1 with errno.
 */

/* --- LDT_KVM_STATS -------------------------------------------------------- */

struct ldt_kvm_stats {
	__u32 size;			/* in: sizeof(struct ldt_kvm_stats) = 192 */
	__u32 flags;			/* in: 0 */
	__u64 harvests;			/* LDT_KVM_HARVEST calls that succeeded */
	__u64 harvest_ns_total;		/* time spent in them (ns) */
	__u64 harvest_ns_last;		/* time of the last one (ns) */
	__u64 pages_reported;		/* bits set, all harvests */
	__u64 pages_dbit;		/* ... of which a D bit was set */
	__u64 pages_conservative;	/* ... of which no D bit was set (reported
					 * from one of the sources below only:
					 * a possible false positive) */
	__u64 pages_notifier;		/* pages marked by mm-notifier invalidations */
	__u64 pages_unmapped;		/* pages whose writable SPTE went away since
					 * the previous harvest */
	__u64 pages_slot_change;	/* pages of new or changed memslots */
	__u64 pages_all_marks;		/* pages marked by whole-VM events */
	__u64 sptes_cleared;		/* D bits cleared (SPTEs, any level) */
	__u64 tlb_flushes;		/* remote TLB flushes issued */
	__u64 notifier_events;		/* invalidate_range_start calls seen */
	__u64 slot_changes;		/* memslot changes seen at harvests */
	__u64 root_changes;		/* TDP root invalidations seen */
	__u64 unattributed_invalidations; /* KVM-internal zaps seen */
	__u64 pages_kvm_log;		/* pages taken from KVM's dirty bitmap
					 * (CONSUME_KVM_LOG) */
	__u64 shadow_mmu_harvests;	/* harvests that found KVM shadow pages
					 * (nested guests): whole VM reported */
	__u64 sptes_unprotected;	/* 4 KiB SPTEs KVM had write-protected
					 * for its log, made writable at ATTACH
					 * (CONSUME_KVM_LOG) */
	__u64 reserved[4];
};

#define LDT_KVM_GET_VERSION	_IOWR(LDT_KVM_IOC_MAGIC, 0x80, struct ldt_kvm_version)
#define LDT_KVM_ATTACH		_IOWR(LDT_KVM_IOC_MAGIC, 0x81, struct ldt_kvm_attach)
#define LDT_KVM_HARVEST		_IOWR(LDT_KVM_IOC_MAGIC, 0x82, struct ldt_kvm_harvest)
#define LDT_KVM_DETACH		_IO(LDT_KVM_IOC_MAGIC, 0x83)
#define LDT_KVM_STATS		_IOWR(LDT_KVM_IOC_MAGIC, 0x84, struct ldt_kvm_stats)

#endif /* _UAPI_LDT_KVM_H */
