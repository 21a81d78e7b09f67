//! Ingress on the underlay: unwrap tunnel packets from known peers. Two entry points share one
//! decision ([`classify`]): XDP (`decap_xdp`) and TC ingress (`decap_tc`), which differ only in
//! how they remove the outer headers.
//!
//! Decision order, and why: a packet is ours to judge only once we have seen that it is UDP to
//! our tunnel port and addressed to our PublicIP; anything we cannot classify that far passes
//! untouched (a truncated frame, a non-first fragment). From there on, every packet is either
//! decapsulated or dropped with a counted reason.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action,
    },
    helpers::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    CounterIndex, Format, subnet_contains,
    wire::{ETH_LEN, ETH_P_IP, IPPROTO_UDP, IPV4_MF, IPV4_OFFSET_MASK, UDP_LEN, VXLAN_LEN},
};

use crate::{
    counters::count,
    maps::{CONFIG, PEERS_BY_IP},
    packet::{PacketReader, ptr_at},
};

/// BPF_F_ADJ_ROOM_DECAP_L4_UDP: in the kernel's UAPI after 6.18, not in our bindings yet.
const ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;

/// How many of the optional decap flags this kernel has refused, newest first: 1 once it
/// refused DECAP_L4_UDP (before 6.19), 2 once it refused DECAP_L3_IPV4 too (before 6.3).
/// Later packets start at the level found, so each refusal costs one packet one failed call
/// (a global of this load of the programs; a racing packet on another CPU only asks once more).
#[unsafe(no_mangle)]
static mut DECAP_FLAGS_REFUSED: u8 = 0;

/// A tunnel packet accepted for decapsulation.
pub struct Accepted {
    format: Format,
    /// Bytes between the outer Ethernet header and the inner IPv4 header.
    strip: usize,
    /// The inner IPv4 packet's total length.
    inner_len: usize,
    /// The outer Ethernet header: to this NIC, from the last hop.
    eth: [u8; 14],
}

/// Fixed-size IPv4 header fields we read; options, if any, are skipped by IHL.
struct Ipv4 {
    vihl: u8,
    tot_len: u16,
    frags: u16,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
}

#[inline(always)]
fn ipv4_at<P: PacketReader>(pkt: &P, offset: usize) -> Option<Ipv4> {
    let h: [u8; 20] = pkt.read(offset)?;
    Some(Ipv4 {
        vihl: h[0],
        tot_len: u16::from_be_bytes([h[2], h[3]]),
        frags: u16::from_be_bytes([h[6], h[7]]),
        proto: h[9],
        src: [h[12], h[13], h[14], h[15]],
        dst: [h[16], h[17], h[18], h[19]],
    })
}

/// Ok(None): not a tunnel packet for us, pass it on untouched. Err: ours, but dropped.
#[inline(always)]
pub fn classify<P: PacketReader>(pkt: &P) -> Result<Option<Accepted>, CounterIndex> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(None);
    };
    let Some(format) = cfg.format() else {
        return Ok(None);
    };

    let Some(eth) = pkt.read::<[u8; 14]>(0) else {
        return Ok(None);
    };
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IP {
        return Ok(None);
    }
    let Some(ip) = ipv4_at(pkt, ETH_LEN as usize) else {
        return Ok(None);
    };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 || ip.proto != IPPROTO_UDP {
        return Ok(None);
    }
    if ip.frags & IPV4_OFFSET_MASK != 0 {
        // No UDP header in a non-first fragment: we cannot tell whose it is.
        return Ok(None);
    }
    let udp_off = ETH_LEN as usize + ihl;
    let Some(udp) = pkt.read::<[u8; 8]>(udp_off) else {
        return Ok(None);
    };
    if u16::from_be_bytes([udp[2], udp[3]]) != cfg.port || ip.dst != cfg.public_ip {
        return Ok(None);
    }

    // Tunnel traffic for us from here on.
    if ip.frags & IPV4_MF != 0 {
        return Err(CounterIndex::DropFragment);
    }
    // SAFETY: the value is copied out at once; a concurrent update can only give us an old or
    // a new entry, both valid.
    let peer = unsafe { PEERS_BY_IP.get(&ip.src) }.ok_or(CounterIndex::DropUnknownPeer)?;
    let (peer_net, peer_len) = (peer.addr, peer.prefix_len);

    let mut inner_off = udp_off + UDP_LEN as usize;
    if format == Format::Vxlan {
        let vx: [u8; 8] = pkt.read(inner_off).ok_or(CounterIndex::DropMalformed)?;
        if overlay_common::wire::vxlan_vni(&vx) != Some(cfg.vni & 0x00ff_ffff) {
            return Err(CounterIndex::DropWrongVni);
        }
        let inner_eth: [u8; 14] = pkt
            .read(inner_off + VXLAN_LEN as usize)
            .ok_or(CounterIndex::DropMalformed)?;
        if u16::from_be_bytes([inner_eth[12], inner_eth[13]]) != ETH_P_IP {
            return Err(CounterIndex::DropMalformed);
        }
        inner_off += (VXLAN_LEN + ETH_LEN) as usize;
    }

    let inner = ipv4_at(pkt, inner_off).ok_or(CounterIndex::DropMalformed)?;
    let inner_len = inner.tot_len as usize;
    let inner_ihl = (inner.vihl & 0x0f) as usize * 4;
    if inner.vihl >> 4 != 4 || inner_ihl < 20 || inner_len < inner_ihl || inner_off + inner_len > pkt.len() {
        return Err(CounterIndex::DropMalformed);
    }
    if !subnet_contains(peer_net, peer_len, inner.src) {
        return Err(CounterIndex::DropSpoofedSource);
    }
    if !subnet_contains(cfg.subnet_addr, cfg.subnet_prefix_len, inner.dst) {
        return Err(CounterIndex::DropNotOurSubnet);
    }
    Ok(Some(Accepted {
        format,
        strip: inner_off - ETH_LEN as usize,
        inner_len,
        eth,
    }))
}

/// XDP: move the frame start past the outer headers and write the outer Ethernet header
/// (addressed to this NIC) back in front: the stack then routes the inner packet as if it had
/// arrived directly.
pub fn decap_xdp(ctx: &XdpContext) -> Result<u32, CounterIndex> {
    let Some(acc) = classify(ctx)? else {
        return Ok(xdp_action::XDP_PASS);
    };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, acc.strip as i32) } != 0 {
        return Err(CounterIndex::DropDecapFailed);
    }
    // Packet pointers are stale after adjust_head: re-check before writing.
    let new_eth = ptr_at::<[u8; 14]>(ctx, 0).ok_or(CounterIndex::DropDecapFailed)?;
    unsafe { core::ptr::write_unaligned(new_eth, acc.eth) };
    count(CounterIndex::decap(acc.format), acc.inner_len as u64);
    Ok(xdp_action::XDP_PASS)
}

/// TC ingress: the same decision on an skb, for underlays where XDP costs more than it saves
/// (veth: native XDP disables GSO on the peer and copies every frame). The kernel removes the
/// outer headers: BPF_ADJ_ROOM_MAC cuts right after the Ethernet header, which stays in front
/// unchanged (this NIC's MAC, IPv4); FIXED_GSO keeps gso_size, the inner MSS, as it is.
pub fn decap_tc(ctx: &TcContext) -> Result<i32, CounterIndex> {
    let Some(acc) = classify(ctx)? else {
        return Ok(TC_ACT_UNSPEC);
    };
    // DECAP_L4_UDP (kernels after 6.18) also clears the skb's tunnel offload state, as the
    // kernel's own tunnel devices do; DECAP_L3_IPV4 (6.3 and later) says the packet stays
    // IPv4. Kernels refuse a flag they do not know at once (EINVAL, nothing changed), and we
    // cut with fewer: both inner and outer packets are IPv4, so nothing else needs telling,
    // but the skb still says "UDP tunnel", and the bridge program (bridge.rs) keeps the
    // container bridge from segmenting it in software.
    let len = -(acc.strip as i32);
    let fixed = BPF_F_ADJ_ROOM_FIXED_GSO as u64;
    let l3 = BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64;
    let ladder = [fixed | l3 | ADJ_ROOM_DECAP_L4_UDP, fixed | l3, fixed];
    // SAFETY: a byte in the program's global data; any value read is valid.
    let start = unsafe { core::ptr::read_volatile(&raw const DECAP_FLAGS_REFUSED) };
    // Written out rather than looped: three tries, each a straight line for the verifier.
    let level = if start == 0 && ctx.adjust_room(len, BPF_ADJ_ROOM_MAC, ladder[0]).is_ok() {
        0
    } else if start <= 1 && ctx.adjust_room(len, BPF_ADJ_ROOM_MAC, ladder[1]).is_ok() {
        1
    } else if ctx.adjust_room(len, BPF_ADJ_ROOM_MAC, ladder[2]).is_ok() {
        2
    } else {
        return Err(CounterIndex::DropDecapFailed);
    };
    if level > start {
        // SAFETY: as above; a lost race between CPUs writes a value as valid.
        unsafe { core::ptr::write_volatile(&raw mut DECAP_FLAGS_REFUSED, level) };
    }
    count(CounterIndex::decap(acc.format), acc.inner_len as u64);
    // On to the next program on this hook, if any, and then the stack.
    Ok(TC_ACT_UNSPEC)
}
