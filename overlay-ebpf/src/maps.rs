//! The maps, declared once; their names and layouts come from overlay-common.
use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, PerCpuArray},
};
use overlay_common::{
    Counter, CounterIndex, DatapathConfig, HostRoutingConfig, LocalEndpoint, MAX_BRIDGE_PORTS, MAX_PEERS, Peer,
    PeerSubnet,
};

// Names must equal overlay_common::MAP_*; the loader fails loudly if they do not.
#[map(name = "OVL_PEERS_V1")]
pub static PEERS: LpmTrie<[u8; 4], Peer> = LpmTrie::with_max_entries(MAX_PEERS, 0);

#[map(name = "OVL_PEERS_BY_IP_V1")]
pub static PEERS_BY_IP: HashMap<[u8; 4], PeerSubnet> = HashMap::with_max_entries(MAX_PEERS, 0);

#[map(name = "OVL_CONFIG_V1")]
pub static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[map(name = "OVL_COUNTERS_V3")]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(CounterIndex::COUNT, 0);

#[map(name = "OVL_BRIDGE_FDB_V1")]
pub static BRIDGE_FDB: HashMap<[u8; 6], u32> = HashMap::with_max_entries(MAX_BRIDGE_PORTS, 0);

#[map(name = "OVL_BRIDGE_PORTS_V1")]
pub static BRIDGE_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_BRIDGE_PORTS, 0);

#[map(name = "OVL_LOCAL_ENDPOINTS_V1")]
pub static LOCAL_ENDPOINTS: HashMap<[u8; 4], LocalEndpoint> = HashMap::with_max_entries(MAX_BRIDGE_PORTS, 0);

#[map(name = "OVL_HOST_ROUTING_V1")]
pub static HOST_ROUTING: Array<HostRoutingConfig> = Array::with_max_entries(1, 0);
