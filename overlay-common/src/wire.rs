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

pub fn vxlan_header(vni: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0] = VXLAN_FLAG_VNI;
    let v = (vni & 0x00ff_ffff) << 8;
    h[4..8].copy_from_slice(&v.to_be_bytes());
    h
}

/// VNI of a VXLAN header, or `None` when the I flag is clear.
pub fn vxlan_vni(h: &[u8; 8]) -> Option<u32> {
    if h[0] & VXLAN_FLAG_VNI == 0 {
        return None;
    }
    Some(u32::from_be_bytes([h[4], h[5], h[6], h[7]]) >> 8)
}

pub fn eth_header(dst: [u8; 6], src: [u8; 6], proto: u16) -> [u8; 14] {
    let mut h = [0u8; 14];
    h[0..6].copy_from_slice(&dst);
    h[6..12].copy_from_slice(&src);
    h[12..14].copy_from_slice(&proto.to_be_bytes());
    h
}

/// Everything the encapsulation inserts between the outer Ethernet header and the inner IPv4
/// packet, laid out as on the wire. The udp format uses the first 28 bytes only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapHeaders {
    pub ip: [u8; 20],
    pub udp: [u8; 8],
    pub vxlan: [u8; 8],
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
            crate::Format::Udp => ([0; 8], [0; 14]),
            crate::Format::Vxlan => (
                vxlan_header(self.vni),
                eth_header(self.inner_dst_mac, self.inner_src_mac, ETH_P_IP),
            ),
        };
        EncapHeaders {
            ip: ipv4_header(self.src_ip, self.dst_ip, outer_len as u16, IPPROTO_UDP),
            udp: udp_header(self.src_port, self.dst_port, udp_len as u16),
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
        let h = vxlan_header(0x00ab_cdef);
        assert_eq!(h, [0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]);
        assert_eq!(vxlan_vni(&h), Some(0x00ab_cdef));
        assert_eq!(vxlan_vni(&[0, 0, 0, 0, 0, 0, 1, 0]), None);
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
        assert_eq!(u16::from_be_bytes([h.ip[2], h.ip[3]]), 150);
        assert_eq!(u16::from_be_bytes([h.udp[4], h.udp[5]]), 130);
        assert_eq!(crate::csum::ipv4_header_checksum(&h.ip), 0);
        assert_eq!(&h.inner_eth[12..], &[0x08, 0x00]);
        let h = e.headers(Format::Udp, 100);
        assert_eq!(u16::from_be_bytes([h.ip[2], h.ip[3]]), 128);
        assert_eq!(u16::from_be_bytes([h.udp[4], h.udp[5]]), 108);
    }
}
