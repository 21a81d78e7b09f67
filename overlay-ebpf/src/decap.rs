//! Ingress on the underlay: unwrap tunnel packets from known peers. Two entry points share one
//! decision ([`classify`]): XDP (`try_decap_xdp`) and TC ingress (`try_decap_tc`), which differ
//! only in how they remove the outer headers.
//!
//! Decision order, and why: a packet is ours to judge only once we have seen that it is UDP to
//! our tunnel port and addressed to our PublicIP; anything we cannot classify that far passes
//! untouched (a truncated frame, a non-first fragment). From there on, every packet is either
//! decapsulated or dropped with a counted reason; who may send what is overlay-common's
//! `accept_tunnel_packet`, the rule the userspace forwarder applies too.
use core::mem::offset_of;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action},
    helpers::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
    udp::UdpHdr,
};
use overlay_common::{
    CounterIndex, DropReason, Format,
    accept::{InnerAddresses, Ipv4Subnet, accept_tunnel_packet},
    wire::{IPV4_MF, IPV4_OFFSET_MASK, VxlanHdr},
};

use crate::{
    counters::count,
    headers::{ipv4_frags, ipv4_header_len},
    maps::{CONFIG, PEERS_BY_IP},
    packet::{Packet, read, write},
};

/// How many of the optional decap flags this kernel has refused, newest first: 1 once it
/// refused DECAP_L4_UDP (before 6.19), 2 once it refused DECAP_L3_IPV4 too (before 6.3).
/// Later packets start at the level found, so each refusal costs one packet one failed call
/// (a global of this load of the programs; a racing packet on another CPU only asks once more).
#[unsafe(no_mangle)]
static mut DECAP_FLAGS_REFUSED: u8 = 0;

/// A tunnel packet accepted for decapsulation.
pub struct Accepted {
    /// Bytes between the outer Ethernet header and the inner IP header.
    pub strip: usize,
    /// The inner IP packet's total length.
    pub inner_len: usize,
    /// What a decapsulation counts as (format and family).
    pub counter: CounterIndex,
    /// The adjust_room flag saying which IP version the packet stays (6.3 and later).
    pub decap_l3: u64,
}

/// The inner IPv4 header and where it starts.
struct Inner {
    offset: usize,
    ip: Ipv4Hdr,
}

impl InnerAddresses for Inner {
    #[inline(always)]
    fn source(&self) -> [u8; 4] {
        self.ip.src_addr
    }

    #[inline(always)]
    fn destination(&self) -> [u8; 4] {
        self.ip.dst_addr
    }
}

/// Ok(None): not a tunnel packet for us, pass it on untouched. Err: ours, but dropped.
#[inline(always)]
pub fn classify<P: Packet>(pkt: &P) -> Result<Option<Accepted>, DropReason> {
    // Only the EtherType, which ends the header: copying all of it costs instructions on
    // every packet.
    let Some(ether_type) = read::<P, u16>(pkt, offset_of!(EthHdr, ether_type)) else {
        return Ok(None);
    };
    if ether_type == EtherType::Ipv6 as u16 {
        return crate::ipv6::classify6(pkt);
    }
    if ether_type != EtherType::Ipv4 as u16 {
        return Ok(None);
    }
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(None);
    };
    let Some(format) = cfg.format() else {
        return Ok(None);
    };
    let Some(ip) = read::<P, Ipv4Hdr>(pkt, EthHdr::LEN) else {
        return Ok(None);
    };
    let Some(ihl) = ipv4_header_len(&ip) else {
        return Ok(None);
    };
    if ip.proto != IpProto::Udp as u8 {
        return Ok(None);
    }
    if ipv4_frags(&ip) & IPV4_OFFSET_MASK != 0 {
        // No UDP header in a non-first fragment: we cannot tell whose it is.
        return Ok(None);
    }
    let udp_off = EthHdr::LEN + ihl;
    let Some(udp) = read::<P, UdpHdr>(pkt, udp_off) else {
        return Ok(None);
    };
    if udp.dst_port() != cfg.port || ip.dst_addr != cfg.public_ip {
        return Ok(None);
    }

    // Tunnel traffic for us from here on.
    if ipv4_frags(&ip) & IPV4_MF != 0 {
        return Err(DropReason::Fragment);
    }
    // Read in place, not copied (the copy cost 30 instructions per packet). SAFETY: any bytes
    // are a valid PeerSubnet; an update racing this packet judges it by the peer's old or new
    // subnet.
    let sender = unsafe { PEERS_BY_IP.get(&ip.src_addr) };
    let our_subnet = Ipv4Subnet {
        addr: cfg.subnet_addr,
        prefix_len: cfg.subnet_prefix_len,
    };
    let inner = accept_tunnel_packet(sender, our_subnet, || {
        inner_ipv4(pkt, format, cfg.vni, udp_off + UdpHdr::LEN)
    })?;
    Ok(Some(Accepted {
        strip: inner.offset - EthHdr::LEN,
        inner_len: inner.ip.tot_len() as usize,
        counter: CounterIndex::decap(format),
        decap_l3: overlay_common::adjust_room::DECAP_L3_IPV4,
    }))
}

/// The inner IPv4 header of a tunnel packet whose UDP payload starts at `payload`: right
/// there for udp, after the VXLAN and inner Ethernet headers for vxlan.
#[inline(always)]
fn inner_ipv4<P: Packet>(pkt: &P, format: Format, vni: u32, payload: usize) -> Result<Inner, DropReason> {
    let mut offset = payload;
    if format == Format::Vxlan {
        let vx = read::<P, VxlanHdr>(pkt, offset).ok_or(DropReason::Malformed)?;
        if vx.vni() != Some(vni & 0x00ff_ffff) {
            return Err(DropReason::WrongVni);
        }
        // The EtherType ends the inner Ethernet header: if it is there, all of it is.
        let ether_type = read::<P, u16>(pkt, offset + VxlanHdr::LEN + offset_of!(EthHdr, ether_type))
            .ok_or(DropReason::Malformed)?;
        if ether_type != EtherType::Ipv4 as u16 {
            return Err(DropReason::Malformed);
        }
        offset += VxlanHdr::LEN + EthHdr::LEN;
    }
    let ip = read::<P, Ipv4Hdr>(pkt, offset).ok_or(DropReason::Malformed)?;
    let ihl = ipv4_header_len(&ip).ok_or(DropReason::Malformed)?;
    let total = ip.tot_len() as usize;
    if total < ihl || offset + total > pkt.len() {
        return Err(DropReason::Malformed);
    }
    Ok(Inner { offset, ip })
}

/// XDP: move the frame start past the outer headers and write the outer Ethernet header
/// (addressed to this NIC) back in front: the stack then routes the inner packet as if it had
/// arrived directly.
pub fn try_decap_xdp(ctx: &XdpContext) -> Result<u32, DropReason> {
    let Some(acc) = classify(ctx)? else {
        return Ok(xdp_action::XDP_PASS);
    };
    // The outer Ethernet header (to this NIC, from the last hop) goes back in front of the
    // inner packet. classify has seen its EtherType, so this check is only for the verifier.
    let eth = read::<_, EthHdr>(ctx, 0).ok_or(DropReason::DecapFailed)?;
    // SAFETY: the helper checks the new start against the frame itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, acc.strip as i32) } != 0 {
        return Err(DropReason::DecapFailed);
    }
    // Packet pointers are stale after adjust_head; `write` checks against the new ones.
    if !write(ctx, 0, eth) {
        return Err(DropReason::DecapFailed);
    }
    count(acc.counter, acc.inner_len as u64);
    Ok(xdp_action::XDP_PASS)
}

/// TC ingress: the same decision on an skb, for underlays where XDP costs more than it saves
/// (veth: native XDP disables GSO on the peer and copies every frame). The kernel removes the
/// outer headers: BPF_ADJ_ROOM_MAC cuts right after the Ethernet header, which stays in front
/// unchanged (this NIC's MAC, IPv4); FIXED_GSO keeps gso_size, the inner MSS, as it is.
pub fn try_decap_tc(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(acc) = classify(ctx)? else {
        return Ok(TC_ACT_UNSPEC);
    };
    // DECAP_L4_UDP (kernels after 6.18) also clears the skb's tunnel offload state, as the
    // kernel's own tunnel devices do; DECAP_L3_IPV4 (6.3 and later) says the packet stays
    // IPv4 (DECAP_L3_IPV6: IPv6). Kernels refuse a flag they do not know at once (EINVAL,
    // nothing changed), and we cut with fewer: inner and outer packets are of one family, so
    // nothing else needs telling,
    // but the skb still says "UDP tunnel", and the bridge program (bridge.rs) keeps the
    // container bridge from segmenting it in software.
    let len = -(acc.strip as i32);
    let ladder = overlay_common::adjust_room::decap_ladder(acc.decap_l3);
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
        return Err(DropReason::DecapFailed);
    };
    if level > start {
        // SAFETY: as above; a lost race between CPUs writes a value as valid.
        unsafe { core::ptr::write_volatile(&raw mut DECAP_FLAGS_REFUSED, level) };
    }
    count(acc.counter, acc.inner_len as u64);
    // On to the next program on this hook, if any, and then the stack.
    Ok(TC_ACT_UNSPEC)
}
