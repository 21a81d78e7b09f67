//! The container bridge (docker0, cni0) as the datapath sees it: which bridge holds an address
//! in our subnet (docker's `--bip`, the CNI gateway), and its forwarding database (container
//! MAC -> port), mirrored into BPF maps so `overlay_bridge_out` can hand frames straight to a
//! port.
//!
//! Both are read over rtnetlink, which answers for the caller's network namespace (sysfs may
//! show another one), and are cheap enough to poll once a second.
use std::{
    collections::{HashMap, HashSet},
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use ipnetwork::IpNetwork;

use aya::{
    maps::{DevMapHash, HashMap as BpfHashMap, MapError},
    programs::{TcAttachType, tc::SchedClassifierLinkId},
};
use overlay_common::{MAP_BRIDGE_FDB, MAP_BRIDGE_PORTS, PROG_BRIDGE_OUT};

use super::{
    Datapath, DecapHook,
    attach::{attach_tc_probing, remove_clsact_if_ours},
    programs::{DatapathError, Programs, not_found, typed_map},
};
use crate::host::{MacAddr, netdev};

/// A bridge found to hold an address in our subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeDevice {
    pub name: String,
    pub ifindex: u32,
}

/// Remembers which interfaces were checked for being a usable bridge, so the per-tick search
/// runs `ip` only when an interface it has not seen appears. Only answers are kept: a failed
/// check is asked again next time.
#[derive(Default)]
pub struct BridgeFinder {
    kinds: HashMap<(String, u32), bool>,
}

/// Some(true) for a bridge we can work with: one without VLAN filtering, where a MAC names one
/// port (with filtering, the same MAC may sit on different ports per VLAN, and ports untag;
/// the bridge's own forwarding must decide). None if `ip` could not tell.
fn usable_bridge(name: &str) -> Option<bool> {
    let link = netdev::link_info(name).ok()?;
    if link.kind.as_deref() != Some("bridge") {
        return Some(false);
    }
    if link.vlan_filtering {
        tracing::warn!(
            bridge = name,
            "the container bridge filters VLANs: frames for containers take the bridge's own path"
        );
    }
    Some(!link.vlan_filtering)
}

impl BridgeFinder {
    /// The bridge with an address inside `subnet` (docker's `--bip` or `--fixed-cidr-v6`, the
    /// CNI bridge plugin's gateway), ignoring `exclude` (our overlay device holds the subnet's
    /// network address). None until docker or the CNI plugin has made it.
    pub fn find(&mut self, subnet: IpNetwork, exclude: &str) -> Option<BridgeDevice> {
        let addrs = nix::ifaddrs::getifaddrs().ok()?;
        let mut candidates: Vec<String> = addrs
            .filter(|a| a.interface_name != exclude)
            .filter(|a| {
                let Some(addr) = a.address.as_ref() else {
                    return false;
                };
                match subnet {
                    IpNetwork::V4(n) => addr.as_sockaddr_in().is_some_and(|sin| n.contains(sin.ip())),
                    IpNetwork::V6(n) => addr.as_sockaddr_in6().is_some_and(|sin| n.contains(sin.ip())),
                }
            })
            .map(|a| a.interface_name)
            .collect();
        candidates.sort();
        candidates.dedup();
        for name in candidates {
            let Ok(ifindex) = nix::net::if_::if_nametoindex(name.as_str()) else {
                continue;
            };
            let key = (name.clone(), ifindex);
            let usable = match self.kinds.get(&key) {
                Some(&known) => known,
                None => {
                    let answer = usable_bridge(&name);
                    if let Some(a) = answer {
                        self.kinds.insert(key, a);
                    }
                    answer.unwrap_or(false)
                }
            };
            if usable {
                return Some(BridgeDevice { name, ifindex });
            }
        }
        None
    }
}

/// The bridge's learned and static entries: container MAC -> port ifindex. Local entries (the
/// bridge's and its ports' own addresses: frames for this host) are left out.
pub fn fdb(bridge_ifindex: u32) -> io::Result<HashMap<MacAddr, u32>> {
    let mut out = HashMap::new();
    // family AF_BRIDGE: the kernel dumps every bridge's FDB (and each device's own
    // addresses); we keep the entries whose NDA_MASTER is our bridge.
    dump_neighbours(libc::AF_BRIDGE as u8, |body| {
        if let Some((mac, port)) = parse_fdb_entry(body, bridge_ifindex) {
            out.insert(mac, port);
        }
    })?;
    Ok(out)
}

/// The bridge device's IPv4 neighbours with a usable MAC: container address -> MAC.
pub fn neighbours(bridge_ifindex: u32) -> io::Result<HashMap<Ipv4Addr, MacAddr>> {
    let mut out = HashMap::new();
    dump_neighbours(libc::AF_INET as u8, |body| {
        if let Some((ip, mac)) = parse_neighbour(body, bridge_ifindex) {
            out.insert(ip, mac);
        }
    })?;
    Ok(out)
}

/// Dump the neighbour table of `family` over rtnetlink, each RTM_NEWNEIGH body (ndmsg and
/// attributes) to `each`. An interrupted or failed dump is an error, never a short table.
fn dump_neighbours(family: u8, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let sock = netlink_socket()?;
    // A dump that stalls must not hold the agent's loop: give up, the next tick asks again.
    let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
    // SAFETY: setting a plain option on a socket we own, from a value that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut req = [0u8; NLMSG_HDR + NDMSG_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDR + NDMSG_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETNEIGH.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDR] = family;
    // SAFETY: sending a byte buffer we own on a socket we own.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own, at most its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(msgs[4..6].try_into().expect("2 bytes"));
            let flags = u16::from_ne_bytes(msgs[6..8].try_into().expect("2 bytes"));
            if len < NLMSG_HDR || len > msgs.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
            }
            if flags & NLM_F_DUMP_INTR != 0 {
                // The table changed under the dump, which may have missed entries: next tick.
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the table changed during the dump",
                ));
            }
            // DONE and ERROR carry an errno (0: fine): a failed dump must not pass for a short one.
            let code = msgs
                .get(NLMSG_HDR..NLMSG_HDR + 4)
                .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                .unwrap_or(0);
            match kind {
                NLMSG_DONE | NLMSG_ERROR if code < 0 => return Err(io::Error::from_raw_os_error(-code)),
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {}
                RTM_NEWNEIGH => each(&msgs[NLMSG_HDR..len]),
                _ => {}
            }
            msgs = &msgs[align4(len).min(msgs.len())..];
        }
    }
}

/// One AF_INET RTM_NEWNEIGH body: Some((address, MAC)) for an entry on `ifindex` whose MAC is
/// known and believed (not one being resolved or failed).
fn parse_neighbour(body: &[u8], ifindex: u32) -> Option<(Ipv4Addr, MacAddr)> {
    if body.len() < NDMSG_LEN || body[0] != libc::AF_INET as u8 {
        return None;
    }
    let dev = i32::from_ne_bytes(body[4..8].try_into().ok()?) as u32;
    let state = u16::from_ne_bytes(body[8..10].try_into().ok()?);
    let usable = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT;
    if dev != ifindex || state & usable == 0 {
        return None;
    }
    let (mut ip, mut mac) = (None, None);
    for (kind, value) in attributes(&body[NDMSG_LEN..]) {
        match kind {
            NDA_DST if value.len() == 4 => ip = Some(Ipv4Addr::from(<[u8; 4]>::try_from(value).ok()?)),
            NDA_LLADDR if value.len() == 6 => mac = Some(MacAddr(value.try_into().ok()?)),
            _ => {}
        }
    }
    let mac = mac?;
    (mac.0[0] & 1 == 0 && mac != MacAddr::default()).then_some((ip?, mac))
}

/// One RTM_NEWNEIGH body (ndmsg + attributes): Some((MAC, port)) for a forwarding entry of
/// `bridge_ifindex` that points at a port.
fn parse_fdb_entry(body: &[u8], bridge_ifindex: u32) -> Option<(MacAddr, u32)> {
    if body.len() < NDMSG_LEN || body[0] != libc::AF_BRIDGE as u8 {
        return None;
    }
    let port = i32::from_ne_bytes(body[4..8].try_into().ok()?) as u32;
    let state = u16::from_ne_bytes(body[8..10].try_into().ok()?);
    if state & NUD_PERMANENT != 0 || port == bridge_ifindex || port == 0 {
        return None;
    }
    let (mut mac, mut master) = (None, None);
    for (kind, value) in attributes(&body[NDMSG_LEN..]) {
        match kind {
            NDA_LLADDR if value.len() == 6 => mac = Some(MacAddr(value.try_into().ok()?)),
            NDA_MASTER if value.len() == 4 => master = Some(u32::from_ne_bytes(value.try_into().ok()?)),
            _ => {}
        }
    }
    let mac = mac?;
    // Multicast entries (mdb) are not forwarding entries of one port.
    (master == Some(bridge_ifindex) && mac.0[0] & 1 == 0).then_some((mac, port))
}

/// The netlink attributes (type, value) of a message body after its fixed header; stops at the
/// first malformed one.
fn attributes(mut attrs: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if attrs.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        let value = &attrs[4..len];
        attrs = &attrs[align4(len).min(attrs.len())..];
        Some((kind, value))
    })
}

fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the BPF maps hold, kept to diff against the next FDB reading.
#[derive(Default)]
pub struct Mirror {
    pub fdb: HashMap<MacAddr, u32>,
    pub ports: HashSet<u32>,
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

const NLMSG_HDR: usize = 16;
const NDMSG_LEN: usize = size_of::<libc::c_int>() * 3;
// libc's netlink constants, in the widths the wire uses (libc gives several as c_int).
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
const RTM_NEWNEIGH: u16 = libc::RTM_NEWNEIGH;
const RTM_GETNEIGH: u16 = libc::RTM_GETNEIGH;
const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;
const NLM_F_DUMP_INTR: u16 = libc::NLM_F_DUMP_INTR as u16;
const NDA_LLADDR: u16 = libc::NDA_LLADDR;
const NDA_MASTER: u16 = libc::NDA_MASTER;
const NLA_TYPE_MASK: u16 = libc::NLA_TYPE_MASK as u16;
const NUD_PERMANENT: u16 = libc::NUD_PERMANENT;
const NUD_REACHABLE: u16 = libc::NUD_REACHABLE;
const NUD_STALE: u16 = libc::NUD_STALE;
const NUD_DELAY: u16 = libc::NUD_DELAY;
const NUD_PROBE: u16 = libc::NUD_PROBE;
const NDA_DST: u16 = libc::NDA_DST;

/// The container bridge our egress program is on, with what its maps hold.
pub(super) struct AttachedBridge {
    device: BridgeDevice,
    /// The bridge program, when bridge redirect is on (host routing follows the bridge without).
    link: Option<SchedClassifierLinkId>,
    /// We created the bridge's clsact qdisc for our filter (no TCX): removed with it.
    clsact_created: bool,
    mirror: Mirror,
}

impl Programs {
    /// Make the bridge maps hold `fdb` (MAC -> port ifindex); `mirror` is what they hold now
    /// and is updated as entries are written. A port that vanished meanwhile is skipped: the
    /// next reading of the FDB no longer has it.
    pub fn sync_bridge_fdb(&mut self, mirror: &mut Mirror, fdb: &HashMap<MacAddr, u32>) -> Result<(), DatapathError> {
        // Departed MACs go first, so a full table still takes the new ones. A MAC that cannot
        // be written is left out (its frames take the bridge) and the first failure reported
        // once the rest is done.
        let mut failed = None;
        let mut macs: BpfHashMap<_, [u8; 6], u32> = typed_map(&mut self.ebpf, MAP_BRIDGE_FDB)?;
        let gone: Vec<MacAddr> = mirror.fdb.keys().filter(|m| !fdb.contains_key(m)).copied().collect();
        for mac in gone {
            match macs.remove(&mac.0) {
                Err(source) if !not_found(&source) => {
                    return Err(DatapathError::Map {
                        name: MAP_BRIDGE_FDB,
                        source,
                    });
                }
                _ => {}
            }
            mirror.fdb.remove(&mac);
        }
        let wanted_ports: HashSet<u32> = fdb.values().copied().collect();
        let mut ports: DevMapHash<_> = typed_map(&mut self.ebpf, MAP_BRIDGE_PORTS)?;
        for &port in wanted_ports.difference(&mirror.ports.clone()) {
            match ports.insert(port, port, None, 0) {
                Ok(()) => {
                    mirror.ports.insert(port);
                }
                // The port's device went away since the FDB reading, which drops it next time
                // (the kernel says EINVAL for an ifindex with no device).
                Err(aya::maps::xdp::XdpMapError::MapError(MapError::SyscallError(e)))
                    if matches!(e.io_error.raw_os_error(), Some(libc::EINVAL | libc::ENODEV)) =>
                {
                    tracing::debug!(port, "bridge port gone before it was copied");
                }
                Err(e) => {
                    failed.get_or_insert(DatapathError::Config(format!(
                        "BPF map {MAP_BRIDGE_PORTS}: port ifindex {port}: {e}"
                    )));
                }
            }
        }
        for port in mirror.ports.clone().difference(&wanted_ports) {
            // The kernel removes a port whose device went away: not found is fine.
            match ports.remove(*port) {
                Err(source) if !not_found(&source) => {
                    return Err(DatapathError::Map {
                        name: MAP_BRIDGE_PORTS,
                        source,
                    });
                }
                _ => {}
            }
            mirror.ports.remove(port);
        }
        let mut macs: BpfHashMap<_, [u8; 6], u32> = typed_map(&mut self.ebpf, MAP_BRIDGE_FDB)?;
        for (mac, &port) in fdb {
            if mirror.fdb.get(mac) == Some(&port) {
                continue;
            }
            match macs.insert(mac.0, port, 0) {
                Ok(()) => {
                    mirror.fdb.insert(*mac, port);
                }
                Err(source) => {
                    failed.get_or_insert(DatapathError::Map {
                        name: MAP_BRIDGE_FDB,
                        source,
                    });
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

impl Datapath {
    /// Follow the container bridge: attach our egress program to the bridge that holds our
    /// subnet's gateway address (once docker or the CNI plugin has made it, again if it is
    /// recreated) and copy its forwarding database into the maps. Call it every second or so;
    /// until it has seen a new container, that container's packets take the bridge's own
    /// (slower) path. Failures are logged: the datapath works without this, only slower.
    ///
    /// The bridge program is needed with TC decapsulation only: after XDP decapsulation the
    /// kernel's GRO rebuilds plain TCP packets, which the bridge forwards with their offloads.
    /// Host routing needs the bridge followed with either hook (see `host_routing`).
    pub fn sync_bridge(&mut self) {
        let redirect = self.spec.bridge_redirect && self.decap_hook == DecapHook::Tc;
        let routing = self.host_routing.off.is_none();
        if !redirect && !routing {
            return;
        }
        // The bridge holds our IPv4 subnet's gateway; in an IPv6-only network, our IPv6 one's.
        let subnet = match (self.ipv4, &self.ipv6) {
            (Some(v4), _) => IpNetwork::V4(v4.subnet),
            (None, Some(v6)) => IpNetwork::V6(v6.subnet),
            (None, None) => return,
        };
        let found = self.bridges.find(subnet, &self.overlay.name);
        if self.bridge.as_ref().map(|b| &b.device) != found.as_ref() {
            self.detach_bridge();
            let Some(device) = found else { return };
            let mut clsact_created = false;
            let link = if redirect {
                // As the other hooks: TCX, or a filter under clsact before 6.6.
                match self.programs.bridge_program().and_then(|p| {
                    attach_tc_probing(p, &device.name, TcAttachType::Egress)
                        .map_err(|e| DatapathError::Config(format!("eBPF program {PROG_BRIDGE_OUT}: {e}")))
                }) {
                    Ok((link, mode, created)) => {
                        tracing::info!(
                            bridge = %device.name,
                            tc = mode.attach_name(),
                            "frames for containers go straight to their ports"
                        );
                        clsact_created = created;
                        Some(link)
                    }
                    Err(e) => {
                        self.warn_bridge(format!(
                            "cannot attach to the container bridge {} (packets take the bridge's own path): {e}",
                            device.name
                        ));
                        if !routing {
                            return;
                        }
                        None
                    }
                }
            } else {
                None
            };
            self.bridge_warning = None;
            self.bridge = Some(AttachedBridge {
                device,
                link,
                clsact_created,
                mirror: Mirror::default(),
            });
        }
        let Some(attached) = self.bridge.as_mut() else { return };
        let device = attached.device.clone();
        let name = &device.name;
        let result = match fdb(device.ifindex) {
            Ok(fdb) => self
                .programs
                .sync_bridge_fdb(&mut attached.mirror, &fdb)
                .map_err(|e| format!("copying the forwarding database of {name}: {e}"))
                .and_then(|()| self.sync_host_routing(&device, &fdb)),
            Err(e) => Err(format!("reading the forwarding database of {name}: {e}")),
        };
        match result {
            Ok(()) => self.bridge_warning = None,
            Err(why) => self.warn_bridge(why),
        }
    }

    /// Once per distinct trouble, not once a second: the next tick tries again anyway.
    fn warn_bridge(&mut self, why: String) {
        if self.bridge_warning.as_ref() != Some(&why) {
            tracing::warn!("{why}");
            self.bridge_warning = Some(why);
        }
    }

    pub(super) fn detach_bridge(&mut self) {
        self.stop_host_routing_ports();
        let Some(mut old) = self.bridge.take() else { return };
        // A bridge that was deleted took our link with it: nothing to detach then.
        if let Some(link) = old.link
            && let Ok(p) = self.programs.bridge_program()
            && let Err(e) = p.detach(link)
        {
            tracing::debug!(bridge = %old.device.name, "detaching from the bridge: {e}");
        }
        if old.clsact_created {
            remove_clsact_if_ours(&old.device.name);
        }
        if let Err(e) = self.programs.sync_bridge_fdb(&mut old.mirror, &HashMap::new()) {
            tracing::warn!("clearing the bridge maps: {e}");
        }
        tracing::info!(bridge = %old.device.name, "detached from the container bridge");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: i32, state: u16, mac: [u8; 6], master: Option<u32>) -> Vec<u8> {
        let mut b = vec![0u8; NDMSG_LEN];
        b[0] = libc::AF_BRIDGE as u8;
        b[4..8].copy_from_slice(&port.to_ne_bytes());
        b[8..10].copy_from_slice(&state.to_ne_bytes());
        b.extend_from_slice(&10u16.to_ne_bytes());
        b.extend_from_slice(&NDA_LLADDR.to_ne_bytes());
        b.extend_from_slice(&mac);
        b.extend_from_slice(&[0, 0]);
        if let Some(m) = master {
            b.extend_from_slice(&8u16.to_ne_bytes());
            b.extend_from_slice(&NDA_MASTER.to_ne_bytes());
            b.extend_from_slice(&m.to_ne_bytes());
        }
        b
    }

    #[test]
    fn keeps_learned_entries_of_our_bridge_only() {
        let mac = [0x02, 0x42, 0xac, 0x11, 0, 2];
        const REACHABLE: u16 = 0x02;
        assert_eq!(
            parse_fdb_entry(&entry(7, REACHABLE, mac, Some(3)), 3),
            Some((MacAddr(mac), 7))
        );
        // Another bridge's entry; a device's own address (no master); a local entry; an
        // entry pointing at the bridge itself; a multicast address; a truncated message.
        assert_eq!(parse_fdb_entry(&entry(7, REACHABLE, mac, Some(4)), 3), None);
        assert_eq!(parse_fdb_entry(&entry(7, REACHABLE, mac, None), 3), None);
        assert_eq!(parse_fdb_entry(&entry(7, NUD_PERMANENT, mac, Some(3)), 3), None);
        assert_eq!(parse_fdb_entry(&entry(3, REACHABLE, mac, Some(3)), 3), None);
        assert_eq!(
            parse_fdb_entry(&entry(7, REACHABLE, [0x01, 0, 0x5e, 0, 0, 1], Some(3)), 3),
            None
        );
        assert_eq!(parse_fdb_entry(&entry(7, REACHABLE, mac, Some(3))[..6], 3), None);
    }

    fn neighbour(dev: i32, state: u16, ip: [u8; 4], mac: [u8; 6]) -> Vec<u8> {
        let mut b = vec![0u8; NDMSG_LEN];
        b[0] = libc::AF_INET as u8;
        b[4..8].copy_from_slice(&dev.to_ne_bytes());
        b[8..10].copy_from_slice(&state.to_ne_bytes());
        b.extend_from_slice(&8u16.to_ne_bytes());
        b.extend_from_slice(&NDA_DST.to_ne_bytes());
        b.extend_from_slice(&ip);
        b.extend_from_slice(&10u16.to_ne_bytes());
        b.extend_from_slice(&NDA_LLADDR.to_ne_bytes());
        b.extend_from_slice(&mac);
        b.extend_from_slice(&[0, 0]);
        b
    }

    #[test]
    fn keeps_resolved_neighbours_of_our_bridge_only() {
        let (ip, mac) = ([10, 244, 1, 2], [0x02, 0x42, 0xac, 0x11, 0, 2]);
        assert_eq!(
            parse_neighbour(&neighbour(3, NUD_REACHABLE, ip, mac), 3),
            Some((Ipv4Addr::from(ip), MacAddr(mac)))
        );
        // Another device; an entry still being resolved; a multicast MAC; a cut attribute.
        assert_eq!(parse_neighbour(&neighbour(4, NUD_REACHABLE, ip, mac), 3), None);
        assert_eq!(parse_neighbour(&neighbour(3, 0x01, ip, mac), 3), None);
        assert_eq!(
            parse_neighbour(&neighbour(3, NUD_STALE, ip, [0x01, 0, 0x5e, 0, 0, 1]), 3),
            None
        );
        let whole = neighbour(3, NUD_REACHABLE, ip, mac);
        assert_eq!(parse_neighbour(&whole[..whole.len() - 4], 3), None);
    }
}
