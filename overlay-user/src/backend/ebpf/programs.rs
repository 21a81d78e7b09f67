//! The eBPF object: programs loaded into the kernel (verified, not attached) and typed access
//! to their maps. Packet tests run these programs through BPF_PROG_TEST_RUN.
use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapError, PerCpuArray},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
    sys::BpfHelper,
};
use ipnetwork::Ipv4Network;
use overlay_common::{
    Counter, CounterIndex, DatapathConfig, Format, MAP_CONFIG, MAP_CONFIG6, MAP_COUNTERS, MAP_PEERS, MAP_PEERS_BY_IP,
    MAP_PEERS6, MAP_PEERS6_BY_IP, PROG_BRIDGE_OUT, PROG_DECAP, PROG_DECAP_TC, PROG_ENCAP, PROG_FROM_CONTAINER,
    PROG_PROBE_ADJUST_ROOM, PROG_TO_CONTAINER, adjust_room,
};

use super::capabilities::{self, Capabilities};
use crate::host::{Counters, HostError, netdev};

/// Before 5.11 the kernel charges BPF maps to RLIMIT_MEMLOCK, 64 KiB by default there (Debian
/// 11's systemd keeps it): our maps need more. Later kernels charge the memory cgroup and
/// ignore the limit: there it is left alone, and nothing is said.
fn lift_memlock_limit() {
    if !capabilities::memlock_charged() {
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return;
    }
    let error = std::io::Error::last_os_error();
    // Without the right to raise the hard limit, the soft one can still go up to it.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or fill the struct we pass and nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit);
        }
    }
    tracing::warn!(
        limit_bytes = limit.rlim_cur,
        "this kernel charges BPF maps to RLIMIT_MEMLOCK and raising it failed ({error}): loading may \
         fail with EPERM; raise the limit (LimitMEMLOCK=infinity in the unit)"
    );
}

/// The compiled programs, embedded at build time (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed (are you root, is BPF enabled?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("BPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("peer {subnet}: {reason}")]
    Peer { subnet: Ipv4Network, reason: String },
    #[error("{0}")]
    Config(String),
}

/// The eBPF object loaded into the kernel, programs verified, nothing attached.
pub struct Programs {
    pub(super) ebpf: Ebpf,
    /// Why the host-routing programs did not load here (a kernel without bpf_redirect_peer).
    pub(super) host_routing_refused: Option<String>,
}

impl Programs {
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_pinned(None)
    }

    /// Load with the maps pinned in `pin_dir` (on a bpffs, mounted there if none is): maps
    /// already pinned there by a previous run are reused with their contents, missing ones are
    /// created and pinned.
    pub fn load_pinned(pin_dir: Option<&Path>) -> Result<Self, DatapathError> {
        lift_memlock_limit();
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            netdev::ensure_bpffs(dir)?;
            for name in [
                MAP_PEERS, MAP_PEERS_BY_IP, MAP_CONFIG, MAP_COUNTERS, MAP_PEERS6, MAP_PEERS6_BY_IP, MAP_CONFIG6,
            ] {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(OBJECT)?;
        let encap: &mut SchedClassifier = program(&mut ebpf, PROG_ENCAP)?;
        encap.load().map_err(|source| DatapathError::Program {
            name: PROG_ENCAP,
            source,
        })?;
        let decap: &mut Xdp = program(&mut ebpf, PROG_DECAP)?;
        decap.load().map_err(|source| DatapathError::Program {
            name: PROG_DECAP,
            source,
        })?;
        let decap_tc: &mut SchedClassifier = program(&mut ebpf, PROG_DECAP_TC)?;
        decap_tc.load().map_err(|source| DatapathError::Program {
            name: PROG_DECAP_TC,
            source,
        })?;
        // The bridge program only speeds things up: if this kernel refuses it, the datapath
        // runs without it (sync_bridge reports that it cannot attach).
        let bridge_out: &mut SchedClassifier = program(&mut ebpf, PROG_BRIDGE_OUT)?;
        if let Err(e) = bridge_out.load() {
            tracing::warn!(
                "eBPF program {PROG_BRIDGE_OUT} does not load; the container bridge keeps its own path: {e}"
            );
        }
        // Host routing is optional too: without it, every packet takes the stack's path.
        let mut host_routing_refused = None;
        for name in [PROG_FROM_CONTAINER, PROG_TO_CONTAINER] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            if let Err(e) = prog.load() {
                host_routing_refused.get_or_insert(format!("eBPF program {name} does not load: {e}"));
            }
        }
        Ok(Self {
            ebpf,
            host_routing_refused,
        })
    }

    pub fn encap_program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, PROG_ENCAP)
    }

    /// The XDP decapsulation program.
    pub fn decap_program(&mut self) -> Result<&mut Xdp, DatapathError> {
        program(&mut self.ebpf, PROG_DECAP)
    }

    /// The TC-ingress decapsulation program: the same checks and counters as the XDP one.
    pub fn decap_tc_program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, PROG_DECAP_TC)
    }

    /// What this kernel offers the datapath, asked once: which `bpf_skb_adjust_room` flag sets
    /// of ours it takes (the probe program on made-up packets), which helpers TC programs may
    /// call, whether maps count against RLIMIT_MEMLOCK. Err: the probe itself could not run.
    pub fn probe_capabilities(&mut self) -> Result<Capabilities, DatapathError> {
        let name = PROG_PROBE_ADJUST_ROOM;
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        prog.load().map_err(|source| DatapathError::Program { name, source })?;
        // Ethernet, IPv4 header of a UDP packet, its UDP header, then the probe's arguments.
        let mut frame = vec![0u8; 14 + 20 + 8 + 100];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14..24].copy_from_slice(&[0x45, 0, 0, 128, 0, 0, 0x40, 0, 64, 17]);
        frame[26..34].copy_from_slice(&[10, 244, 1, 2, 10, 244, 2, 2]);
        frame[36..38].copy_from_slice(&[0, 108]);
        let mut takes = |len_diff: i32, flags: u64| -> Result<bool, DatapathError> {
            let o = adjust_room::PROBE_LEN_OFFSET;
            frame[o..o + 4].copy_from_slice(&len_diff.to_ne_bytes());
            let o = adjust_room::PROBE_FLAGS_OFFSET;
            frame[o..o + 8].copy_from_slice(&flags.to_ne_bytes());
            let mut out = vec![0u8; frame.len() + 128];
            let result = prog
                .test_run(TestRunOptions {
                    data_in: Some(&frame),
                    data_out: Some(&mut out),
                    ..Default::default()
                })
                .map_err(|source| DatapathError::Program { name, source })?;
            Ok(result.return_value == 0)
        };
        // Decapsulation cuts outer IPv4 + UDP + VXLAN + inner Ethernet, as for vxlan.
        let cut = -(Format::Vxlan.overhead() as i32);
        let caps = Capabilities {
            kernel: capabilities::kernel_release(),
            encap_udp: takes(Format::Udp.overhead() as i32, adjust_room::encap_flags(Format::Udp))?,
            encap_vxlan: takes(Format::Vxlan.overhead() as i32, adjust_room::encap_flags(Format::Vxlan))?,
            decap_l3_ipv4: takes(cut, adjust_room::FIXED_GSO | adjust_room::DECAP_L3_IPV4)?,
            decap_l4_udp: takes(
                cut,
                adjust_room::FIXED_GSO | adjust_room::DECAP_L3_IPV4 | adjust_room::DECAP_L4_UDP,
            )?,
            redirect_neigh: capabilities::tc_helper(BpfHelper::BPF_FUNC_redirect_neigh),
            redirect_peer: capabilities::tc_helper(BpfHelper::BPF_FUNC_redirect_peer),
            fib_lookup: capabilities::tc_helper(BpfHelper::BPF_FUNC_fib_lookup),
            memlock_charged: capabilities::memlock_charged(),
            tc_attach: None,
            native_xdp: None,
        };
        let _ = prog.unload();
        Ok(caps)
    }

    /// Why the host-routing programs did not load, if they did not.
    pub fn host_routing_refused(&self) -> Option<&str> {
        self.host_routing_refused.as_deref()
    }

    /// One of our TC programs by name (encap, TC decap, bridge, host routing).
    pub fn tc_program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, name)
    }

    /// The container bridge's egress program: frames for a container straight to its port.
    pub fn bridge_program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, PROG_BRIDGE_OUT)
    }

    /// What the config map holds now.
    pub fn config(&mut self) -> Result<DatapathConfig, DatapathError> {
        let map: Array<_, DatapathConfig> = typed_map(&mut self.ebpf, MAP_CONFIG)?;
        map.get(&0, 0).map_err(|source| DatapathError::Map {
            name: MAP_CONFIG,
            source,
        })
    }

    pub fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        let mut map: Array<_, DatapathConfig> = typed_map(&mut self.ebpf, MAP_CONFIG)?;
        map.set(0, cfg, 0).map_err(|source| DatapathError::Map {
            name: MAP_CONFIG,
            source,
        })
    }

    pub fn counters(&mut self) -> Result<Counters, DatapathError> {
        let map: PerCpuArray<_, Counter> = typed_map(&mut self.ebpf, MAP_COUNTERS)?;
        let mut out = Vec::with_capacity(CounterIndex::COUNT as usize);
        for i in 0..CounterIndex::COUNT {
            let per_cpu = map.get(&i, 0).map_err(|source| DatapathError::Map {
                name: MAP_COUNTERS,
                source,
            })?;
            out.push(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            }));
        }
        Ok(Counters(out))
    }
}

/// A delete found no entry: aya reports that as the syscall's ENOENT, not as KeyNotFound.
pub(super) fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: ProgramError::NotLoaded,
    })?;
    p.try_into().map_err(|source| DatapathError::Program { name, source })
}

pub(super) fn typed_map<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}
