//! The provided-buffer ring (IORING_REGISTER_PBUF_RING) a worker's multishot receives draw
//! from: one ring of [`BufRingEntry`]s naming equal-sized buffers of one mapping. Its memory is
//! mapped, not registered, so it is not charged to RLIMIT_MEMLOCK, and pages only become
//! resident as datagrams land in them.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;
use io_uring::types::BufRingEntry;

use crate::transport::sys::AnonMap;

/// Buffer group id of the worker's provided-buffer ring (one ring per io_uring).
pub(crate) const BGID: u16 = 0;

/// Most buffers one ring may have (the kernel's limit).
const MAX_ENTRIES: u32 = 32_768;

const _: () = assert!(std::mem::size_of::<BufRingEntry>() == 16);

/// A provided-buffer ring and the buffers it hands to the kernel.
pub(crate) struct BufRing {
    ring: AnonMap,
    entries: u16,
    /// Our copy of the tail; the kernel sees it after [`BufRing::publish`].
    tail: u16,
    mem: AnonMap,
    buf_len: usize,
}

impl BufRing {
    /// `entries` buffers (rounded up to a power of two, at most 32 768) of `buf_len` bytes, all
    /// handed to the kernel.
    pub(crate) fn new(entries: u32, buf_len: usize) -> io::Result<BufRing> {
        let entries = entries.clamp(1, MAX_ENTRIES).next_power_of_two() as u16;
        let ring_len =
            (entries as usize * std::mem::size_of::<BufRingEntry>()).next_multiple_of(4096);
        let ring = AnonMap::new(ring_len)?;
        let mem = AnonMap::new(entries as usize * buf_len)?;
        let mut b = BufRing {
            ring,
            entries,
            tail: 0,
            mem,
            buf_len,
        };
        for bid in 0..entries {
            b.push(bid);
        }
        b.publish();
        Ok(b)
    }

    /// Registers the ring with `ring` as buffer group [`BGID`].
    ///
    /// The owner must drop the io_uring before this ring: the kernel writes into its buffers.
    pub(crate) fn register(&self, ring: &IoUring) -> Result<(), String> {
        // SAFETY: the ring mapping is page-aligned, holds `entries` entries (a power of two) and
        // lives as long as `self`, which its owners drop after the io_uring (field order of the
        // worker; the probe drops the ring explicitly first).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.ring.as_ptr() as u64,
                self.entries,
                BGID,
                0,
            )
        }
        .map_err(|e| format!("IORING_REGISTER_PBUF_RING: {e}"))
    }

    fn base(&self) -> *mut BufRingEntry {
        self.ring.as_ptr().cast()
    }

    /// Hands buffer `bid` back to the kernel (visible after `publish`).
    pub(crate) fn push(&mut self, bid: u16) {
        let idx = (self.tail & (self.entries - 1)) as usize;
        let addr = self.mem.as_ptr() as u64 + bid as u64 * self.buf_len as u64;
        // SAFETY: idx < entries, so the entry lies inside the ring mapping, which is page
        // aligned (enough for BufRingEntry). The kernel only reads entries between its head and
        // the published tail; this one is past the tail until `publish`, so nothing reads it
        // now. The setters write addr, len and bid only, never entry 0's `resv` (the shared
        // tail), and no other reference into the mapping is live.
        let entry = unsafe { &mut *self.base().add(idx) };
        entry.set_addr(addr);
        entry.set_len(self.buf_len as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the pushed buffers to the kernel.
    pub(crate) fn publish(&self) {
        // SAFETY: `BufRingEntry::tail` computes the address of entry 0's `resv` field from the
        // ring base (inside our mapping) without reading it. That u16 is the tail the kernel
        // reads with acquire ordering; accessing it as an AtomicU16 (same size and alignment)
        // is how the kernel ABI expects it to be written, and no `&mut` to entry 0 is live.
        let tail = unsafe { &*BufRingEntry::tail(self.base()).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid` (which the kernel has handed to us).
    pub(crate) fn filled(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.entries {
            return None;
        }
        let len = len.min(self.buf_len);
        // SAFETY: bid < entries and len <= buf_len, so the range lies inside the buffer mapping
        // (entries * buf_len bytes, zero-initialised by mmap). The kernel does not write this
        // buffer again until we push it back, which needs `&mut self` and so ends this borrow.
        Some(unsafe {
            std::slice::from_raw_parts(self.mem.as_ptr().add(bid as usize * self.buf_len), len)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_ring_rounds_to_power_of_two() {
        let b = BufRing::new(5, 128).unwrap();
        assert_eq!(b.entries, 8);
        assert!(b.filled(8, 10).is_none());
        assert_eq!(b.filled(7, 1000).unwrap().len(), 128);
    }

    #[test]
    fn pushed_entries_name_their_buffers_and_the_tail_is_published() {
        let b = BufRing::new(4, 64).unwrap();
        // SAFETY: test-only read of the ring mapping (4 entries), no kernel attached.
        let entries = unsafe { std::slice::from_raw_parts(b.base().cast_const(), 4) };
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.bid(), i as u16);
            assert_eq!(e.len(), 64);
            assert_eq!(e.addr(), b.mem.as_ptr() as u64 + i as u64 * 64);
        }
        // SAFETY: as in `publish`.
        let tail = unsafe { &*BufRingEntry::tail(b.base()).cast::<AtomicU16>() };
        assert_eq!(tail.load(Ordering::Acquire), 4);
    }
}
