//! Asked at start, never attached: userspace runs `overlay_probe_adjust_room` on made-up
//! packets (BPF_PROG_TEST_RUN) that carry a size change and `bpf_skb_adjust_room` flags. The
//! kernel refuses flags it does not know (EINVAL), so the verdict says whether it takes them.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use overlay_common::adjust_room::{self as room, PROBE_FLAGS_OFFSET, PROBE_LEN_OFFSET};

// overlay-common's copies of the UAPI values must be the kernel headers' ones.
const _: () = assert!(
    room::FIXED_GSO == BPF_F_ADJ_ROOM_FIXED_GSO as u64
        && room::ENCAP_L3_IPV4 == BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
        && room::ENCAP_L4_UDP == BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
        && room::ENCAP_L2_ETH == BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
        && room::DECAP_L3_IPV4 == BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64
        && room::encap_l2(14) == aya_ebpf::bpf_f_adj_room_encap_l2(14)
);

pub fn probe_adjust_room(ctx: &TcContext) -> i32 {
    let (Ok(len_diff), Ok(flags)) = (ctx.load::<i32>(PROBE_LEN_OFFSET), ctx.load::<u64>(PROBE_FLAGS_OFFSET)) else {
        return TC_ACT_SHOT as i32;
    };
    match ctx.adjust_room(len_diff, BPF_ADJ_ROOM_MAC, flags) {
        Ok(()) => TC_ACT_OK as i32,
        Err(_) => TC_ACT_SHOT as i32,
    }
}
