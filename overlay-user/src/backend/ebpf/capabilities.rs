//! What this kernel offers the eBPF datapath: probed once when the programs load (flags,
//! helpers, memlock accounting), completed when they attach (TCX or clsact, native XDP).
//! Logged in one line at start and reported in `/status` as `capabilities`.
use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported},
};

use super::attach::TcMode;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `uname -r`.
    pub kernel: String,
    /// `bpf_skb_adjust_room` takes the flags of our udp encapsulation (5.2).
    pub encap_udp: bool,
    /// ... and of vxlan's, with its inner Ethernet header (ENCAP_L2_ETH, 5.13).
    pub encap_vxlan: bool,
    /// ... DECAP_L3_IPV4 (6.3), used by TC decapsulation where taken.
    pub decap_l3_ipv4: bool,
    /// ... DECAP_L4_UDP (after 6.18), which clears the tunnel offload marking.
    pub decap_l4_udp: bool,
    pub redirect_neigh: bool,
    pub redirect_peer: bool,
    pub fib_lookup: bool,
    /// BPF maps count against RLIMIT_MEMLOCK (before 5.11) rather than the memory cgroup.
    pub memlock_charged: bool,
    /// How the TC programs went on; None until attached (or adopted without knowing).
    pub tc_attach: Option<TcMode>,
    /// Native (driver) XDP on the underlay: Some(false) when it was refused; None when not
    /// tried (TC decap, generic asked for, or an adopted link).
    pub native_xdp: Option<bool>,
}

impl Capabilities {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kernel": self.kernel,
            "tc_attach": self.tc_attach.map(TcMode::attach_name),
            "native_xdp": self.native_xdp,
            "adjust_room": {
                "encap_udp": self.encap_udp,
                "encap_vxlan": self.encap_vxlan,
                "decap_l3_ipv4": self.decap_l3_ipv4,
                "decap_l4_udp": self.decap_l4_udp,
            },
            "helpers": {
                "redirect_neigh": self.redirect_neigh,
                "redirect_peer": self.redirect_peer,
                "fib_lookup": self.fib_lookup,
            },
            "memlock_charged": self.memlock_charged,
        })
    }
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether a TC program may call `helper`; a probe that cannot run counts as no.
pub fn tc_helper(helper: BpfHelper) -> bool {
    is_helper_supported(ProgramType::SchedClassifier, helper).unwrap_or(false)
}

/// Whether this kernel charges BPF memory to RLIMIT_MEMLOCK. 5.11 moved it to the memory
/// cgroup and added `bpf_ktime_get_coarse_ns` alongside, which libbpf takes as the sign (a
/// distribution that backports one backports both). A probe that cannot run counts as charged.
pub fn memlock_charged() -> bool {
    static CHARGED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHARGED.get_or_init(|| {
        !matches!(
            is_helper_supported(ProgramType::SocketFilter, BpfHelper::BPF_FUNC_ktime_get_coarse_ns),
            Ok(true)
        )
    })
}
