//! Egress: wrap an IPv4 packet routed to the overlay device in the network's tunnel format
//! and send it out of the underlay towards the peer that owns the destination subnet.
//!
//! Headers are read and written in place (direct packet access): the helpers that copy bytes
//! in and out cost more per call than the checks that make direct access safe.
use core::mem::offset_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
};
use overlay_common::{
    CounterIndex, DatapathConfig, DropReason, Format, flow_hash, flow_src_port,
    wire::{Encap, IPV4_MF, IPV4_OFFSET_MASK},
};

use crate::{
    counters::count,
    headers::{ipv4_frags, ipv4_header_len},
    maps::{CONFIG, PEERS},
    packet::{read, write},
};

/// Address family of `bpf_fib_lookup` (AF_INET from the kernel's socket.h).
pub const AF_INET: u8 = 2;

pub fn try_encap(ctx: &TcContext) -> Result<i32, DropReason> {
    let ether_type = read::<_, u16>(ctx, offset_of!(EthHdr, ether_type)).ok_or(DropReason::NotIpv4)?;
    if ether_type == EtherType::Ipv6 as u16 {
        return crate::ipv6::try_encap6(ctx);
    }
    if ether_type != EtherType::Ipv4 as u16 {
        return Err(DropReason::NotIpv4);
    }
    try_encap4(ctx)
}

/// The IPv4 path. Each family in its own function (a BPF-to-BPF call): the verifier counts the
/// frames along a call chain against one 512-byte stack, and the two side by side in the
/// entry point's frame would not fit with either callee.
#[inline(never)]
fn try_encap4(ctx: &TcContext) -> Result<i32, DropReason> {
    let cfg = CONFIG.get(0).ok_or(DropReason::NoConfig)?;
    let format = cfg.format().ok_or(DropReason::NoConfig)?;
    let ip = read::<_, Ipv4Hdr>(ctx, EthHdr::LEN).ok_or(DropReason::NotIpv4)?;
    let ihl = ipv4_header_len(&ip).ok_or(DropReason::NotIpv4)?;

    let peer = PEERS.get(Key::new(32, ip.dst_addr)).ok_or(DropReason::NoPeer)?;
    encap_to_peer(ctx, cfg, format, peer.public_ip, peer.vtep_mac, &ip, ihl)
}

/// Wrap the IPv4 packet after the Ethernet header (`ip`, `ihl` bytes of header) for the peer
/// at `peer_ip` and send it out of the underlay, counted. Shared by the overlay device's egress
/// and host routing's from-container program.
#[inline(always)]
pub fn encap_to_peer(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    format: Format,
    peer_ip: [u8; 4],
    peer_mac: [u8; 6],
    ip: &Ipv4Hdr,
    ihl: usize,
) -> Result<i32, DropReason> {
    // The inner flow picks the outer source port, so receivers spread tunnel flows over their
    // queues as they do for the kernel's vxlan device. Ports only where the protocol has them
    // and the packet is whole: every fragment of a datagram must leave on the same port.
    let whole = ipv4_frags(ip) & (IPV4_MF | IPV4_OFFSET_MASK) == 0;
    let ports = if whole && has_ports(ip.proto) {
        read::<_, [u8; 4]>(ctx, EthHdr::LEN + ihl)
            .map(u32::from_ne_bytes)
            .unwrap_or(0)
    } else {
        0
    };
    let src_port = flow_src_port(flow_hash(ip.src_addr, ip.dst_addr, ip.proto, ports));

    let inner_len = ctx.len() - EthHdr::LEN as u32;
    // The encap flags keep GSO working: the kernel segments the inner TCP stream and
    // replicates our outer headers per segment. FIXED_GSO keeps the MSS: the overlay MTU
    // already leaves room for these headers.
    //
    // The inner L4 checksum stays as the sender left it (often CHECKSUM_PARTIAL, finished by
    // the NIC or at segmentation). We do not finish it here: no helper clears
    // CHECKSUM_PARTIAL, and a finished value in a skb still marked partial is summed again
    // by whoever finishes it (NIC offload, skb_checksum_help) and comes out wrong. Over a
    // bare veth nobody finishes it, which only a userspace receiver (flannel's udp backend)
    // notices; turning tx checksum offload off on that veth fixes it.
    ctx.adjust_room(format.overhead() as i32, BPF_ADJ_ROOM_MAC, encap_flags(format))
        .map_err(|_| DropReason::EncapFailed)?;

    let headers = Encap {
        src_ip: cfg.public_ip,
        dst_ip: peer_ip,
        src_port,
        dst_port: cfg.port,
        vni: cfg.vni,
        inner_src_mac: cfg.vtep_mac,
        inner_dst_mac: peer_mac,
    }
    .headers(format, inner_len);
    // adjust_room put the new room in the linear area, right after the Ethernet header; the
    // packet pointers moved with it, and `write` checks against the new ones. udp writes the
    // first 28 bytes only (outer IPv4 and UDP).
    let written = match format {
        Format::Udp => write(ctx, EthHdr::LEN, headers.outer),
        Format::Vxlan => write(ctx, EthHdr::LEN, headers),
    };
    if !written {
        return Err(DropReason::EncapFailed);
    }

    let action = redirect_to_peer(ctx, cfg.underlay_ifindex, cfg.public_ip, peer_ip, None)?;
    count(CounterIndex::encap(format), inner_len as u64);
    Ok(action)
}

/// TCP, UDP, SCTP, UDP-Lite: the first four bytes after the IP header are the two ports.
#[inline(always)]
pub fn has_ports(protocol: u8) -> bool {
    const TCP: u8 = IpProto::Tcp as u8;
    const UDP: u8 = IpProto::Udp as u8;
    const SCTP: u8 = IpProto::Sctp as u8;
    const UDP_LITE: u8 = IpProto::UdpLite as u8;
    matches!(protocol, TCP | UDP | SCTP | UDP_LITE)
}

/// Route the outer packet: the fib lookup gives next hop and MACs when the neighbour is known
/// (the common case); otherwise the kernel resolves it (`bpf_redirect_neigh`), so peers behind
/// a gateway and cold neighbour caches both work. `nexthop`: resolve that address rather than
/// the packet's own destination (an unencapsulated packet routed via a peer's PublicIP).
#[inline(always)]
pub fn redirect_to_peer(
    ctx: &TcContext,
    ifindex: u32,
    src: [u8; 4],
    dst: [u8; 4],
    nexthop: Option<[u8; 4]>,
) -> Result<i32, DropReason> {
    let mut p = fib_params_v4(ifindex, src, dst);
    redirect_via_fib(ctx, ifindex, &mut p, EtherType::Ipv4, nexthop)
}

/// The route lookup `p` describes (family, addresses and `ifindex` filled in), then the
/// redirect: straight out with the MACs found, or through the kernel's neighbour resolution
/// (of `nexthop`, an IPv4 address, when given; else of the packet's destination).
pub fn redirect_via_fib(
    ctx: &TcContext,
    ifindex: u32,
    p: &mut bpf_fib_lookup,
    ether_type: EtherType,
    nexthop: Option<[u8; 4]>,
) -> Result<i32, DropReason> {
    // tot_len stays 0: no MTU check here, GSO packets are segmented after us.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let eth = EthHdr {
            dst_addr: p.dmac,
            src_addr: p.smac,
            ether_type: ether_type as u16,
        };
        if !write(ctx, 0, eth) {
            return Err(DropReason::EncapFailed);
        }
        return Ok(unsafe { bpf_redirect(p.ifindex, 0) } as i32);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        let Some(nh) = nexthop else {
            return Ok(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32);
        };
        // Cold path (an unresolved neighbour): the memset zeroed() costs does not matter here.
        let mut params: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        params.nh_family = AF_INET as u32;
        params.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(nh);
        let size = core::mem::size_of::<bpf_redir_neigh>() as i32;
        return Ok(unsafe { bpf_redirect_neigh(ifindex, &mut params, size, 0) } as i32);
    }
    Err(DropReason::NoRoute)
}

/// Always 0; see [`fib_params_v4`].
#[unsafe(no_mangle)]
static OPAQUE_ZERO: u32 = 0;

/// `bpf_fib_lookup`'s parameters for an IPv4 lookup from `src` to `dst` out of `ifindex`.
#[inline(always)]
fn fib_params_v4(ifindex: u32, src: [u8; 4], dst: [u8; 4]) -> bpf_fib_lookup {
    let word = |a: [u8; 4]| [u32::from_ne_bytes(a), 0, 0, 0];
    fib_params(AF_INET, ifindex, word(src), word(dst))
}

/// `bpf_fib_lookup`'s parameters for a lookup in `family` from `src` to `dst` (addresses as
/// the struct holds them: an IPv4 one in the first word, an IPv6 one in all four, network byte
/// order) out of `ifindex`, every other byte zero, written as sixteen 4-byte stores.
/// `core::mem::zeroed` and field writes cost a byte-at-a-time `memset` of the struct (some 300
/// instructions per packet).
#[inline(always)]
pub fn fib_params(family: u8, ifindex: u32, src: [u32; 4], dst: [u32; 4]) -> bpf_fib_lookup {
    const {
        assert!(size_of::<bpf_fib_lookup>() == 64);
        assert!(align_of::<bpf_fib_lookup>() >= 4);
        assert!(offset_of!(bpf_fib_lookup, family) == 0);
        assert!(offset_of!(bpf_fib_lookup, ifindex) == 8);
        assert!(offset_of!(bpf_fib_lookup, __bindgen_anon_3) == 16);
        assert!(offset_of!(bpf_fib_lookup, __bindgen_anon_4) == 32);
    };
    // A zero LLVM cannot see through: zeroes it knows of become a call to compiler_builtins'
    // memset, which stores one byte per loop turn, however they are written.
    // SAFETY: a plain read of our own global.
    let zero = unsafe { core::ptr::read_volatile(&raw const OPAQUE_ZERO) };
    let mut v = core::mem::MaybeUninit::<bpf_fib_lookup>::uninit();
    let out = v.as_mut_ptr().cast::<u32>();
    // family (then l4_protocol and sport, 0); ifindex; source; destination.
    let words = |i: usize| match i {
        0 => u32::from(family),
        2 => ifindex,
        4..8 => src[i - 4],
        8..12 => dst[i - 8],
        _ => zero,
    };
    for i in 0..16 {
        // SAFETY: 16 words of a 64-byte, 4-aligned struct (asserted above).
        unsafe { out.add(i).write(words(i)) };
    }
    // SAFETY: every byte was written; any bytes are a valid bpf_fib_lookup (plain C data).
    unsafe { v.assume_init() }
}

/// The `bpf_skb_adjust_room` flags of our encapsulation in `format`, as the start-up probe
/// asks the kernel about them.
fn encap_flags(format: Format) -> u64 {
    overlay_common::adjust_room::encap_flags(format)
}
