//! `bpf_skb_adjust_room` flags (the kernel's UAPI values) and the sets our programs pass, shared
//! so the probes userspace runs at start ask about exactly what the datapath will use.
use crate::Format;

pub const FIXED_GSO: u64 = 1 << 0;
pub const ENCAP_L3_IPV4: u64 = 1 << 1;
pub const ENCAP_L4_UDP: u64 = 1 << 4;
/// 5.13 and later: the encapsulation carries an inner Ethernet header (vxlan).
pub const ENCAP_L2_ETH: u64 = 1 << 6;
/// 6.3 and later: the packet stays IPv4 after the cut.
pub const DECAP_L3_IPV4: u64 = 1 << 7;
/// 6.3 and later: the packet stays IPv6 after the cut.
pub const DECAP_L3_IPV6: u64 = 1 << 8;
/// After 6.18: the cut removes a UDP tunnel, so the skb's tunnel offload state is cleared.
pub const DECAP_L4_UDP: u64 = 1 << 10;

/// BPF_F_ADJ_ROOM_ENCAP_L2(len): the length of the inner L2 header.
pub const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// The flags of our encapsulation in `format`; udp's are from 5.2, vxlan's need 5.13.
pub const fn encap_flags(format: Format) -> u64 {
    let flags = FIXED_GSO | ENCAP_L3_IPV4 | ENCAP_L4_UDP;
    match format {
        Format::Udp => flags,
        Format::Vxlan => flags | ENCAP_L2_ETH | encap_l2(14),
    }
}

/// TC decapsulation tries these in order and keeps the first the kernel takes; `l3` is the
/// inner family's DECAP_L3 flag.
pub const fn decap_ladder(l3: u64) -> [u64; 3] {
    [FIXED_GSO | l3 | DECAP_L4_UDP, FIXED_GSO | l3, FIXED_GSO]
}

/// The ladder of IPv4 inner packets.
pub const DECAP_LADDER: [u64; 3] = decap_ladder(DECAP_L3_IPV4);

/// The probe program reads its arguments from the made-up packet it runs on: the size change
/// (i32) and the flags (u64), native byte order, at these offsets (the UDP payload of an
/// Ethernet + IPv4 + UDP frame).
pub const PROBE_LEN_OFFSET: usize = 14 + 20 + 8;
pub const PROBE_FLAGS_OFFSET: usize = PROBE_LEN_OFFSET + 4;
