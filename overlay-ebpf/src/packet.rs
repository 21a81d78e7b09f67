//! Packet access: the one place that proves to the verifier that a header lies inside the
//! packet. Every header, read or written, in every program, goes through [`read`] or
//! [`write`], which share one bounds check. Both contexts look the same from here, so the two
//! decap entry points judge a packet identically.
//!
//! `data`/`data_end` are read from the context on every call, never kept: after
//! `bpf_xdp_adjust_head` or `bpf_skb_adjust_room` the old pointers are invalid, and the next
//! call re-checks against the new ones.
use aya_ebpf::programs::{TcContext, XdpContext};

/// A packet that starts with its Ethernet header.
pub trait Packet {
    /// Start and end of the directly accessible bytes (an skb's linear area).
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Bytes in the packet (an skb's whole length, paged data included).
    fn len(&self) -> usize;
    /// A copy of the `T` at `offset` when it is not in the directly accessible bytes.
    fn load_beyond<T: Copy>(&self, offset: usize) -> Option<T>;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }

    /// An XDP frame has nothing beyond `data_end` (multi-buffer frames are not enabled).
    #[inline(always)]
    fn load_beyond<T: Copy>(&self, _offset: usize) -> Option<T> {
        None
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }

    /// bpf_skb_load_bytes also reads paged data: some drivers keep only part of a GRO
    /// packet's headers linear.
    #[inline(always)]
    fn load_beyond<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load::<T>(offset).ok()
    }
}

/// Pointer to the `T` at `offset`, or `None` when the directly accessible bytes end before
/// it: the one bounds check.
#[inline(always)]
fn ptr_at<P: Packet, T>(pkt: &P, offset: usize) -> Option<*mut T> {
    let start = pkt.data();
    if start + offset + core::mem::size_of::<T>() > pkt.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// A copy of the `T` at `offset`: straight from the packet when the bytes are directly
/// accessible (the common case, no helper call), else through the context's slow path.
#[inline(always)]
pub fn read<P: Packet, T: Copy>(pkt: &P, offset: usize) -> Option<T> {
    match ptr_at::<P, T>(pkt, offset) {
        // SAFETY: ptr_at checked that size_of::<T>() bytes at offset lie inside the packet;
        // headers need not be aligned.
        Some(p) => Some(unsafe { core::ptr::read_unaligned(p) }),
        None => pkt.load_beyond(offset),
    }
}

/// Write `value` at `offset` of the directly accessible bytes; false when they end before
/// its end.
#[inline(always)]
#[must_use]
pub fn write<P: Packet, T: Copy>(pkt: &P, offset: usize, value: T) -> bool {
    match ptr_at::<P, T>(pkt, offset) {
        Some(p) => {
            // SAFETY: as in `read`.
            unsafe { core::ptr::write_unaligned(p, value) };
            true
        }
        None => false,
    }
}
