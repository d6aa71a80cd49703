// SPDX-License-Identifier: GPL-2.0
/*
 * ldt_kvm: host-side lightweight dirty tracking (LDT) for KVM guests.
 *
 * Harvests (reports and clears) the hardware dirty bits of a VM's TDP MMU
 * page tables (AMD NPT; Intel EPT with A/D bits) so that a VMM learns which
 * guest pages were written without write-protection faults.  The dual-bit
 * scheme of LDT becomes, for TDP entries:
 *
 *  - the OS's backup of a D bit the tracker clears: the backing page is
 *    marked dirty at once (kvm_set_pfn_dirty(), what KVM itself does when it
 *    drops or clears a dirty SPTE), so the host still writes it back/swaps it;
 *  - the tracker's backup of a D bit KVM drops: a per-VM, per-memslot bitmap
 *    ("pending") fed conservatively by everything that can remove an SPTE
 *    between two harvests (mm-notifier invalidations, memslot changes, TDP
 *    root invalidation, KVM-internal zaps), plus a per-page record of which
 *    pages had a writable SPTE at the previous harvest ("wmap").
 *
 * No SPTE software bit is used: KVM 6.12 uses bits 52-58 of present TDP
 * SPTEs itself (A/D type, access-tracking saved bits, host/MMU-writable on
 * EPT) and 52-62 of MMIO SPTEs.  See kmod/README.md for every interaction.
 *
 * Only symbols KVM exports are called: file_is_kvm, kvm_get_kvm,
 * kvm_put_kvm, kvm_flush_remote_tlbs, kvm_set_pfn_dirty.  The page tables
 * are walked here (tdp_iter is internal), under mmu_lock held for read and
 * RCU, with cmpxchg on each SPTE, exactly as KVM's own lockless walkers.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitmap.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/kvm_host.h>
#include <linux/miscdevice.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/rculist.h>
#include <linux/slab.h>
#include <linux/timekeeping.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>
#include <linux/xarray.h>

/* KVM internals from the kernel tree this module is built against. */
#include "mmu/spte.h"

#include "ldt_kvm.h"

#define LDT_KVM_MAX_ROOTS	32
/* pages walked per mmu_lock hold at most: 1 GiB, the largest SPTE */
#define LDT_KVM_CHUNK_PAGES	(1UL << 18)

/* A memslot as the tracker knows it. */
struct ldt_slot {
	u32 key;			/* (as_id << 16) | id */
	gfn_t base_gfn;			/* geometry when last synced */
	unsigned long npages;
	unsigned long uaddr;
	u32 flags;
	bool seen;			/* sync mark */
	spinlock_t lock;		/* protects pending */
	unsigned long *pending;		/* conservative marks not yet reported */
	unsigned long *wmap;		/* writable leaf SPTE at last harvest
					 * (tracker mutex) */
	struct rcu_head rcu;
};

struct ldt_root {
	struct kvm_mmu_page *sp;
	u64 *spt;
	u32 role;			/* role.word without the invalid bit */
	bool invalid;
};

struct ldt_tracker {
	struct mutex lock;		/* serializes the ioctls of this file */
	struct kvm *kvm;		/* NULL when detached; holds a reference */
	struct list_head node;		/* ldt_attached */
	struct mmu_notifier mn;
	bool mn_registered;
	bool consume_kvm_log;		/* LDT_KVM_ATTACH_CONSUME_KVM_LOG */
	struct xarray slots;		/* key -> struct ldt_slot, RCU readers */
	u64 gen[KVM_MAX_NR_ADDRESS_SPACES];

	struct ldt_root roots[LDT_KVM_MAX_ROOTS];
	int nr_roots;
	bool roots_overflow;

	/* KVM-internal invalidations: see ldt_check_invalidate_seq(). */
	unsigned long seq_base;
	long ends_base;
	long internal_covered;
	atomic_long_t mn_ends;		/* notifier ends that hit a memslot */
	atomic_t mark_all;		/* set by ->release */

	/* scratch bitmaps for one harvest */
	unsigned long *scr_d, *scr_c, *scr_w;
	unsigned long scr_bits;

	struct ldt_kvm_stats st;	/* under lock, except the atomics below */
	atomic64_t notifier_events;
	atomic64_t notifier_pages;
};

static DEFINE_MUTEX(ldt_attached_lock);
static LIST_HEAD(ldt_attached);

static u64 ldt_dirty_mask;		/* PT_DIRTY_MASK (NPT) or VMX_EPT_DIRTY_BIT */
static u64 ldt_mmu_writable_mask;	/* KVM may make the SPTE writable itself */
static bool ldt_is_vmx;
static u64 ldt_features;

/* ------------------------------------------------------------------------ */
/* per-slot state                                                            */

static inline u32 ldt_key(int as_id, int id)
{
	return ((u32)as_id << 16) | (u16)id;
}

static void ldt_slot_free(struct ldt_slot *s)
{
	kvfree(s->pending);
	kvfree(s->wmap);
	kfree(s);
}

static void ldt_slot_free_rcu(struct rcu_head *head)
{
	ldt_slot_free(container_of(head, struct ldt_slot, rcu));
}

static struct ldt_slot *ldt_slot_alloc(int as_id, const struct kvm_memory_slot *ms)
{
	size_t bytes = BITS_TO_LONGS(ms->npages) * sizeof(long);
	struct ldt_slot *s;

	s = kzalloc(sizeof(*s), GFP_KERNEL_ACCOUNT);
	if (!s)
		return NULL;
	s->pending = kvzalloc(bytes, GFP_KERNEL_ACCOUNT);
	s->wmap = kvzalloc(bytes, GFP_KERNEL_ACCOUNT);
	if (!s->pending || !s->wmap) {
		ldt_slot_free(s);
		return NULL;
	}
	s->key = ldt_key(as_id, ms->id);
	s->base_gfn = ms->base_gfn;
	s->npages = ms->npages;
	s->uaddr = ms->userspace_addr;
	s->flags = ms->flags;
	spin_lock_init(&s->lock);
	return s;
}

static bool ldt_slot_same_geometry(const struct ldt_slot *s,
				   const struct kvm_memory_slot *ms)
{
	return s->base_gfn == ms->base_gfn && s->npages == ms->npages &&
	       s->uaddr == ms->userspace_addr;
}

static void ldt_slot_mark(struct ldt_slot *s, unsigned long first, unsigned long n)
{
	spin_lock(&s->lock);
	bitmap_set(s->pending, first, n);
	spin_unlock(&s->lock);
}

/* Whole VM: every page of every slot is reported at its next harvest. */
static void ldt_mark_all(struct ldt_tracker *t)
{
	struct ldt_slot *s;
	unsigned long idx;

	xa_for_each(&t->slots, idx, s) {
		ldt_slot_mark(s, 0, s->npages);
		t->st.pages_all_marks += s->npages;
	}
}

/* ------------------------------------------------------------------------ */
/* mm notifier: conservative marks for host-side invalidations               */

/*
 * Mark the pages of [start, end) (host virtual) in every writable memslot.
 * Returns whether the range intersects any memslot (read-only and KVM's
 * internal ones included), which is exactly when KVM's own notifier calls
 * kvm_mmu_invalidate_begin/end (see __kvm_handle_hva_range()).
 */
static bool ldt_mark_hva(struct ldt_tracker *t, unsigned long start,
			 unsigned long end)
{
	struct kvm *kvm = t->kvm;
	bool found = false;
	int i, idx;

	idx = srcu_read_lock(&kvm->srcu);
	for (i = 0; i < kvm_arch_nr_memslot_as_ids(kvm); i++) {
		struct kvm_memslots *slots = __kvm_memslots(kvm, i);
		struct kvm_memory_slot *ms;
		int bkt;

		kvm_for_each_memslot(ms, bkt, slots) {
			unsigned long s0 = ms->userspace_addr;
			unsigned long s1 = s0 + (ms->npages << PAGE_SHIFT);
			unsigned long first, last;
			struct ldt_slot *s;

			if (s1 <= start || s0 >= end)
				continue;
			found = true;
			if (ms->flags & KVM_MEM_READONLY)
				continue;
			first = (max(start, s0) - s0) >> PAGE_SHIFT;
			last = (min(end, s1) - s0 + PAGE_SIZE - 1) >> PAGE_SHIFT;

			rcu_read_lock();
			s = xa_load(&t->slots, ldt_key(i, ms->id));
			/*
			 * No entry, or other geometry: the slot is new or
			 * changed since the last sync and is reported whole
			 * at its next harvest anyway.
			 */
			if (s && ldt_slot_same_geometry(s, ms)) {
				ldt_slot_mark(s, first, last - first);
				atomic64_add(last - first, &t->notifier_pages);
			}
			rcu_read_unlock();
		}
	}
	srcu_read_unlock(&kvm->srcu, idx);
	return found;
}

static int ldt_mn_invalidate_range_start(struct mmu_notifier *mn,
					 const struct mmu_notifier_range *range)
{
	struct ldt_tracker *t = container_of(mn, struct ldt_tracker, mn);

	/* Runs before KVM's own start (newer subscriptions come first). */
	atomic64_inc(&t->notifier_events);
	ldt_mark_hva(t, range->start, range->end);
	return 0;
}

static void ldt_mn_invalidate_range_end(struct mmu_notifier *mn,
					const struct mmu_notifier_range *range)
{
	struct ldt_tracker *t = container_of(mn, struct ldt_tracker, mn);

	/*
	 * KVM zapped the range in its start; mark again, for writes that
	 * happened after a harvest took the start's marks but before the zap.
	 */
	if (ldt_mark_hva(t, range->start, range->end))
		atomic_long_inc(&t->mn_ends);
}

static void ldt_mn_release(struct mmu_notifier *mn, struct mm_struct *mm)
{
	struct ldt_tracker *t = container_of(mn, struct ldt_tracker, mn);

	/* The address space goes away; KVM zaps every SPTE after us. */
	atomic_set(&t->mark_all, 1);
}

static const struct mmu_notifier_ops ldt_mn_ops = {
	.invalidate_range_start	= ldt_mn_invalidate_range_start,
	.invalidate_range_end	= ldt_mn_invalidate_range_end,
	.release		= ldt_mn_release,
};

/* ------------------------------------------------------------------------ */
/* memslot sync (kvm->slots_lock held)                                        */

/* Would KVM have cleared D bits of this slot for its own dirty log? */
static bool ldt_kvm_clears_dbits(const struct kvm_memory_slot *ms)
{
	/* PML (Intel): KVM_GET/CLEAR_DIRTY_LOG clear D, not W. */
	return ldt_is_vmx && (ms->flags & KVM_MEM_LOG_DIRTY_PAGES);
}

static int ldt_sync_slots(struct ldt_tracker *t, bool initial)
{
	struct kvm *kvm = t->kvm;
	bool need_all = false;
	int as;

	lockdep_assert_held(&kvm->slots_lock);

	for (as = 0; as < kvm_arch_nr_memslot_as_ids(kvm); as++) {
		struct kvm_memslots *slots = __kvm_memslots(kvm, as);
		u64 gen = slots->generation & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS;
		u64 old = t->gen[as];
		bool removed = false;
		struct kvm_memory_slot *ms;
		struct ldt_slot *s;
		unsigned long idx;
		int bkt;

		if (!initial && gen == old)
			continue;

		xa_for_each(&t->slots, idx, s)
			if ((s->key >> 16) == as)
				s->seen = false;

		kvm_for_each_memslot(ms, bkt, slots) {
			u32 key = ldt_key(as, ms->id);
			struct ldt_slot *ns;
			bool full = !initial;

			s = xa_load(&t->slots, key);
			if (s && ldt_slot_same_geometry(s, ms)) {
				s->seen = true;
				if (s->flags == ms->flags)
					continue;
				/*
				 * Dirty logging turned off: KVM zaps the SPTEs
				 * it can collapse into huge pages (D lost);
				 * turned on: AMD write-protects and splits,
				 * keeping D; Intel/PML clears D.  Other flags:
				 * be conservative.
				 */
				if (!ldt_is_vmx &&
				    (ms->flags ^ s->flags) == KVM_MEM_LOG_DIRTY_PAGES &&
				    (ms->flags & KVM_MEM_LOG_DIRTY_PAGES)) {
					s->flags = ms->flags;
					continue;
				}
				s->flags = ms->flags;
				ldt_slot_mark(s, 0, s->npages);
				t->st.pages_slot_change += s->npages;
				t->st.slot_changes++;
				continue;
			}
			/* new slot, or an id reused with another geometry */
			ns = ldt_slot_alloc(as, ms);
			if (!ns)
				return -ENOMEM;
			ns->seen = true;
			if (full) {
				bitmap_fill(ns->pending, ns->npages);
				t->st.pages_slot_change += ns->npages;
				t->st.slot_changes++;
			}
			if (s)
				removed = true;	/* moved: KVM zapped the old range */
			s = xa_store(&t->slots, key, ns, GFP_KERNEL_ACCOUNT);
			if (xa_is_err(s)) {
				ldt_slot_free(ns);
				return xa_err(s);
			}
			if (s)
				call_rcu(&s->rcu, ldt_slot_free_rcu);
		}

		xa_for_each(&t->slots, idx, s) {
			if ((s->key >> 16) != as || s->seen)
				continue;
			xa_erase(&t->slots, idx);
			call_rcu(&s->rcu, ldt_slot_free_rcu);
			removed = true;
			t->st.slot_changes++;
		}

		/*
		 * Deleting or moving a memslot zaps every root in a default VM
		 * (KVM_X86_QUIRK_SLOT_ZAP_ALL, on unless user space disables
		 * it).  More than one memslot update since the last sync (each
		 * swap adds nr_as to the generation; a delete or move is two)
		 * may have been a delete and re-create, or flags toggled and
		 * back: "all" too.  So is the MMIO generation wrapping (bit 19
		 * and up change), which makes KVM zap everything.
		 */
		if (!initial &&
		    (removed || gen - old > (u64)kvm_arch_nr_memslot_as_ids(kvm) ||
		     ((gen ^ old) & ~(u64)MMIO_SPTE_GEN_MASK)))
			need_all = true;
		t->gen[as] = gen;
	}
	if (need_all)
		ldt_mark_all(t);
	return 0;
}

/* ------------------------------------------------------------------------ */
/* the walk (mmu_lock held for read, RCU)                                    */

struct ldt_walk {
	struct ldt_tracker *t;
	struct ldt_slot *s;
	gfn_t start, end;		/* harvested range */
	gfn_t lo, hi;			/* the part walked under this lock hold */
	unsigned long *d, *c, *w;	/* bit i = gfn start + i */
	u64 cleared;
	u64 unprotected;
	bool report;
	bool unprotect;			/* ATTACH of a slot whose KVM log we own */
};

/* Set bits for [gfn, gfn + n) ∩ harvested range in bm. */
static void ldt_set_in(struct ldt_walk *w, unsigned long *bm, gfn_t gfn, u64 n)
{
	gfn_t lo = max(gfn, w->start), hi = min(gfn + n, w->end);

	if (lo < hi)
		bitmap_set(bm, lo - w->start, hi - lo);
}

/* Part of a huge SPTE outside the harvested range: keep it pending. */
static void ldt_pend_outside(struct ldt_walk *w, gfn_t gfn, u64 n)
{
	struct ldt_slot *s = w->s;
	gfn_t s0 = s->base_gfn, s1 = s->base_gfn + s->npages;
	gfn_t a0 = max(gfn, s0), a1 = min(gfn + n, w->start);
	gfn_t b0 = max(gfn, w->end), b1 = min(gfn + n, s1);

	if (a0 < a1)
		ldt_slot_mark(s, a0 - s0, a1 - a0);
	if (b0 < b1)
		ldt_slot_mark(s, b0 - s0, b1 - b0);
}

static void ldt_walk_pt(struct ldt_walk *w, u64 *pt, int level, gfn_t base);

static void ldt_walk_entry(struct ldt_walk *w, u64 *sptep, int level, gfn_t gfn)
{
	u64 span = KVM_PAGES_PER_HPAGE(level);
	u64 spte = READ_ONCE(*sptep);

	for (;;) {
		/* Not present, MMIO, or FROZEN_SPTE (someone else is changing it). */
		if (!is_shadow_present_pte(spte))
			return;
		if (!is_last_spte(spte, level)) {
			ldt_walk_pt(w, (u64 *)__va(spte_to_pfn(spte) << PAGE_SHIFT),
				    level - 1, gfn);
			return;
		}
		if (!spte_ad_enabled(spte)) {
			/* No hardware D bit (EPT without A/D): writable = maybe dirty. */
			if (is_writable_pte(spte)) {
				ldt_set_in(w, w->c, gfn, span);
				ldt_set_in(w, w->w, gfn, span);
			}
			return;
		}
		if (spte & ldt_dirty_mask) {
			/*
			 * cmpxchg, as KVM's own read-lock and lockless writers
			 * do (fault path, fast page fault, aging, splitting);
			 * on failure spte holds the current value: look again.
			 */
			if (!try_cmpxchg64(sptep, &spte, spte & ~ldt_dirty_mask))
				continue;
			/* The OS's backup of the D bit: dirty for the host. */
			kvm_set_pfn_dirty(spte_to_pfn(spte));
			w->cleared++;
			ldt_set_in(w, w->d, gfn, span);
			ldt_pend_outside(w, gfn, span);
			spte &= ~ldt_dirty_mask;
		}
		/*
		 * A 4 KiB SPTE KVM write-protected for its dirty log (a
		 * KVM_CLEAR_DIRTY_LOG before the attach, which also splits huge
		 * SPTEs): made writable, clean, as KVM's fast page fault would
		 * at the first write; its D bit now reports that write, without
		 * the fault.  Only where KVM allows it without a full fault
		 * (MMU-writable: not write-tracked, host page writable).
		 */
		if (w->unprotect && level == PG_LEVEL_4K && !is_writable_pte(spte) &&
		    (spte & ldt_mmu_writable_mask)) {
			if (!try_cmpxchg64(sptep, &spte, spte | PT_WRITABLE_MASK))
				continue;
			spte |= PT_WRITABLE_MASK;
			w->unprotected++;
		}
		if (is_writable_pte(spte))
			ldt_set_in(w, w->w, gfn, span);
		return;
	}
}

static void ldt_walk_pt(struct ldt_walk *w, u64 *pt, int level, gfn_t base)
{
	int shift = (level - 1) * SPTE_LEVEL_BITS;
	gfn_t lo = max(w->lo, base);
	gfn_t hi = min(w->hi, base + ((gfn_t)SPTE_ENT_PER_PAGE << shift));
	unsigned int i, first, last;

	if (lo >= hi)
		return;
	first = (lo - base) >> shift;
	last = (hi - 1 - base) >> shift;
	for (i = first; i <= last; i++)
		ldt_walk_entry(w, &pt[i], level, base + ((gfn_t)i << shift));
}

/* ------------------------------------------------------------------------ */
/* whole-VM checks (mmu_lock held for read, RCU)                             */

/* A vCPU whose MMU is not the TDP MMU (shadow paging, tdp_mmu=0)? */
static bool ldt_vm_uses_other_mmu(struct kvm *kvm)
{
	struct kvm_vcpu *vcpu;
	unsigned long i;

	kvm_for_each_vcpu(i, vcpu, kvm) {
		hpa_t root = READ_ONCE(vcpu->arch.root_mmu.root.hpa);
		struct kvm_mmu_page *sp;

		if (!vcpu->arch.root_mmu.root_role.direct)
			return true;	/* shadow paging (npt=0 / ept=0) */
		if (!VALID_PAGE(root))
			continue;
		sp = root_to_sp(root);
		if (sp && !sp->tdp_mmu_page)
			return true;	/* TDP with the legacy MMU (tdp_mmu=0) */
	}
	return false;
}

static u32 ldt_role_invalid_bit(void)
{
	union kvm_mmu_page_role r = { .word = 0 };

	r.invalid = 1;
	return r.word;
}

static bool ldt_root_in(const struct ldt_root *set, int n,
			const struct ldt_root *r)
{
	int i;

	for (i = 0; i < n; i++)
		if (set[i].sp == r->sp && set[i].spt == r->spt &&
		    set[i].role == r->role && set[i].invalid == r->invalid)
			return true;
	return false;
}

/*
 * TDP roots are only invalidated all together (kvm_mmu_zap_all_fast():
 * memslot deletion/move with the SLOT_ZAP_ALL quirk, MMIO generation wrap,
 * nx_huge_pages changes), and their SPTEs are then zapped without any
 * notification.  A root seen valid last time that is now invalid or gone,
 * or an invalid root not seen invalid before, means: mark everything.
 * Returns true if roots changed that way.
 */
static bool ldt_check_roots(struct ldt_tracker *t)
{
	struct ldt_root now[LDT_KVM_MAX_ROOTS];
	u32 inv = ldt_role_invalid_bit();
	struct kvm_mmu_page *root;
	bool changed = false;
	int n = 0, i;

	list_for_each_entry_rcu(root, &t->kvm->arch.tdp_mmu_roots, link) {
		struct ldt_root r = {
			.sp = root,
			.spt = root->spt,
			.role = root->role.word & ~inv,
			.invalid = root->role.invalid,
		};

		if (r.invalid && !ldt_root_in(t->roots, t->nr_roots, &r))
			changed = true;
		if (n == LDT_KVM_MAX_ROOTS) {
			changed = true;		/* cannot follow them all */
			continue;
		}
		now[n++] = r;
	}
	for (i = 0; i < t->nr_roots; i++) {
		struct ldt_root r = t->roots[i];

		if (r.invalid)
			continue;	/* accounted when first seen invalid */
		if (!ldt_root_in(now, n, &r))
			changed = true;	/* gone or invalidated since */
	}
	memcpy(t->roots, now, n * sizeof(now[0]));
	t->nr_roots = n;
	return changed;
}

/*
 * KVM-internal zaps that go through kvm_mmu_invalidate_begin/end without an
 * mm notifier (kvm_zap_gfn_range(): MTRR/CR0.CD with non-coherent DMA,
 * APICv inhibits, SEV; memory attributes; guest_memfd) bump
 * kvm->mmu_invalidate_seq like notifier invalidations do.  Our notifier
 * counts the invalidations KVM's notifier counts (ranges that hit a
 * memslot; our end runs just before KVM's), so
 *	X = (seq - seq_base) - (our ends - ends_base)
 * is the number of internal zaps minus notifier invalidations between our
 * end and KVM's end (at most mmu_invalidate_in_progress).  If X plus that
 * can exceed what we already covered, mark everything.
 */
static bool ldt_check_invalidate_seq(struct ldt_tracker *t)
{
	struct kvm *kvm = t->kvm;
	long x = (long)(kvm->mmu_invalidate_seq - t->seq_base) -
		 (atomic_long_read(&t->mn_ends) - t->ends_base);
	long inprog = kvm->mmu_invalidate_in_progress;
	bool mark = x + inprog > t->internal_covered;

	/*
	 * covered stays a lower bound of the internal zaps already covered
	 * by a mark-all; while notifier invalidations are in flight this
	 * errs on the side of marking again.
	 */
	if (x > t->internal_covered)
		t->internal_covered = x;
	return mark;
}

static void ldt_baseline(struct ldt_tracker *t)
{
	t->seq_base = t->kvm->mmu_invalidate_seq;
	t->ends_base = atomic_long_read(&t->mn_ends);
	t->internal_covered = 0;
	t->nr_roots = 0;
	ldt_check_roots(t);
}

/* ------------------------------------------------------------------------ */
/* harvest                                                                   */

static int ldt_scratch(struct ldt_tracker *t, unsigned long n)
{
	size_t bytes;

	if (n > t->scr_bits) {
		bytes = BITS_TO_LONGS(n) * sizeof(long);
		kvfree(t->scr_d);
		kvfree(t->scr_c);
		kvfree(t->scr_w);
		t->scr_bits = 0;
		t->scr_d = kvmalloc(bytes, GFP_KERNEL_ACCOUNT);
		t->scr_c = kvmalloc(bytes, GFP_KERNEL_ACCOUNT);
		t->scr_w = kvmalloc(bytes, GFP_KERNEL_ACCOUNT);
		if (!t->scr_d || !t->scr_c || !t->scr_w)
			return -ENOMEM;
		t->scr_bits = n;
	}
	bitmap_zero(t->scr_d, n);
	bitmap_zero(t->scr_c, n);
	bitmap_zero(t->scr_w, n);
	return 0;
}

/* c |= pending[off, off + n); then clear that part of pending. */
static void ldt_take_pending(struct ldt_slot *s, unsigned long off,
			     unsigned long n, unsigned long *c)
{
	unsigned long b;

	spin_lock(&s->lock);
	if (off % BITS_PER_LONG == 0) {
		bitmap_or(c, c, s->pending + off / BITS_PER_LONG, n);
	} else {
		for (b = find_next_bit(s->pending, off + n, off); b < off + n;
		     b = find_next_bit(s->pending, off + n, b + 1))
			__set_bit(b - off, c);
	}
	bitmap_clear(s->pending, off, n);
	spin_unlock(&s->lock);
}

/*
 * Pages that had a writable SPTE at the previous harvest but none now: the
 * SPTE went away (zap, for whatever reason) after a possible write.  c |=
 * wmap & ~w over the range, then wmap = w there.  Returns how many.
 */
static u64 ldt_update_wmap(struct ldt_slot *s, unsigned long off,
			   unsigned long n, const unsigned long *w,
			   unsigned long *c)
{
	u64 gone = 0;
	unsigned long k, b;

	if (off % BITS_PER_LONG == 0) {
		unsigned long *m = s->wmap + off / BITS_PER_LONG;
		unsigned long words = BITS_TO_LONGS(n);

		for (k = 0; k < words; k++) {
			unsigned long mask = ~0UL, g;

			if (k == words - 1 && n % BITS_PER_LONG)
				mask = BITMAP_LAST_WORD_MASK(n);
			g = m[k] & ~w[k] & mask;
			c[k] |= g;
			gone += hweight_long(g);
			m[k] = (m[k] & ~mask) | (w[k] & mask);
		}
		return gone;
	}
	for (b = 0; b < n; b++) {
		bool was = test_bit(off + b, s->wmap), is = test_bit(b, w);

		if (was && !is) {
			__set_bit(b, c);
			gone++;
		}
		if (is)
			__set_bit(off + b, s->wmap);
		else
			__clear_bit(off + b, s->wmap);
	}
	return gone;
}

/*
 * CONSUME_KVM_LOG: c |= KVM's dirty bitmap over [off, off + n), cleared
 * atomically (mark_page_dirty_in_slot() sets its bits with atomic ops;
 * nothing is write-protected).  Returns the number of bits taken.
 */
static u64 ldt_take_kvm_log(const struct kvm_memory_slot *ms, unsigned long off,
			    unsigned long n, unsigned long *c)
{
	unsigned long *kb = ms->dirty_bitmap;
	u64 taken = 0;
	unsigned long k, b;

	if (off % BITS_PER_LONG == 0) {
		unsigned long words = BITS_TO_LONGS(n);

		kb += off / BITS_PER_LONG;
		for (k = 0; k < words; k++) {
			unsigned long mask = ~0UL, old;

			if (k == words - 1 && n % BITS_PER_LONG)
				mask = BITMAP_LAST_WORD_MASK(n);
			if (!(READ_ONCE(kb[k]) & mask))
				continue;
			old = atomic_long_fetch_andnot(mask, (atomic_long_t *)&kb[k]) & mask;
			c[k] |= old;
			taken += hweight_long(old);
		}
		return taken;
	}
	for (b = 0; b < n; b++)
		if (test_bit(off + b, kb) && test_and_clear_bit(off + b, kb)) {
			__set_bit(b, c);
			taken++;
		}
	return taken;
}

/*
 * Harvest pages [off, off + n) of memslot ms into t->scr_d (d | c).
 * kvm->slots_lock held, slots synced.  report=false: the reset at ATTACH
 * (D bits cleared and forgotten, wmap set).
 */
static int ldt_harvest_range(struct ldt_tracker *t, int as_id,
			     const struct kvm_memory_slot *ms, unsigned long off,
			     unsigned long n, bool report, u64 *ndirty)
{
	struct kvm *kvm = t->kvm;
	struct ldt_walk w = {
		.t = t,
		.start = ms->base_gfn + off,
		.end = ms->base_gfn + off + n,
		.report = report,
		/* the KVM log is the module's from ATTACH on (UAPI.md) */
		.unprotect = !report && t->consume_kvm_log && ms->dirty_bitmap,
	};
	struct kvm_mmu_page *root;
	bool other_mmu;
	u64 dcount, all;
	int ret;

	w.s = xa_load(&t->slots, ldt_key(as_id, ms->id));
	if (WARN_ON_ONCE(!w.s || !ldt_slot_same_geometry(w.s, ms)))
		return -EIO;
	ret = ldt_scratch(t, n);
	if (ret)
		return ret;
	w.d = t->scr_d;
	w.c = t->scr_c;
	w.w = t->scr_w;

	read_lock(&kvm->mmu_lock);
	rcu_read_lock();
	other_mmu = ldt_vm_uses_other_mmu(kvm);
	w.lo = w.start;
	w.hi = min(w.end, round_up(w.start + 1, LDT_KVM_CHUNK_PAGES));
	if (!other_mmu) {
		if (report && ldt_check_roots(t)) {
			t->st.root_changes++;
			ldt_mark_all(t);
		}
		if (report && ldt_check_invalidate_seq(t)) {
			t->st.unattributed_invalidations++;
			ldt_mark_all(t);
		}
		/*
		 * Shadow pages (the VM runs nested guests: shadow NPT/EPT)
		 * map guest memory with their own D bits, outside the TDP
		 * MMU: report the whole VM while there are any.
		 */
		if (report && READ_ONCE(kvm->arch.n_used_mmu_pages)) {
			t->st.shadow_mmu_harvests++;
			ldt_mark_all(t);
		}
		/* An invalidation between KVM's start and end: its range. */
		if (kvm->mmu_invalidate_in_progress &&
		    kvm->mmu_invalidate_range_start != INVALID_GPA)
			ldt_set_in(&w, w.c, kvm->mmu_invalidate_range_start,
				   kvm->mmu_invalidate_range_end -
				   kvm->mmu_invalidate_range_start);
		/*
		 * Walk in 1 GiB-aligned chunks (no SPTE crosses one), dropping
		 * mmu_lock and RCU in between like KVM's own walkers yield, so
		 * a big VM does not hold off KVM's writers or the scheduler.
		 * A root invalidated meanwhile is skipped here and seen by the
		 * next harvest's ldt_check_roots() (whole VM then).
		 */
		for (;;) {
			list_for_each_entry_rcu(root, &kvm->arch.tdp_mmu_roots, link) {
				if (root->role.invalid ||
				    kvm_mmu_role_as_id(root->role) != as_id)
					continue;
				ldt_walk_pt(&w, root->spt, root->role.level, 0);
			}
			if (w.hi >= w.end)
				break;
			w.lo = w.hi;
			w.hi = min(w.end, w.lo + LDT_KVM_CHUNK_PAGES);
			if (need_resched() || rwlock_needbreak(&kvm->mmu_lock)) {
				rcu_read_unlock();
				read_unlock(&kvm->mmu_lock);
				cond_resched();
				read_lock(&kvm->mmu_lock);
				rcu_read_lock();
			}
		}
	}
	rcu_read_unlock();
	read_unlock(&kvm->mmu_lock);
	if (other_mmu)
		return -EOPNOTSUPP;

	/* One batched flush: no vCPU keeps a TLB entry with D set. */
	if (w.cleared) {
		kvm_flush_remote_tlbs(kvm);
		t->st.tlb_flushes++;
		t->st.sptes_cleared += w.cleared;
	}
	/* Made more permissive only: no flush (a stale entry faults once). */
	t->st.sptes_unprotected += w.unprotected;

	/* After the walk: marks made before any zap the walk missed. */
	if (atomic_xchg(&t->mark_all, 0))
		ldt_mark_all(t);
	ldt_take_pending(w.s, off, n, w.c);
	t->st.pages_unmapped += ldt_update_wmap(w.s, off, n, w.w, w.c);
	if (t->consume_kvm_log && ms->dirty_bitmap)
		t->st.pages_kvm_log += ldt_take_kvm_log(ms, off, n, w.c);
	else if (ldt_kvm_clears_dbits(ms)) {
		bitmap_fill(w.c, n);
		t->st.pages_all_marks += n;
	}
	if (!report)
		return 0;

	if (n % BITS_PER_LONG)
		w.c[n / BITS_PER_LONG] &= BITMAP_LAST_WORD_MASK(n);
	dcount = bitmap_weight(w.d, n);
	bitmap_or(w.d, w.d, w.c, n);
	all = bitmap_weight(w.d, n);
	t->st.pages_dbit += dcount;
	t->st.pages_conservative += all - dcount;
	t->st.pages_reported += all;
	*ndirty = all;
	return 0;
}

/* ATTACH: forget the D bits of every slot, record wmap, take baselines. */
static int ldt_reset_all(struct ldt_tracker *t)
{
	struct kvm *kvm = t->kvm;
	struct ldt_slot *s;
	unsigned long idx;
	int ret = 0;

	read_lock(&kvm->mmu_lock);
	rcu_read_lock();
	ldt_baseline(t);
	rcu_read_unlock();
	read_unlock(&kvm->mmu_lock);

	xa_for_each(&t->slots, idx, s) {
		int as_id = s->key >> 16;
		struct kvm_memory_slot *ms =
			id_to_memslot(__kvm_memslots(kvm, as_id), (s16)(s->key & 0xffff));

		if (!ms)
			continue;
		ret = ldt_harvest_range(t, as_id, ms, 0, ms->npages, false, NULL);
		if (ret)
			break;
	}
	return ret;
}

/* ------------------------------------------------------------------------ */
/* attach / detach                                                           */

static void ldt_detach(struct ldt_tracker *t)
{
	struct kvm *kvm = t->kvm;
	struct ldt_slot *s;
	unsigned long idx;

	if (t->mn_registered) {
		/* Waits for running callbacks (SRCU); calls ->release once. */
		mmu_notifier_unregister(&t->mn, kvm->mm);
		t->mn_registered = false;
	}
	xa_for_each(&t->slots, idx, s) {
		xa_erase(&t->slots, idx);
		ldt_slot_free(s);
	}
	xa_destroy(&t->slots);

	mutex_lock(&ldt_attached_lock);
	list_del_init(&t->node);
	mutex_unlock(&ldt_attached_lock);

	t->kvm = NULL;
	/* May be the last reference: the VM is destroyed here then. */
	kvm_put_kvm(kvm);
}

static long ldt_ioctl_attach(struct ldt_tracker *t, void __user *argp)
{
	struct ldt_kvm_attach a;
	struct ldt_tracker *o;
	struct file *f;
	struct kvm *kvm;
	int ret, i;

	if (copy_from_user(&a, argp, sizeof(a)))
		return -EFAULT;
	if (a.size != sizeof(a) || (a.flags & ~LDT_KVM_ATTACH_CONSUME_KVM_LOG) ||
	    a.reserved0)
		return -EINVAL;
	for (i = 0; i < ARRAY_SIZE(a.reserved); i++)
		if (a.reserved[i])
			return -EINVAL;
	if (t->kvm)
		return -EBUSY;

	f = fget(a.vm_fd);
	if (!f)
		return -EBADF;
	/* file->f_op == &kvm_vm_fops: a VM fd, not /dev/kvm, a vCPU, ... */
	if (!file_is_kvm(f)) {
		fput(f);
		return -EINVAL;
	}
	kvm = f->private_data;
	/* KVM's own rule for VM ioctls; also keeps mm_users > 0 below. */
	if (kvm->mm != current->mm) {
		fput(f);
		return -EPERM;
	}
	/* KVM logs its own writes to a ring then, not to the bitmap. */
	if ((a.flags & LDT_KVM_ATTACH_CONSUME_KVM_LOG) && kvm->dirty_ring_size) {
		fput(f);
		return -EINVAL;
	}
	kvm_get_kvm(kvm);
	fput(f);

	mutex_lock(&ldt_attached_lock);
	list_for_each_entry(o, &ldt_attached, node) {
		if (o->kvm == kvm) {
			mutex_unlock(&ldt_attached_lock);
			kvm_put_kvm(kvm);
			return -EBUSY;	/* two trackers would steal D bits */
		}
	}
	t->kvm = kvm;
	list_add(&t->node, &ldt_attached);
	mutex_unlock(&ldt_attached_lock);

	xa_init(&t->slots);
	memset(&t->st, 0, sizeof(t->st));
	memset(t->gen, 0, sizeof(t->gen));
	atomic64_set(&t->notifier_events, 0);
	atomic64_set(&t->notifier_pages, 0);
	atomic_long_set(&t->mn_ends, 0);
	atomic_set(&t->mark_all, 0);
	t->nr_roots = 0;
	t->consume_kvm_log = a.flags & LDT_KVM_ATTACH_CONSUME_KVM_LOG;

	/* First the notifier, so nothing zapped from here on is missed. */
	t->mn.ops = &ldt_mn_ops;
	ret = mmu_notifier_register(&t->mn, kvm->mm);
	if (ret)
		goto fail;
	t->mn_registered = true;

	mutex_lock(&kvm->slots_lock);
	ret = ldt_sync_slots(t, true);
	if (!ret)
		ret = ldt_reset_all(t);
	mutex_unlock(&kvm->slots_lock);
	if (ret)
		goto fail;
	atomic_set(&t->mark_all, 0);
	return 0;
fail:
	ldt_detach(t);
	return ret;
}

static long ldt_ioctl_harvest(struct ldt_tracker *t, void __user *argp)
{
	struct ldt_kvm_harvest h;
	struct kvm_memory_slot *ms;
	struct kvm *kvm = t->kvm;
	unsigned long off, n;
	u64 ndirty = 0, t0;
	int as_id, ret, i;
	size_t bytes;

	if (copy_from_user(&h, argp, sizeof(h)))
		return -EFAULT;
	if (h.size != sizeof(h) || (h.flags & ~LDT_KVM_HARVEST_BY_GPA) ||
	    h.reserved0)
		return -EINVAL;
	for (i = 0; i < ARRAY_SIZE(h.reserved); i++)
		if (h.reserved[i])
			return -EINVAL;
	if (!h.num_pages || h.num_pages > KVM_MEM_MAX_NR_PAGES)
		return -EINVAL;
	bytes = DIV_ROUND_UP(h.num_pages, 64) * 8;
	if (h.bitmap_size < bytes)
		return -EINVAL;
	if (!kvm)
		return -ENOTCONN;
	as_id = h.slot >> 16;
	if (as_id >= kvm_arch_nr_memslot_as_ids(kvm))
		return -EINVAL;
	if ((h.flags & LDT_KVM_HARVEST_BY_GPA) && offset_in_page(h.start))
		return -EINVAL;

	t0 = ktime_get_ns();
	mutex_lock(&kvm->slots_lock);
	ret = ldt_sync_slots(t, false);
	if (ret)
		goto out;
	if (h.flags & LDT_KVM_HARVEST_BY_GPA) {
		gfn_t gfn = h.start >> PAGE_SHIFT;

		ms = __gfn_to_memslot(__kvm_memslots(kvm, as_id), gfn);
		ret = -ENOENT;
		if (!ms)
			goto out;
		off = gfn - ms->base_gfn;
	} else {
		ms = id_to_memslot(__kvm_memslots(kvm, as_id), (u16)h.slot);
		ret = -ENOENT;
		if (!ms)
			goto out;
		off = h.start;
	}
	ret = -EINVAL;
	if (off >= ms->npages || h.num_pages > ms->npages - off)
		goto out;
	n = h.num_pages;
	ret = ldt_harvest_range(t, as_id, ms, off, n, true, &ndirty);
out:
	mutex_unlock(&kvm->slots_lock);
	if (ret)
		return ret;

	/* The scratch bitmap is longs; on x86-64 the __u64 layout of the ABI. */
	if (copy_to_user(u64_to_user_ptr(h.bitmap), t->scr_d, bytes))
		return -EFAULT;
	h.dirty_pages = ndirty;
	if (copy_to_user(argp, &h, sizeof(h)))
		return -EFAULT;
	t->st.harvests++;
	t->st.harvest_ns_last = ktime_get_ns() - t0;
	t->st.harvest_ns_total += t->st.harvest_ns_last;
	return min_t(u64, ndirty, INT_MAX);
}

static long ldt_ioctl_stats(struct ldt_tracker *t, void __user *argp)
{
	struct ldt_kvm_stats s;

	if (copy_from_user(&s, argp, sizeof(s)))
		return -EFAULT;
	if (s.size != sizeof(s) || s.flags)
		return -EINVAL;
	s = t->st;
	s.size = sizeof(s);
	s.flags = 0;
	s.notifier_events = atomic64_read(&t->notifier_events);
	s.pages_notifier = atomic64_read(&t->notifier_pages);
	memset(s.reserved, 0, sizeof(s.reserved));
	if (copy_to_user(argp, &s, sizeof(s)))
		return -EFAULT;
	return 0;
}

static long ldt_ioctl_version(void __user *argp)
{
	struct ldt_kvm_version v;

	if (copy_from_user(&v, argp, sizeof(v)))
		return -EFAULT;
	if (v.size != sizeof(v))
		return -EINVAL;
	memset(&v, 0, sizeof(v));
	v.size = sizeof(v);
	v.api_version = LDT_KVM_API_VERSION;
	v.features = ldt_features;
	if (copy_to_user(argp, &v, sizeof(v)))
		return -EFAULT;
	return 0;
}

/* ------------------------------------------------------------------------ */
/* the character device                                                      */

static long ldt_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct ldt_tracker *t = file->private_data;
	void __user *argp = (void __user *)arg;
	long ret;

	if (cmd == LDT_KVM_GET_VERSION)
		return ldt_ioctl_version(argp);

	mutex_lock(&t->lock);
	switch (cmd) {
	case LDT_KVM_ATTACH:
		ret = ldt_ioctl_attach(t, argp);
		break;
	case LDT_KVM_HARVEST:
		ret = ldt_ioctl_harvest(t, argp);
		break;
	case LDT_KVM_DETACH:
		ret = -ENOTCONN;
		if (t->kvm) {
			ldt_detach(t);
			ret = 0;
		}
		break;
	case LDT_KVM_STATS:
		ret = ldt_ioctl_stats(t, argp);
		break;
	default:
		ret = -ENOTTY;
	}
	mutex_unlock(&t->lock);
	return ret;
}

static int ldt_open(struct inode *inode, struct file *file)
{
	struct ldt_tracker *t = kzalloc(sizeof(*t), GFP_KERNEL_ACCOUNT);

	if (!t)
		return -ENOMEM;
	mutex_init(&t->lock);
	INIT_LIST_HEAD(&t->node);
	file->private_data = t;
	return 0;
}

static int ldt_release(struct inode *inode, struct file *file)
{
	struct ldt_tracker *t = file->private_data;

	mutex_lock(&t->lock);
	if (t->kvm)
		ldt_detach(t);
	mutex_unlock(&t->lock);
	kvfree(t->scr_d);
	kvfree(t->scr_c);
	kvfree(t->scr_w);
	kfree(t);
	return 0;
}

static const struct file_operations ldt_fops = {
	.owner		= THIS_MODULE,	/* an open file pins the module */
	.open		= ldt_open,
	.release	= ldt_release,
	.unlocked_ioctl	= ldt_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.llseek		= noop_llseek,
};

static struct miscdevice ldt_misc = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "ldt-kvm",
	.fops	= &ldt_fops,
	.mode	= 0600,
};

static int __init ldt_init(void)
{
	if (boot_cpu_has(X86_FEATURE_SVM)) {
		ldt_dirty_mask = PT_DIRTY_MASK;
		ldt_mmu_writable_mask = DEFAULT_SPTE_MMU_WRITABLE;
		ldt_features |= LDT_KVM_FEAT_NPT;
	} else if (boot_cpu_has(X86_FEATURE_VMX)) {
		ldt_dirty_mask = VMX_EPT_DIRTY_BIT;
		ldt_mmu_writable_mask = EPT_SPTE_MMU_WRITABLE;
		ldt_is_vmx = true;
		ldt_features |= LDT_KVM_FEAT_EPT;
	} else {
		pr_info("no SVM or VMX: nothing to track\n");
		return -ENODEV;
	}
	ldt_features |= LDT_KVM_FEAT_HARVEST_BY_GPA | LDT_KVM_FEAT_STATS |
			LDT_KVM_FEAT_CONSUME_KVM_LOG;
	pr_info("api %d, %s dirty bit %#llx\n", LDT_KVM_API_VERSION,
		ldt_is_vmx ? "EPT" : "NPT", ldt_dirty_mask);
	return misc_register(&ldt_misc);
}

static void __exit ldt_exit(void)
{
	misc_deregister(&ldt_misc);
	/* slots freed with call_rcu() */
	rcu_barrier();
}

module_init(ldt_init);
module_exit(ldt_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Lightweight dirty tracking of KVM guests on TDP (NPT/EPT) dirty bits");
MODULE_VERSION("1");
