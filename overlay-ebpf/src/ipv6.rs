//! IPv6, as flannel carries it: IPv6 inner packets in VXLAN over an IPv6 underlay, between
//! PublicIPv6s (flannel's `flannel-v6.<VNI>` device). Never IPv4 in IPv6 or the reverse: flannel
//! pairs each family with its own underlay. The entry points branch here on the EtherType, so
//! the IPv4 path stays as it is; the acceptance rule is overlay-common's, shared by both.
//!
//! Outer extension headers on ingress: Hop-by-Hop and Destination Options headers are walked
//! past (up to [`MAX_EXT_HEADERS`]), as the kernel's stack would before it reaches UDP; a
//! first fragment of a tunnel packet is dropped and counted as for IPv4 (we do not reassemble),
//! later fragments and any other extension header (routing, AH, ESP, more than the bound) pass
//! to the stack untouched: no socket listens on the tunnel port while our datapath runs, so the
//! stack drops them, and nothing reaches a container unjudged.
use core::mem::offset_of;

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
    },
    helpers::bpf_skb_load_bytes,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv6Hdr,
    udp::UdpHdr,
};
use overlay_common::{
    CounterIndex, DropReason,
    accept::{InnerAddresses, Ipv6Subnet, accept_tunnel_packet},
    flow_hash, flow_src_port, fold_ipv6,
    wire::{
        Encap6, EncapHeaders6, IPPROTO_UDP, IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, VXLAN6_OVERHEAD, VxlanHdr,
        inner_ipv6_checksum_part,
    },
};

use crate::{
    counters::count,
    decap::Accepted,
    encap::{fib_params, has_ports, redirect_via_fib},
    maps::{CONFIG6, PEERS6, PEERS6_BY_IP, SCRATCH6},
    packet::{Packet, read},
};

/// Address family of `bpf_fib_lookup` (AF_INET6 from the kernel's socket.h).
const AF_INET6: u8 = 10;

/// How many outer extension headers decapsulation walks past before giving up (passing).
const MAX_EXT_HEADERS: usize = 3;

/// Fragment header: the 13-bit offset (in 8-byte units) and the M flag, in its 3rd-4th bytes.
const FRAG_OFFSET_MASK: u16 = 0xfff8;
const FRAG_MORE: u16 = 0x0001;

/// Per-CPU working space of the IPv6 encapsulation: the inner header, the outer headers and
/// the route lookup are built here rather than on the 512-byte stack, which the IPv4 path
/// (the caller's frame) and these would overflow together. Only this program uses it.
#[repr(C)]
pub struct Scratch6 {
    inner: [u8; 40],
    headers: EncapHeaders6,
    _pad: [u8; 2],
    fib: bpf_fib_lookup,
}

/// TC egress of the overlay device, for an IPv6 frame. A function of its own (a BPF-to-BPF
/// call), so the IPv4 path's frame does not grow by this one's.
#[inline(never)]
pub fn try_encap6(ctx: &TcContext) -> Result<i32, DropReason> {
    // IPv6 not enabled: a frame of a family we do not carry, as before IPv6 support.
    let cfg = CONFIG6.get(0).ok_or(DropReason::NotIpv4)?;
    if cfg.enabled == 0 {
        return Err(DropReason::NotIpv4);
    }
    // SAFETY: our CPU's slot, used by this program only and to its end.
    let s = unsafe { &mut *SCRATCH6.get_ptr_mut(0).ok_or(DropReason::EncapFailed)? };
    // SAFETY: the helper writes 40 bytes into the slot's array of 40, or fails.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            EthHdr::LEN as u32,
            s.inner.as_mut_ptr() as *mut _,
            40,
        )
    };
    if rc != 0 || s.inner[0] >> 4 != 6 {
        return Err(DropReason::NotIpv4);
    }
    let next = s.inner[6];
    let dst = addr_at(&s.inner, 24);
    let peer = PEERS6.get(Key::new(128, dst)).ok_or(DropReason::NoPeer)?;

    let inner_len = ctx.len() - EthHdr::LEN as u32;
    // The overlay route's MTU has the stack answer "packet too big" long before this; a packet
    // that still does not fit (a route changed by hand) is dropped, not sent to be lost on
    // the underlay. GSO packets are cut to size after us.
    // SAFETY: reading a field of the context the kernel gave us.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 && inner_len > cfg.mtu {
        return Err(DropReason::TooBig);
    }

    // Ports only right after the IPv6 header: behind extension headers (fragments among them)
    // every packet of a flow takes the addresses-only hash, and so one outer port.
    let ports = if has_ports(next) {
        read::<_, [u8; 4]>(ctx, EthHdr::LEN + Ipv6Hdr::LEN)
            .map(u32::from_ne_bytes)
            .unwrap_or(0)
    } else {
        0
    };
    let hash = flow_hash(fold_ipv6(addr_at(&s.inner, 8)), fold_ipv6(dst), next, ports);
    let inner_sum = inner_ipv6_checksum_part(&s.inner);
    Encap6 {
        src_ip: &cfg.public_ip,
        dst_ip: &peer.public_ip,
        src_port: flow_src_port(hash),
        dst_port: cfg.port,
        vni: cfg.vni,
        inner_src_mac: &cfg.vtep_mac,
        inner_dst_mac: &peer.vtep_mac,
    }
    .fill(&mut s.headers, inner_sum, inner_len);

    // As for IPv4 (encap.rs): the encap flags keep GSO, FIXED_GSO keeps the MSS. The kernel
    // marks GSO packets SKB_GSO_UDP_TUNNEL (no "_CSUM": no helper asks for it), so segments cut
    // in software or by a NIC keep the checksum computed here for the whole packet, which is
    // right only for an unsegmented one. Over veth (the packet crosses whole, still
    // CHECKSUM_PARTIAL, and the receiver does not verify it) that is enough; see the README's
    // known limits for hardware.
    ctx.adjust_room(VXLAN6_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, encap6_flags())
        .map_err(|_| DropReason::EncapFailed)?;
    ctx.store(EthHdr::LEN, &s.headers, 0)
        .map_err(|_| DropReason::EncapFailed)?;

    s.fib = fib_params(
        AF_INET6,
        cfg.underlay_ifindex,
        words(&cfg.public_ip),
        words(&peer.public_ip),
    );
    let action = redirect_via_fib(ctx, cfg.underlay_ifindex, &mut s.fib, EtherType::Ipv6, None)?;
    count(CounterIndex::EncapVxlan6, inner_len as u64);
    Ok(action)
}

/// The 16 bytes at `at` of an IPv6 header (8: source, 24: destination).
#[inline(always)]
fn addr_at(h: &[u8; 40], at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        a[i] = h[at + i];
        i += 1;
    }
    a
}

/// An address as bpf_fib_lookup holds it: four words in network byte order.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

fn encap6_flags() -> u64 {
    (BPF_F_ADJ_ROOM_FIXED_GSO
        | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
        | aya_ebpf::bpf_f_adj_room_encap_l2(EthHdr::LEN as u64)
}

/// The inner IPv6 header and where it starts.
struct Inner6 {
    offset: usize,
    ip: Ipv6Hdr,
}

impl InnerAddresses<[u8; 16]> for Inner6 {
    #[inline(always)]
    fn source(&self) -> [u8; 16] {
        self.ip.src_addr
    }

    #[inline(always)]
    fn destination(&self) -> [u8; 16] {
        self.ip.dst_addr
    }
}

/// decap.rs's `classify` for an IPv6 frame: Ok(None) passes it untouched, Err drops it.
#[inline(always)]
pub fn classify6<P: Packet>(pkt: &P) -> Result<Option<Accepted>, DropReason> {
    let Some(cfg) = CONFIG6.get(0) else {
        return Ok(None);
    };
    if cfg.enabled == 0 {
        return Ok(None);
    }
    let Some(ip) = read::<P, Ipv6Hdr>(pkt, EthHdr::LEN) else {
        return Ok(None);
    };
    if ip.version() != 6 || ip.dst_addr != cfg.public_ip {
        return Ok(None);
    }

    let mut next = ip.next_hdr;
    let mut offset = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut first_fragment = false;
    // Written as a bounded loop the compiler unrolls: each header a straight line for the
    // verifier, with its offset bounded by the header lengths (at most 2 KiB each).
    for _ in 0..MAX_EXT_HEADERS {
        if next == IPV6_HOP_BY_HOP || next == IPV6_DEST_OPTS {
            let Some([following, len]) = read::<P, [u8; 2]>(pkt, offset) else {
                return Ok(None);
            };
            next = following;
            offset += (len as usize + 1) * 8;
        } else if next == IPV6_FRAGMENT {
            let Some(frag) = read::<P, [u8; 4]>(pkt, offset) else {
                return Ok(None);
            };
            let field = u16::from_be_bytes([frag[2], frag[3]]);
            if field & FRAG_OFFSET_MASK != 0 {
                // No UDP header in a later fragment: we cannot tell whose it is.
                return Ok(None);
            }
            // Offset 0 without M is an "atomic fragment", a whole packet (RFC 6946).
            first_fragment = field & FRAG_MORE != 0;
            next = frag[0];
            offset += 8;
        } else {
            break;
        }
    }
    if next != IPPROTO_UDP {
        return Ok(None);
    }
    let Some(udp) = read::<P, UdpHdr>(pkt, offset) else {
        return Ok(None);
    };
    if udp.dst_port() != cfg.port {
        return Ok(None);
    }

    // Tunnel traffic for us from here on.
    if first_fragment {
        return Err(DropReason::Fragment);
    }
    // SAFETY: as in decap.rs: any bytes are a valid PeerSubnet6, read in place.
    let sender = unsafe { PEERS6_BY_IP.get(&ip.src_addr) };
    let our_subnet = Ipv6Subnet {
        addr: cfg.subnet_addr,
        prefix_len: cfg.subnet_prefix_len,
    };
    let inner = accept_tunnel_packet(sender, our_subnet, || inner_ipv6(pkt, cfg.vni, offset + UdpHdr::LEN))?;
    Ok(Some(Accepted {
        strip: inner.offset - EthHdr::LEN,
        inner_len: Ipv6Hdr::LEN + u16::from_be_bytes(inner.ip.payload_len) as usize,
        counter: CounterIndex::DecapVxlan6,
        decap_l3: BPF_F_ADJ_ROOM_DECAP_L3_IPV6 as u64,
    }))
}

/// The inner IPv6 header after the VXLAN and inner Ethernet headers starting at `payload`.
#[inline(always)]
fn inner_ipv6<P: Packet>(pkt: &P, vni: u32, payload: usize) -> Result<Inner6, DropReason> {
    let vx = read::<P, VxlanHdr>(pkt, payload).ok_or(DropReason::Malformed)?;
    if vx.vni() != Some(vni & 0x00ff_ffff) {
        return Err(DropReason::WrongVni);
    }
    let ether_type =
        read::<P, u16>(pkt, payload + VxlanHdr::LEN + offset_of!(EthHdr, ether_type)).ok_or(DropReason::Malformed)?;
    if ether_type != EtherType::Ipv6 as u16 {
        // flannel-v6.<VNI> carries IPv6 only.
        return Err(DropReason::Malformed);
    }
    let offset = payload + VxlanHdr::LEN + EthHdr::LEN;
    let ip = read::<P, Ipv6Hdr>(pkt, offset).ok_or(DropReason::Malformed)?;
    if ip.version() != 6 {
        return Err(DropReason::Malformed);
    }
    let total = Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize;
    if offset + total > pkt.len() {
        return Err(DropReason::Malformed);
    }
    Ok(Inner6 { offset, ip })
}
