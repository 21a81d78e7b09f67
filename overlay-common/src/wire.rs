//! Header layouts and builders for the two tunnel formats. Plain functions over byte
//! arrays, so the eBPF programs and host tests build exactly the same bytes.

use crate::csum::ipv4_header_checksum;

pub const ETH_LEN: u32 = 14;
pub const IPV4_LEN: u32 = 20;
pub const UDP_LEN: u32 = 8;
pub const VXLAN_LEN: u32 = 8;

pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_UDP: u8 = 17;
/// VXLAN flags byte: the I bit says the VNI is valid (RFC 7348 section 5).
pub const VXLAN_FLAG_VNI: u8 = 0x08;
/// Outer TTL, as the kernel's vxlan device uses by default (ip_default_ttl).
pub const OUTER_TTL: u8 = 64;
/// IPv4 flags+fragment-offset field: DF set. The overlay MTU leaves room for our headers,
/// so the outer packet never needs fragmenting on a correctly sized underlay.
pub const IPV4_DF: u16 = 0x4000;
/// More-fragments flag and fragment-offset mask of the same field.
pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;

/// Outer IPv4 header (no options) with its checksum filled in.
pub fn ipv4_header(src: [u8; 4], dst: [u8; 4], total_len: u16, protocol: u8) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total_len.to_be_bytes());
    h[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
    h[8] = OUTER_TTL;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let csum = ipv4_header_checksum(&h);
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h
}

/// UDP header with a zero checksum: allowed over IPv4 and what the kernel's vxlan device sends
/// by default (udpcsum off), and the inner packet carries its own checksums.
pub fn udp_header(src_port: u16, dst_port: u16, len: u16) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[4..6].copy_from_slice(&len.to_be_bytes());
    h
}

/// VXLAN header (RFC 7348 section 5): flags, 24 reserved bits, the 24-bit VNI, 8 reserved bits.
/// Ours rather than network-types' so the header builders here, which host tests check byte
/// by byte, and the eBPF programs read and write one definition.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanHdr {
    pub flags: u8,
    pub _reserved1: [u8; 3],
    /// Network byte order.
    pub vni: [u8; 3],
    pub _reserved2: u8,
}
const _: () = assert!(core::mem::size_of::<VxlanHdr>() == VXLAN_LEN as usize);

impl VxlanHdr {
    pub const LEN: usize = core::mem::size_of::<Self>();

    /// All zero: the udp format's unused part of [`EncapHeaders`].
    pub const UNUSED: Self = VxlanHdr {
        flags: 0,
        _reserved1: [0; 3],
        vni: [0; 3],
        _reserved2: 0,
    };

    /// A header with the I flag set and `vni` (its low 24 bits).
    pub const fn new(vni: u32) -> Self {
        // Built as one word: field by field, the BPF backend zeroes the reserved bytes with a
        // call to memset.
        let word = ((VXLAN_FLAG_VNI as u64) << 56) | (((vni & 0x00ff_ffff) as u64) << 8);
        // SAFETY: VxlanHdr is 8 bytes of u8 fields, no padding: any 8 bytes are a valid one.
        unsafe { core::mem::transmute::<[u8; 8], VxlanHdr>(word.to_be_bytes()) }
    }

    /// The VNI, or `None` when the I flag is clear.
    pub const fn vni(&self) -> Option<u32> {
        if self.flags & VXLAN_FLAG_VNI == 0 {
            return None;
        }
        Some(u32::from_be_bytes([0, self.vni[0], self.vni[1], self.vni[2]]))
    }
}

pub fn eth_header(dst: [u8; 6], src: [u8; 6], proto: u16) -> [u8; 14] {
    let mut h = [0u8; 14];
    h[0..6].copy_from_slice(&dst);
    h[6..12].copy_from_slice(&src);
    h[12..14].copy_from_slice(&proto.to_be_bytes());
    h
}

/// Outer IPv4 and UDP headers: all the udp format inserts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OuterHeaders {
    pub ip: [u8; 20],
    pub udp: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<OuterHeaders>() == 28);

/// Everything the encapsulation inserts between the outer Ethernet header and the inner IPv4
/// packet, laid out as on the wire. The udp format uses `outer` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapHeaders {
    pub outer: OuterHeaders,
    pub vxlan: VxlanHdr,
    pub inner_eth: [u8; 14],
}
const _: () = assert!(core::mem::size_of::<EncapHeaders>() == 50);

/// Parameters of one encapsulation.
#[derive(Clone, Copy, Debug)]
pub struct Encap {
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub vni: u32,
    pub inner_src_mac: [u8; 6],
    pub inner_dst_mac: [u8; 6],
}

impl Encap {
    /// Headers for an inner IPv4 packet of `inner_len` bytes in `format`.
    pub fn headers(&self, format: crate::Format, inner_len: u32) -> EncapHeaders {
        let outer_len = inner_len + format.overhead();
        let udp_len = outer_len - IPV4_LEN;
        let (vxlan, inner_eth) = match format {
            crate::Format::Udp => (VxlanHdr::UNUSED, [0; 14]),
            crate::Format::Vxlan => (
                VxlanHdr::new(self.vni),
                eth_header(self.inner_dst_mac, self.inner_src_mac, ETH_P_IP),
            ),
        };
        EncapHeaders {
            outer: OuterHeaders {
                ip: ipv4_header(self.src_ip, self.dst_ip, outer_len as u16, IPPROTO_UDP),
                udp: udp_header(self.src_port, self.dst_port, udp_len as u16),
            },
            vxlan,
            inner_eth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Format;

    #[test]
    fn vxlan_header_round_trips_vni() {
        let h = VxlanHdr::new(0x12ab_cdef);
        // SAFETY: VxlanHdr is 8 bytes of u8 fields, no padding.
        let bytes: [u8; 8] = unsafe { core::mem::transmute(h) };
        assert_eq!(bytes, [0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0], "VNI cut to 24 bits");
        assert_eq!(h.vni(), Some(0x00ab_cdef));
        let no_flag = VxlanHdr { flags: 0, ..h };
        assert_eq!(no_flag.vni(), None);
        let other_flags = VxlanHdr { flags: 0xff, ..h };
        assert_eq!(other_flags.vni(), Some(0x00ab_cdef), "reserved flag bits are ignored");
    }

    #[test]
    fn encap_headers_have_consistent_lengths() {
        let e = Encap {
            src_ip: [192, 168, 0, 1],
            dst_ip: [192, 168, 0, 2],
            src_port: 40000,
            dst_port: 8472,
            vni: 1,
            inner_src_mac: [2, 0, 0, 0, 0, 1],
            inner_dst_mac: [2, 0, 0, 0, 0, 2],
        };
        let h = e.headers(Format::Vxlan, 100);
        assert_eq!(u16::from_be_bytes([h.outer.ip[2], h.outer.ip[3]]), 150);
        assert_eq!(u16::from_be_bytes([h.outer.udp[4], h.outer.udp[5]]), 130);
        assert_eq!(crate::csum::ipv4_header_checksum(&h.outer.ip), 0);
        assert_eq!(&h.inner_eth[12..], &[0x08, 0x00]);
        let h = e.headers(Format::Udp, 100);
        assert_eq!(u16::from_be_bytes([h.outer.ip[2], h.outer.ip[3]]), 128);
        assert_eq!(u16::from_be_bytes([h.outer.udp[4], h.outer.udp[5]]), 108);
    }
}
