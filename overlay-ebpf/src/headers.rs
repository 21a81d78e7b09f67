//! What we read from network-types' header views, beyond their own accessors.
use network_types::ip::Ipv4Hdr;

/// Header length in bytes, or `None` unless this is an IPv4 header of at least 20 bytes
/// (options, if any, are skipped by it).
#[inline(always)]
pub fn ipv4_header_len(ip: &Ipv4Hdr) -> Option<usize> {
    let ihl = ip.ihl() as usize;
    (ip.version() == 4 && ihl >= Ipv4Hdr::LEN).then_some(ihl)
}

/// Flags and fragment offset, to test against overlay_common::wire's IPV4_MF and
/// IPV4_OFFSET_MASK together (network-types splits them).
#[inline(always)]
pub fn ipv4_frags(ip: &Ipv4Hdr) -> u16 {
    u16::from_be_bytes(ip.frags)
}
