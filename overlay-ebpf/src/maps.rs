//! The maps, declared once; their names and layouts come from overlay-common.
use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, PerCpuArray},
};
use overlay_common::{
    Counter, CounterIndex, DatapathConfig, DatapathConfig6, HostRoutingConfig, LocalEndpoint, MAX_BRIDGE_PORTS,
    MAX_PEERS, Peer, Peer6, PeerSubnet, PeerSubnet6,
};

// Names must equal overlay_common::MAP_*; the loader fails loudly if they do not.
#[map(name = "OVL_PEERS_V1")]
pub static PEERS: LpmTrie<[u8; 4], Peer> = LpmTrie::with_max_entries(MAX_PEERS, 0);

#[map(name = "OVL_PEERS_BY_IP_V1")]
pub static PEERS_BY_IP: HashMap<[u8; 4], PeerSubnet> = HashMap::with_max_entries(MAX_PEERS, 0);

#[map(name = "OVL_CONFIG_V1")]
pub static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[map(name = "OVL_PEERS6_V1")]
pub static PEERS6: LpmTrie<[u8; 16], Peer6> = LpmTrie::with_max_entries(MAX_PEERS, 0);

#[map(name = "OVL_PEERS6_BY_IP_V1")]
pub static PEERS6_BY_IP: HashMap<[u8; 16], PeerSubnet6> = HashMap::with_max_entries(MAX_PEERS, 0);

#[map(name = "OVL_CONFIG6_V1")]
pub static CONFIG6: Array<DatapathConfig6> = Array::with_max_entries(1, 0);

/// The IPv6 encapsulation's working space (not pinned, not shared with user space).
#[map(name = "OVL_SCRATCH6")]
pub static SCRATCH6: PerCpuArray<crate::ipv6::Scratch6> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "OVL_COUNTERS_V4")]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(CounterIndex::COUNT, 0);

#[map(name = "OVL_BRIDGE_FDB_V1")]
pub static BRIDGE_FDB: HashMap<[u8; 6], u32> = HashMap::with_max_entries(MAX_BRIDGE_PORTS, 0);

#[map(name = "OVL_BRIDGE_PORTS_V1")]
pub static BRIDGE_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_BRIDGE_PORTS, 0);

#[map(name = "OVL_LOCAL_ENDPOINTS_V1")]
pub static LOCAL_ENDPOINTS: HashMap<[u8; 4], LocalEndpoint> = HashMap::with_max_entries(MAX_BRIDGE_PORTS, 0);

#[map(name = "OVL_HOST_ROUTING_V1")]
pub static HOST_ROUTING: Array<HostRoutingConfig> = Array::with_max_entries(1, 0);
