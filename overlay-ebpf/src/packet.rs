//! Packet access. `ptr_at` is the one place that proves to the verifier that an XDP header
//! lies inside the packet; [`PacketReader`] lets the decision logic read headers the same way
//! from an XDP frame and from an skb, so both decap entry points judge a packet identically.
use aya_ebpf::programs::{TcContext, XdpContext};

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Read-only, bounds-checked view of a packet that starts with its Ethernet header.
pub trait PacketReader {
    /// A copy of the `T` at `offset`, or None when the packet ends before it.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
    /// Bytes in the packet (an skb's whole length, paged data included).
    fn len(&self) -> usize;
}

impl PacketReader for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: ptr_at checked that size_of::<T>() bytes at offset lie inside the frame.
        ptr_at::<T>(self, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
}

impl PacketReader for TcContext {
    /// Straight from the linear area when the bytes are there (the common case, and no helper
    /// call); bpf_skb_load_bytes otherwise, which also reads paged data (some drivers keep
    /// only part of a GRO packet's headers linear).
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let start = self.data();
        if start + offset + core::mem::size_of::<T>() <= self.data_end() {
            // SAFETY: checked just above that the bytes lie inside the linear area.
            return Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
        }
        self.load::<T>(offset).ok()
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
}
