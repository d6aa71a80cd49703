//! Per-memslot dirty bitmaps.

use crate::arch::layout::PAGE_SIZE;
use crate::vm::MemorySlot;

/// The dirty pages of one memslot, one bit per 4 KiB page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBitmap {
    pub slot: u32,
    pub guest_addr: u64,
    pub pages: u64,
    pub words: Vec<u64>,
}

/// The dirty pages of every memslot of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    pub slots: Vec<SlotBitmap>,
}

impl DirtyBitmap {
    /// A bitmap with no page dirty.
    pub fn empty(slots: &[MemorySlot]) -> Self {
        DirtyBitmap {
            slots: slots
                .iter()
                .map(|s| SlotBitmap {
                    slot: s.slot,
                    guest_addr: s.guest_addr,
                    pages: s.pages(),
                    words: vec![0; s.pages().div_ceil(64) as usize],
                })
                .collect(),
        }
    }

    /// A bitmap with every page dirty.
    pub fn full(slots: &[MemorySlot]) -> Self {
        let mut b = Self::empty(slots);
        for s in &mut b.slots {
            for p in 0..s.pages {
                s.words[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        b
    }

    /// ORs `words` into the slot at `index` (extra words are ignored).
    pub fn or_words(&mut self, index: usize, words: &[u64]) {
        let s = &mut self.slots[index];
        for (d, w) in s.words.iter_mut().zip(words) {
            *d |= *w;
        }
        s.mask_tail();
    }

    /// ORs another bitmap of the same VM into this one.
    pub fn or(&mut self, other: &DirtyBitmap) {
        for (i, s) in other.slots.iter().enumerate() {
            self.or_words(i, &s.words);
        }
    }

    /// Marks the page containing `gpa`; false if it is not guest RAM.
    pub fn set(&mut self, gpa: u64) -> bool {
        match self.locate(gpa) {
            Some((i, p)) => {
                self.slots[i].words[(p / 64) as usize] |= 1 << (p % 64);
                true
            }
            None => false,
        }
    }

    /// Marks page `page` of memslot `slot` (as KVM's dirty ring names pages).
    pub fn set_slot_page(&mut self, slot: u32, page: u64) -> bool {
        match self.slots.iter_mut().find(|s| s.slot == slot) {
            Some(s) if page < s.pages => {
                s.words[(page / 64) as usize] |= 1 << (page % 64);
                true
            }
            _ => false,
        }
    }

    /// Whether the page containing `gpa` is dirty.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(i, p)| self.slots[i].words[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| s.words.iter())
            .map(|w| w.count_ones() as u64)
            .sum()
    }

    /// Guest-physical addresses of the dirty pages, in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.iter().flat_map(|s| {
            s.words.iter().enumerate().flat_map(move |(wi, &w)| {
                BitIter(w).map(move |b| s.guest_addr + (wi as u64 * 64 + b as u64) * PAGE_SIZE)
            })
        })
    }

    /// Dirty pages merged into (guest address, length) ranges.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for gpa in self.pages() {
            match out.last_mut() {
                Some((start, len)) if *start + *len == gpa => *len += PAGE_SIZE,
                _ => out.push((gpa, PAGE_SIZE)),
            }
        }
        out
    }

    fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            let end = s.guest_addr + s.pages * PAGE_SIZE;
            (gpa >= s.guest_addr && gpa < end).then(|| (i, (gpa - s.guest_addr) / PAGE_SIZE))
        })
    }
}

impl SlotBitmap {
    /// Clears bits past the last page (KVM and vm-memory round up to words).
    fn mask_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }
}

/// Iterates the set bits of a word, lowest first.
struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<MemorySlot> {
        vec![
            MemorySlot {
                slot: 0,
                guest_addr: 0,
                size: 100 * PAGE_SIZE,
                host_addr: 0,
            },
            MemorySlot {
                slot: 1,
                guest_addr: 1 << 32,
                size: 64 * PAGE_SIZE,
                host_addr: 0,
            },
        ]
    }

    #[test]
    fn set_and_query_pages_across_slots() {
        let mut b = DirtyBitmap::empty(&slots());
        assert!(b.set(0x1234));
        assert!(b.set((1 << 32) + 63 * PAGE_SIZE));
        assert!(!b.set(100 * PAGE_SIZE), "past the end of slot 0");
        assert!(b.is_dirty(0x1000) && !b.is_dirty(0x2000));
        assert_eq!(b.count(), 2);
        assert_eq!(
            b.pages().collect::<Vec<_>>(),
            vec![0x1000, (1 << 32) + 63 * PAGE_SIZE]
        );
    }

    #[test]
    fn words_past_the_slot_end_are_masked() {
        let mut b = DirtyBitmap::empty(&slots());
        b.or_words(0, &[u64::MAX, u64::MAX, u64::MAX]);
        assert_eq!(b.count(), 100);
        assert_eq!(DirtyBitmap::full(&slots()).count(), 164);
    }

    #[test]
    fn ranges_merge_adjacent_pages() {
        let mut b = DirtyBitmap::empty(&slots());
        for p in [1u64, 2, 3, 7, 63, 64, 99] {
            b.set(p * PAGE_SIZE);
        }
        assert!(b.set_slot_page(1, 0));
        assert!(!b.set_slot_page(1, 64));
        assert_eq!(
            b.ranges(),
            vec![
                (PAGE_SIZE, 3 * PAGE_SIZE),
                (7 * PAGE_SIZE, PAGE_SIZE),
                (63 * PAGE_SIZE, 2 * PAGE_SIZE),
                (99 * PAGE_SIZE, PAGE_SIZE),
                (1 << 32, PAGE_SIZE),
            ]
        );
    }

    #[test]
    fn or_is_a_union() {
        let mut a = DirtyBitmap::empty(&slots());
        let mut b = DirtyBitmap::empty(&slots());
        a.set(0);
        b.set(0);
        b.set(5 * PAGE_SIZE);
        a.or(&b);
        assert_eq!(a.pages().collect::<Vec<_>>(), vec![0, 5 * PAGE_SIZE]);
    }
}
