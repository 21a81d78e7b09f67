//! flannel's udp backend design as an agent backend: the [`TunUdp`] forwarder, started once
//! the subnet is known. Fallback when eBPF cannot load, and the benchmarks' baseline.
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use overlay_common::{Counter, CounterIndex};

use super::{
    Backend, BackendError, Peer,
    tun_udp::{TunUdp, TunUdpSpec},
};
use crate::{
    backend::ebpf::Format,
    host::{Counters, netdev},
    subnet::{LeaseAttrs, LeaseBackend, SubnetKey},
};

/// flannel's name for its udp backend's TUN device.
pub const DEVICE: &str = "flannel0";

pub struct UserspaceUdp {
    public_ip: Ipv4Addr,
    bind_ip: Ipv4Addr,
    port: u16,
    mtu: u32,
    forwarder: Option<TunUdp>,
}

impl UserspaceUdp {
    /// `bind_ip` is the underlay interface's address (the socket's source), `public_ip` what
    /// our lease publishes.
    pub fn new(underlay: &str, public_ip: Ipv4Addr, bind_ip: Ipv4Addr, port: u16) -> Result<Self, BackendError> {
        let link = netdev::link_info(underlay)?;
        let mtu = link.mtu.saturating_sub(Format::Udp.overhead());
        Ok(UserspaceUdp {
            public_ip,
            bind_ip,
            port,
            mtu,
            forwarder: None,
        })
    }

    fn forwarder(&self) -> Result<&TunUdp, BackendError> {
        self.forwarder.as_ref().ok_or(BackendError::NotActive)
    }
}

impl Backend for UserspaceUdp {
    fn lease_attrs(&self) -> LeaseAttrs {
        LeaseAttrs::new(self.public_ip, LeaseBackend::Udp)
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    fn activate(&mut self, subnet: Ipv4Network, network: Ipv4Network) -> Result<(), BackendError> {
        if let Some(old) = self.forwarder.take() {
            old.stop().map_err(|e| BackendError::Other(e.to_string()))?;
        }
        let fwd = TunUdp::start(TunUdpSpec {
            device: DEVICE.into(),
            public_ip: self.bind_ip,
            port: self.port,
            subnet,
            network,
            mtu: self.mtu,
        })
        .map_err(|e| BackendError::Other(e.to_string()))?;
        self.forwarder = Some(fwd);
        Ok(())
    }

    /// The forwarder's socket is bound to the old address: the next activation starts it
    /// anew on this one.
    fn set_public_ip(&mut self, public_ip: Ipv4Addr) -> Result<(), BackendError> {
        self.public_ip = public_ip;
        self.bind_ip = public_ip;
        Ok(())
    }

    fn set_peer(&mut self, peer: &Peer) -> Result<(), BackendError> {
        self.forwarder()?.upsert_peer(peer.subnet, peer.public_ip);
        Ok(())
    }

    fn remove_peer(&mut self, key: SubnetKey) -> Result<(), BackendError> {
        let subnet = key.ipv4;
        self.forwarder()?.remove_peer(subnet);
        Ok(())
    }

    fn peers(&self) -> Vec<SubnetKey> {
        // flannel's udp carries no IPv6: keys are IPv4 only.
        self.forwarder
            .as_ref()
            .map(|f| f.peers().into_iter().map(|(s, _)| SubnetKey::new(s, None)).collect())
            .unwrap_or_default()
    }

    fn counters(&mut self) -> Option<Counters> {
        let c = self.forwarder.as_ref()?.counters();
        let mut out = vec![Counter::default(); CounterIndex::COUNT as usize];
        let mut set = |i: CounterIndex, packets: u64, bytes: u64| out[i as usize] = Counter { packets, bytes };
        set(CounterIndex::EncapUdp, c.sent_packets, c.sent_bytes);
        set(CounterIndex::DecapUdp, c.received_packets, c.received_bytes);
        set(CounterIndex::DropNoPeer, c.drop_no_peer, 0);
        set(CounterIndex::DropNotIpv4, c.drop_not_ipv4, 0);
        set(
            CounterIndex::DropMalformed,
            c.drop_truncated + c.drop_malformed + c.drop_ttl_expired,
            0,
        );
        set(CounterIndex::DropUnknownPeer, c.drop_unknown_sender, 0);
        set(CounterIndex::DropSpoofedSource, c.drop_spoofed_source, 0);
        set(CounterIndex::DropNotOurSubnet, c.drop_not_our_subnet, 0);
        set(
            CounterIndex::DropNoRoute,
            c.drop_send_failed + c.drop_tun_write_failed,
            0,
        );
        Some(Counters(out))
    }

    fn describe(&self) -> String {
        format!("userspace-udp (TUN {DEVICE}, port {})", self.port)
    }
}
