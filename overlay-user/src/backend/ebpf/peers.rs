//! The peer table: each remote subnet in an LPM trie (egress: where to send) and each PublicIP
//! in a hash map (ingress: which subnet that host may send from). [`Datapath`] keeps what it
//! wrote, so an unchanged peer costs nothing and a moved one is rewritten whole.
use std::{collections::HashMap, net::Ipv4Addr};

use aya::maps::{HashMap as BpfHashMap, LpmTrie, lpm_trie::Key};
use ipnetwork::Ipv4Network;
use overlay_common::{MAP_PEERS, MAP_PEERS_BY_IP, Peer as PeerValue, PeerSubnet};

use super::{
    Datapath, backend_kind,
    programs::{DatapathError, Programs, not_found, typed_map},
};
use crate::{backend::Peer, host::MacAddr};

impl Programs {
    /// Insert or replace the entries for one peer.
    pub fn upsert_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        let value = PeerValue {
            public_ip: peer.public_ip.octets(),
            vtep_mac: peer.vtep_mac.unwrap_or_default().0,
            _pad: [0; 2],
        };
        let by_ip = PeerSubnet {
            addr: peer.subnet.network().octets(),
            prefix_len: peer.subnet.prefix(),
            _pad: [0; 3],
        };
        let mut peers: LpmTrie<_, [u8; 4], PeerValue> = typed_map(&mut self.ebpf, MAP_PEERS)?;
        peers
            .insert(&subnet_key(peer.subnet), value, 0)
            .map_err(|source| DatapathError::Map {
                name: MAP_PEERS,
                source,
            })?;
        let mut ips: BpfHashMap<_, [u8; 4], PeerSubnet> = typed_map(&mut self.ebpf, MAP_PEERS_BY_IP)?;
        ips.insert(peer.public_ip.octets(), by_ip, 0)
            .map_err(|source| DatapathError::Map {
                name: MAP_PEERS_BY_IP,
                source,
            })
    }

    /// Remove one peer's entries; absent entries are not an error. The PublicIP's entry goes
    /// only if it still names this subnet: a host that leased a new subnet keeps its PublicIP,
    /// and its old lease may expire after the new one is in.
    pub fn remove_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        let mut peers: LpmTrie<_, [u8; 4], PeerValue> = typed_map(&mut self.ebpf, MAP_PEERS)?;
        match peers.remove(&subnet_key(peer.subnet)) {
            Err(source) if !not_found(&source) => {
                return Err(DatapathError::Map {
                    name: MAP_PEERS,
                    source,
                });
            }
            _ => {}
        }
        let mut ips: BpfHashMap<_, [u8; 4], PeerSubnet> = typed_map(&mut self.ebpf, MAP_PEERS_BY_IP)?;
        let key = peer.public_ip.octets();
        match ips.get(&key, 0) {
            Ok(s) if s.addr == peer.subnet.network().octets() && s.prefix_len == peer.subnet.prefix() => {}
            Err(source) if !not_found(&source) => {
                return Err(DatapathError::Map {
                    name: MAP_PEERS_BY_IP,
                    source,
                });
            }
            _ => return Ok(()),
        }
        match ips.remove(&key) {
            Err(source) if !not_found(&source) => Err(DatapathError::Map {
                name: MAP_PEERS_BY_IP,
                source,
            }),
            _ => Ok(()),
        }
    }

    /// The peers currently in the maps (non-empty when adopting a pinned datapath).
    pub fn read_peers(&mut self) -> Result<HashMap<Ipv4Network, Peer>, DatapathError> {
        let peers: LpmTrie<_, [u8; 4], PeerValue> = typed_map(&mut self.ebpf, MAP_PEERS)?;
        let mut out = HashMap::new();
        for item in peers.iter() {
            let (key, peer) = item.map_err(|source| DatapathError::Map {
                name: MAP_PEERS,
                source,
            })?;
            let Ok(subnet) = Ipv4Network::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8) else {
                continue;
            };
            let mac = MacAddr(peer.vtep_mac);
            out.insert(
                subnet,
                Peer {
                    subnet,
                    public_ip: Ipv4Addr::from(peer.public_ip),
                    vtep_mac: (mac != MacAddr::default()).then_some(mac),
                    ipv6: None,
                },
            );
        }
        Ok(out)
    }
}

fn subnet_key(subnet: Ipv4Network) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix()), subnet.network().octets())
}

impl Datapath {
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// Add or replace a peer: one usable by our format ([`Peer::check`]), inside the network and
    /// not ourselves.
    pub fn upsert_peer(&mut self, peer: Peer) -> Result<(), DatapathError> {
        peer.check(backend_kind(self.spec.format))
            .map_err(|reason| DatapathError::Peer {
                subnet: peer.subnet,
                reason,
            })?;
        let Some(ours) = self.ipv4 else {
            return Err(DatapathError::Peer {
                subnet: peer.subnet,
                reason: "an IPv4 peer in an IPv6-only network".into(),
            });
        };
        if peer.subnet == ours.subnet {
            return Err(DatapathError::Peer {
                subnet: peer.subnet,
                reason: "is our own subnet".into(),
            });
        }
        if !ours.network.contains(peer.subnet.network()) {
            return Err(DatapathError::Peer {
                subnet: peer.subnet,
                reason: format!("is outside the overlay network {}", ours.network),
            });
        }
        if let Some(old) = self.peers.get(&peer.subnet).copied() {
            if old == peer {
                return Ok(());
            }
            // The PublicIP may have changed: drop the old reverse entry first.
            self.programs.remove_peer(&old)?;
            self.peers.remove(&peer.subnet);
            self.restore_public_ip(old.public_ip)?;
        }
        self.programs.upsert_peer(&peer)?;
        self.peers.insert(peer.subnet, peer);
        tracing::debug!(subnet = %peer.subnet, public_ip = %peer.public_ip, vtep_mac = ?peer.vtep_mac, "peer set");
        Ok(())
    }

    pub fn remove_peer(&mut self, subnet: Ipv4Network) -> Result<(), DatapathError> {
        if let Some(old) = self.peers.get(&subnet).copied() {
            self.programs.remove_peer(&old)?;
            self.peers.remove(&subnet);
            tracing::debug!(%subnet, public_ip = %old.public_ip, "peer removed");
            self.restore_public_ip(old.public_ip)?;
        }
        Ok(())
    }

    /// After a peer's entries for `ip` went: another lease of the same host (same PublicIP)
    /// takes the ingress entry back.
    fn restore_public_ip(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        match self.peers.values().find(|p| p.public_ip == ip).copied() {
            Some(other) => self.programs.upsert_peer(&other),
            None => Ok(()),
        }
    }
}
