//! Egress: wrap an IPv4 packet routed to the overlay device in the network's tunnel format
//! and send it out of the underlay towards the peer that owns the destination subnet.
//!
//! Headers are read and written in place (direct packet access): the helpers that copy bytes
//! in and out cost more per call than the checks that make direct access safe.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
        TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use overlay_common::{
    CounterIndex, Format, flow_hash, flow_src_port,
    wire::{ETH_LEN, ETH_P_IP, Encap, IPV4_MF, IPV4_OFFSET_MASK},
};

use crate::{
    counters::count,
    maps::{CONFIG, PEERS},
    packet::PacketReader,
};

const AF_INET: u8 = 2;

pub fn encap(ctx: &TcContext) -> Result<i32, CounterIndex> {
    let cfg = CONFIG.get(0).ok_or(CounterIndex::DropNoConfig)?;
    let format = cfg.format().ok_or(CounterIndex::DropNoConfig)?;

    let eth: [u8; 14] = ctx.read(0).ok_or(CounterIndex::DropNotIpv4)?;
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IP {
        return Err(CounterIndex::DropNotIpv4);
    }
    let ip: [u8; 20] = ctx.read(ETH_LEN as usize).ok_or(CounterIndex::DropNotIpv4)?;
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(CounterIndex::DropNotIpv4);
    }
    let (src, dst) = ([ip[12], ip[13], ip[14], ip[15]], [ip[16], ip[17], ip[18], ip[19]]);

    let peer = PEERS.get(Key::new(32, dst)).ok_or(CounterIndex::DropNoPeer)?;
    let peer_ip = peer.public_ip;
    let peer_mac = peer.vtep_mac;

    // The inner flow picks the outer source port, so receivers spread tunnel flows over their
    // queues as they do for the kernel's vxlan device. Ports only where the protocol has them
    // and the packet is whole: every fragment of a datagram must leave on the same port.
    let whole = u16::from_be_bytes([ip[6], ip[7]]) & (IPV4_MF | IPV4_OFFSET_MASK) == 0;
    let ports = if whole && has_ports(ip[9]) {
        ctx.read::<[u8; 4]>(ETH_LEN as usize + ihl)
            .map(u32::from_ne_bytes)
            .unwrap_or(0)
    } else {
        0
    };
    let src_port = flow_src_port(flow_hash(src, dst, ip[9], ports));

    let inner_len = ctx.len() - ETH_LEN;
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
        .map_err(|_| CounterIndex::DropEncapFailed)?;

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
    // adjust_room put the new room in the linear area, right after the Ethernet header.
    // SAFETY: EncapHeaders is repr(C) byte arrays only (50 bytes, no padding); udp uses its
    // first 28.
    let hp = &headers as *const _;
    match format {
        Format::Udp => write_at(ctx, ETH_LEN as usize, unsafe { &*(hp as *const [u8; 28]) }),
        Format::Vxlan => write_at(ctx, ETH_LEN as usize, unsafe { &*(hp as *const [u8; 50]) }),
    }?;

    let action = redirect_to_peer(ctx, cfg.underlay_ifindex, cfg.public_ip, peer_ip)?;
    count(CounterIndex::encap(format), inner_len as u64);
    Ok(action)
}

/// TCP, UDP, SCTP, UDP-Lite: the first four bytes after the IP header are the two ports.
#[inline(always)]
fn has_ports(protocol: u8) -> bool {
    matches!(protocol, 6 | 17 | 132 | 136)
}

/// Write `value` at `offset` of the linear area.
#[inline(always)]
fn write_at<T: Copy>(ctx: &TcContext, offset: usize, value: &T) -> Result<(), CounterIndex> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(CounterIndex::DropEncapFailed);
    }
    // SAFETY: the bytes at offset lie inside the linear area (checked above); unaligned.
    unsafe { core::ptr::write_unaligned((start + offset) as *mut T, *value) };
    Ok(())
}

/// Route the outer packet: the fib lookup gives next hop and MACs when the neighbour is known
/// (the common case); otherwise the kernel resolves it (`bpf_redirect_neigh`), so peers behind
/// a gateway and cold neighbour caches both work.
fn redirect_to_peer(ctx: &TcContext, ifindex: u32, src: [u8; 4], dst: [u8; 4]) -> Result<i32, CounterIndex> {
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // tot_len stays 0: no MTU check here, GSO packets are segmented after us.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let mut eth = [0u8; 14];
        eth[0..6].copy_from_slice(&p.dmac);
        eth[6..12].copy_from_slice(&p.smac);
        eth[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        write_at(ctx, 0, &eth)?;
        return Ok(unsafe { bpf_redirect(p.ifindex, 0) } as i32);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Ok(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    Err(CounterIndex::DropNoRoute)
}

/// The `bpf_skb_adjust_room` flags of our encapsulation in `format`. Vxlan's inner Ethernet
/// header needs BPF_F_ADJ_ROOM_ENCAP_L2_ETH (5.13 and later), udp's flags are from 5.2.
fn encap_flags(format: Format) -> u64 {
    let mut flags = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP) as u64;
    if format == Format::Vxlan {
        flags |= BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64 | aya_ebpf::bpf_f_adj_room_encap_l2(ETH_LEN as u64);
    }
    flags
}

/// The probe: grow an IPv4 packet as vxlan encapsulation does. The kernel refuses flags it
/// does not know (EINVAL), so the verdict says whether `overlay_encap` can work here.
pub fn probe_vxlan_encap(ctx: &TcContext) -> i32 {
    match ctx.adjust_room(
        Format::Vxlan.overhead() as i32,
        BPF_ADJ_ROOM_MAC,
        encap_flags(Format::Vxlan),
    ) {
        Ok(()) => TC_ACT_OK as i32,
        Err(_) => TC_ACT_SHOT as i32,
    }
}
