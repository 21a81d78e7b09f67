//! Header layouts and builders for the two tunnel formats. Plain functions over byte
//! arrays, so the eBPF programs and host tests build exactly the same bytes.

use crate::csum::{add_ipv6_pseudo_header, add_words, fold, fold_sum, ipv4_header_checksum};

pub const ETH_LEN: u32 = 14;
pub const IPV4_LEN: u32 = 20;
pub const UDP_LEN: u32 = 8;
pub const VXLAN_LEN: u32 = 8;

pub const IPV6_LEN: u32 = 40;
/// What VXLAN over IPv6 adds in front of an inner IPv6 packet, as the kernel's vxlan device
/// counts it (VXLAN6_HEADROOM): flannel-v6.<VNI> gets the underlay MTU minus this.
pub const VXLAN6_OVERHEAD: u32 = IPV6_LEN + UDP_LEN + VXLAN_LEN + ETH_LEN;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers the decapsulation walks past in an outer packet.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTS: u8 = 60;
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

/// Everything VXLAN over IPv6 inserts between the outer Ethernet header and the inner IPv6
/// packet, laid out as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapHeaders6 {
    pub ip: [u8; 40],
    pub udp: [u8; 8],
    pub vxlan: VxlanHdr,
    pub inner_eth: [u8; 14],
}
const _: () = assert!(core::mem::size_of::<EncapHeaders6>() == VXLAN6_OVERHEAD as usize);

/// Outer IPv6 header as the kernel's vxlan device writes it by default: traffic class and flow
/// label 0, hop limit 64.
pub fn ipv6_header(src: [u8; 16], dst: [u8; 16], payload_len: u16, next_header: u8) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = next_header;
    h[7] = OUTER_TTL;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&dst);
    h
}

/// Parameters of one VXLAN-over-IPv6 encapsulation. References, so the eBPF build fills
/// headers from where the values are (map entries) without copies on its 512-byte stack.
#[derive(Clone, Copy, Debug)]
pub struct Encap6<'a> {
    pub src_ip: &'a [u8; 16],
    pub dst_ip: &'a [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub vni: u32,
    pub inner_src_mac: &'a [u8; 6],
    pub inner_dst_mac: &'a [u8; 6],
}

impl Encap6<'_> {
    /// Headers for an inner IPv6 packet of `inner_len` bytes; `inner_sum` is
    /// [`inner_ipv6_checksum_part`] of its header. Over IPv6 the UDP checksum is mandatory
    /// (RFC 8200 section 8.1): flannel's `flannel-v6.<VNI>` sets neither udp6zerocsumtx nor
    /// udp6zerocsumrx, so the kernel drops tunnel packets whose checksum is zero.
    pub fn headers(&self, inner_sum: Option<u32>, inner_len: u32) -> EncapHeaders6 {
        let mut h = EncapHeaders6 {
            ip: [0; 40],
            udp: [0; 8],
            vxlan: VxlanHdr::UNUSED,
            inner_eth: [0; 14],
        };
        self.fill(&mut h, inner_sum, inner_len);
        h
    }

    /// [`Encap6::headers`] written into `h` field by field: every byte of it is set.
    #[inline(always)]
    pub fn fill(&self, h: &mut EncapHeaders6, inner_sum: Option<u32>, inner_len: u32) {
        let udp_len = inner_len + UDP_LEN + VXLAN_LEN + ETH_LEN;
        let [len_hi, len_lo] = (udp_len as u16).to_be_bytes();
        // Outer IPv6: version 6, traffic class and flow label 0, hop limit 64, as the kernel's
        // vxlan device sends by default.
        h.ip[0] = 0x60;
        h.ip[1] = 0;
        h.ip[2] = 0;
        h.ip[3] = 0;
        h.ip[4] = len_hi;
        h.ip[5] = len_lo;
        h.ip[6] = IPPROTO_UDP;
        h.ip[7] = OUTER_TTL;
        let mut i = 0;
        while i < 16 {
            h.ip[8 + i] = self.src_ip[i];
            h.ip[24 + i] = self.dst_ip[i];
            i += 1;
        }
        let [sp_hi, sp_lo] = self.src_port.to_be_bytes();
        let [dp_hi, dp_lo] = self.dst_port.to_be_bytes();
        let csum = match inner_sum {
            Some(sum) => self.udp_checksum(sum, udp_len),
            None => 0,
        };
        let [c_hi, c_lo] = csum.to_be_bytes();
        h.udp = [sp_hi, sp_lo, dp_hi, dp_lo, len_hi, len_lo, c_hi, c_lo];
        h.vxlan = VxlanHdr::new(self.vni);
        let mut i = 0;
        while i < 6 {
            h.inner_eth[i] = self.inner_dst_mac[i];
            h.inner_eth[6 + i] = self.inner_src_mac[i];
            i += 1;
        }
        let [e_hi, e_lo] = ETH_P_IPV6.to_be_bytes();
        h.inner_eth[12] = e_hi;
        h.inner_eth[13] = e_lo;
    }

    /// The outer UDP checksum from the headers alone (local checksum offload, the kernel's
    /// `lco_csum`): see [`inner_ipv6_checksum_part`].
    #[inline(always)]
    fn udp_checksum(&self, inner_sum: u32, udp_len: u32) -> u16 {
        let mut sum = add_ipv6_pseudo_header(inner_sum, self.src_ip, self.dst_ip, udp_len, IPPROTO_UDP);
        // UDP header, its checksum field taken as zero.
        sum += self.src_port as u32 + self.dst_port as u32 + udp_len;
        // VXLAN: the I flag, then the VNI in the top 24 bits of the second word.
        let vni = self.vni & 0x00ff_ffff;
        sum += ((VXLAN_FLAG_VNI as u32) << 8) + (vni >> 8) + ((vni & 0xff) << 8);
        sum = add_words(add_words(sum, self.inner_dst_mac), self.inner_src_mac);
        sum += ETH_P_IPV6 as u32;
        match fold(sum) {
            // 0 means "no checksum"; its ones'-complement twin says "checksum 0" (RFC 768).
            0 => 0xffff,
            c => c,
        }
    }
}

/// What an inner IPv6 header and the packet behind it add to the outer UDP checksum, when the
/// packet carries TCP, UDP or ICMPv6 straight after its header: once the inner checksum is
/// right, whether the sender finished it or a NIC will (CHECKSUM_PARTIAL), the inner segment
/// sums to the complement of its own pseudo-header, so the payload need not be read. None for
/// anything else (extension headers, fragments, other protocols): those get 0, "no checksum"
/// (RFC 6935), which our decapsulation takes and a kernel vxlan device only with
/// udp6zerocsumrx.
#[inline(always)]
pub fn inner_ipv6_checksum_part(inner_ip: &[u8; 40]) -> Option<u32> {
    let next = inner_ip[6];
    if !matches!(next, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6) {
        return None;
    }
    let upper_len = u16::from_be_bytes([inner_ip[4], inner_ip[5]]) as u32;
    // The pseudo-header's words are in the header too (addresses, length, next header): only
    // what is not cancels out, with the pseudo-header subtracted as its complement.
    let header = add_words(0, inner_ip);
    let pseudo = upper_len + next as u32 + add_words(add_words(0, &addr(inner_ip, 8)), &addr(inner_ip, 24));
    Some(header + (!fold_sum(pseudo)) as u32)
}

#[inline(always)]
fn addr(h: &[u8; 40], at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        a[i] = h[at + i];
        i += 1;
    }
    a
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

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

    /// The whole packet summed the slow way must check out, for an inner packet whose own
    /// checksum is right.
    #[test]
    fn udp6_tunnel_checksum_matches_a_full_sum() {
        let a = |last: u8| {
            let mut ip = [0u8; 16];
            ip[0] = 0xfd;
            ip[15] = last;
            ip
        };
        for (next, payload_len) in [(IPPROTO_ICMPV6, 40usize), (IPPROTO_UDP, 33), (IPPROTO_TCP, 1400)] {
            // The inner segment: some bytes, then a checksum that makes it valid.
            let mut segment: Vec<u8> = (0..payload_len).map(|i| (i * 7 + 3) as u8).collect();
            let csum_at = match next {
                IPPROTO_TCP => 16,
                IPPROTO_UDP => 6,
                _ => 2,
            };
            segment[csum_at] = 0;
            segment[csum_at + 1] = 0;
            let (isrc, idst) = (a(2), a(3));
            let mut padded = segment.clone();
            if padded.len() % 2 == 1 {
                padded.push(0);
            }
            let c = fold(add_slice(
                add_ipv6_pseudo_header(0, &isrc, &idst, payload_len as u32, next),
                &padded,
            ));
            segment[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
            let inner_ip = ipv6_header(isrc, idst, payload_len as u16, next);
            let e = Encap6 {
                src_ip: &a(0x10),
                dst_ip: &a(0x20),
                src_port: 40000,
                dst_port: 8472,
                vni: 1,
                inner_src_mac: &[2, 0, 0, 0, 0, 1],
                inner_dst_mac: &[2, 0, 0, 0, 0, 2],
            };
            let inner_len = 40 + payload_len as u32;
            let h = e.headers(inner_ipv6_checksum_part(&inner_ip), inner_len);
            assert_eq!(u16::from_be_bytes([h.ip[4], h.ip[5]]) as u32, inner_len + 30);
            assert_ne!(&h.udp[6..8], &[0, 0], "next header {next}");
            // Sum the outer UDP datagram as a receiver does.
            // SAFETY: EncapHeaders6 is plain bytes, no padding.
            let bytes: [u8; 70] = unsafe { core::mem::transmute(h) };
            let mut datagram = bytes[40..].to_vec();
            datagram.extend(inner_ip);
            datagram.extend(&segment);
            if datagram.len() % 2 == 1 {
                datagram.push(0);
            }
            let check = fold(add_slice(
                add_ipv6_pseudo_header(0, e.src_ip, e.dst_ip, inner_len + 30, IPPROTO_UDP),
                &datagram,
            ));
            assert_eq!(check, 0, "next header {next}: the receiver's sum must come out 0");
        }
        // Extension header first: no checksum rather than a wrong one.
        let inner_ip = ipv6_header(a(2), a(3), 48, IPV6_HOP_BY_HOP);
        assert_eq!(inner_ipv6_checksum_part(&inner_ip), None);
        let h = Encap6 {
            src_ip: &a(0x10),
            dst_ip: &a(0x20),
            src_port: 1,
            dst_port: 8472,
            vni: 1,
            inner_src_mac: &[0; 6],
            inner_dst_mac: &[0; 6],
        }
        .headers(None, 88);
        assert_eq!(h.ip[..8], ipv6_header(a(0x10), a(0x20), 88 + 30, IPPROTO_UDP)[..8]);
        assert_eq!(h.ip, ipv6_header(a(0x10), a(0x20), 88 + 30, IPPROTO_UDP));
        assert_eq!(&h.udp[6..8], &[0, 0]);
    }

    fn add_slice(mut acc: u32, data: &[u8]) -> u32 {
        for w in data.chunks(2) {
            acc += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32;
        }
        acc
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
