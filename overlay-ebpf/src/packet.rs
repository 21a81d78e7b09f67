//! Bounds-checked access to XDP packet data: the one place that proves to the verifier that
//! a header lies inside the packet.
use aya_ebpf::programs::XdpContext;

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}
