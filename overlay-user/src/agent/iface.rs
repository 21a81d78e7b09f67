//! Which interface carries inter-host traffic, and its address, chosen as flanneld v0.28.9
//! chooses (main.go and pkg/ipmatch): each `--iface` (a name, or an address held by an
//! interface), then each `--iface-regex` (against addresses, then names), then
//! `--iface-can-reach` (the interface `ip route get` picks); with none of them, the interface
//! holding `--public-ip`, else the default route's interface.
use std::{
    fmt::{Debug, Display},
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use anyhow::{Context as _, bail};

use super::AgentArgs;
use crate::host::netdev;

/// The interface with the address it is reached at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen<A = Ipv4Addr> {
    pub name: String,
    /// The interface's own address (flannel's IfaceAddr).
    pub addr: A,
}

/// What an address family needs for the choice: v4 in dual stack and IPv4, v6 in IPv6-only.
pub trait Family: Copy + PartialEq + FromStr + Display + Debug {
    const NAME: &'static str;
}
impl Family for Ipv4Addr {
    const NAME: &'static str = "IPv4";
}
impl Family for Ipv6Addr {
    const NAME: &'static str = "IPv6";
}

/// Interfaces in kernel order with their usable IPv6 addresses, best first as flannel ranks
/// them (pkg/ip GetInterfaceIP6Addrs): global before link-local, permanent before dynamic,
/// stable before temporary; deprecated ones left out.
fn interfaces_v6() -> anyhow::Result<Vec<(String, Vec<Ipv6Addr>)>> {
    let out = netdev::ip(&["-j", "-6", "addr", "show"])?;
    let links: serde_json::Value = serde_json::from_str(&out).context("reading interface IPv6 addresses")?;
    let mut v = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let Some(name) = link["ifname"].as_str() else {
            continue;
        };
        v.push((name.to_string(), ranked_ipv6(&link["addr_info"])));
    }
    Ok(v)
}

/// The usable IPv6 addresses of one `ip -j addr` entry's `addr_info`, best first.
fn ranked_ipv6(addr_info: &serde_json::Value) -> Vec<Ipv6Addr> {
    let mut ranked: Vec<((bool, bool, bool), Ipv6Addr)> = addr_info
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["deprecated"] != true)
        .filter_map(|a| {
            let ip = a["local"].as_str()?.parse::<Ipv6Addr>().ok()?;
            let link_local = (ip.segments()[0] & 0xffc0) == 0xfe80;
            let usable = !ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast();
            usable.then_some(((link_local, a["dynamic"] == true, a["temporary"] == true), ip))
        })
        .collect();
    // Stable: equal ranks keep the kernel's order.
    ranked.sort_by_key(|(rank, _)| *rank);
    ranked.into_iter().map(|(_, ip)| ip).collect()
}

/// The address flannel takes for IPv6 on the chosen interface: `--public-ipv6`, else the
/// interface's best IPv6 address.
pub fn pick_ipv6(args: &AgentArgs, iface: &str) -> anyhow::Result<Ipv6Addr> {
    if let Some(ip) = args.public_ipv6 {
        return Ok(ip);
    }
    interfaces_v6()?
        .into_iter()
        .find(|(n, _)| n == iface)
        .and_then(|(_, addrs)| addrs.first().copied())
        .with_context(|| {
            format!("IPv6 is enabled (EnableIPv6) but interface {iface} has no usable IPv6 address; add one or pass --public-ipv6")
        })
}

/// Interfaces in kernel order with all their IPv4 addresses.
fn interfaces() -> anyhow::Result<Vec<(String, Vec<Ipv4Addr>)>> {
    let out = netdev::ip(&["-j", "-4", "addr", "show"])?;
    let links: serde_json::Value = serde_json::from_str(&out).context("reading interface addresses")?;
    let mut v = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let Some(name) = link["ifname"].as_str() else {
            continue;
        };
        let addrs = link["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["local"].as_str()?.parse::<Ipv4Addr>().ok())
            .collect();
        v.push((name.to_string(), addrs));
    }
    Ok(v)
}

/// The choice among `ifaces`, or why each way found nothing (flanneld logs those and exits 1).
pub fn choose<A: Family>(
    args: &AgentArgs,
    ifaces: &[(String, Vec<A>)],
    public_ip: Option<A>,
    can_reach: Option<A>,
    route_get: &dyn Fn(A) -> anyhow::Result<(String, Option<A>)>,
    default_route: &dyn Fn() -> anyhow::Result<String>,
) -> anyhow::Result<Chosen<A>> {
    let first_addr = |name: &str| -> Result<Chosen<A>, String> {
        match ifaces.iter().find(|(n, _)| n == name) {
            None => Err(format!("no interface {name}")),
            Some((_, addrs)) => addrs
                .first()
                .map(|a| Chosen {
                    name: name.into(),
                    addr: *a,
                })
                .ok_or(format!("interface {name} has no {} address", A::NAME)),
        }
    };
    let holding = |ip: A| {
        ifaces
            .iter()
            .find(|(_, addrs)| addrs.contains(&ip))
            .map(|(n, _)| Chosen {
                name: n.clone(),
                addr: ip,
            })
    };
    let given = !args.iface.is_empty() || !args.iface_regex.is_empty() || args.iface_can_reach.is_some();
    if !given {
        if let Some(ip) = public_ip {
            if let Some(found) = holding(ip) {
                return Ok(found);
            }
            // flanneld stops here; a host behind NAT gets the default route's interface.
            tracing::info!(%ip, "no interface holds --public-ip: using the default route's interface");
        }
        let dev = default_route()?;
        return first_addr(&dev).map_err(|why| anyhow::anyhow!("the default route's interface: {why}: pass --iface"));
    }
    let mut tried = Vec::new();
    for want in &args.iface {
        let found = match want.parse::<A>() {
            Ok(ip) => holding(ip).ok_or(format!("no interface holds {ip}")),
            Err(_) => first_addr(want),
        };
        match found {
            Ok(c) => return Ok(c),
            Err(why) => tried.push(format!("--iface {want}: {why}")),
        }
    }
    for pattern in &args.iface_regex {
        let re =
            regex::Regex::new(pattern).with_context(|| format!("--iface-regex {pattern:?} is not a valid regex"))?;
        let by_addr = ifaces.iter().find_map(|(n, addrs)| {
            addrs.iter().find(|a| re.is_match(&a.to_string())).map(|a| Chosen {
                name: n.clone(),
                addr: *a,
            })
        });
        let found = by_addr
            .map(Ok)
            .or_else(|| ifaces.iter().find(|(n, _)| re.is_match(n)).map(|(n, _)| first_addr(n)));
        match found {
            Some(Ok(c)) => return Ok(c),
            Some(Err(why)) => tried.push(format!("--iface-regex {pattern}: {why}")),
            None => tried.push(format!("--iface-regex {pattern}: matches no interface name or address")),
        }
    }
    if let Some(target) = can_reach {
        match route_get(target) {
            Ok((dev, src)) => {
                let found = match src {
                    Some(src) => Ok(Chosen { name: dev, addr: src }),
                    None => first_addr(&dev),
                };
                match found {
                    Ok(c) => return Ok(c),
                    Err(why) => tried.push(format!("--iface-can-reach {target}: {why}")),
                }
            }
            Err(e) => tried.push(format!("--iface-can-reach {target}: {e:#}")),
        }
    }
    let available: Vec<String> = ifaces.iter().map(|(n, a)| format!("{n} {a:?}")).collect();
    bail!(
        "no interface matches the given --iface / --iface-regex / --iface-can-reach ({}); interfaces here: {}",
        tried.join("; "),
        available.join(", ")
    )
}

fn route_get<A: Family>(target: A) -> anyhow::Result<(String, Option<A>)> {
    let family = if A::NAME == "IPv4" { "-4" } else { "-6" };
    let out = netdev::ip(&["-j", family, "route", "get", &target.to_string()])?;
    let routes: serde_json::Value = serde_json::from_str(&out).context("reading `ip route get`")?;
    let route = routes.as_array().and_then(|r| r.first()).context("no route")?;
    let dev = route["dev"].as_str().context("the route has no device")?.to_string();
    Ok((dev, route["prefsrc"].as_str().and_then(|s| s.parse().ok())))
}

fn default_route(family: &str) -> anyhow::Result<String> {
    let out = netdev::ip(&["-j", family, "route", "show", "default"])?;
    let routes: serde_json::Value = serde_json::from_str(&out).context("reading the default route")?;
    routes
        .as_array()
        .and_then(|r| r.first())
        .and_then(|r| r["dev"].as_str())
        .map(String::from)
        .context("no default route: pass --iface (or --iface-regex, --iface-can-reach) to name the interface for inter-host traffic")
}

/// The interface and the PublicIP: `--public-ip`, or the interface's address.
pub fn pick_interface(args: &AgentArgs) -> anyhow::Result<(String, Ipv4Addr)> {
    let chosen = choose(
        args,
        &interfaces()?,
        args.public_ip,
        args.iface_can_reach,
        &route_get,
        &|| default_route("-4"),
    )?;
    Ok((chosen.name.clone(), args.public_ip.unwrap_or(chosen.addr)))
}

/// IPv6-only networks: the interface chosen by its IPv6 addresses, as flannel's ipv6Stack
/// (`--iface` names or IPv6 addresses, `--iface-regex`, else the interface holding
/// `--public-ipv6`, else the IPv6 default route's), and the PublicIPv6. `--iface-can-reach`
/// takes an IPv4 address here and so is not used.
pub fn pick_interface_v6(args: &AgentArgs) -> anyhow::Result<(String, Ipv6Addr)> {
    let chosen = choose(args, &interfaces_v6()?, args.public_ipv6, None, &route_get, &|| {
        default_route("-6")
    })?;
    Ok((chosen.name.clone(), args.public_ipv6.unwrap_or(chosen.addr)))
}

/// (interface, first IPv4 address) for every interface that has one.
pub fn interface_addresses() -> anyhow::Result<Vec<(String, Ipv4Addr)>> {
    Ok(interfaces()?
        .into_iter()
        .filter_map(|(n, addrs)| addrs.first().map(|a| (n, *a)))
        .collect())
}

/// host-gw routes to each peer's PublicIP as a next hop on the shared link: a PublicIP that is
/// not an address of the interface means NAT, which host-gw cannot work through (flanneld's
/// reasoning, and its refusal).
pub fn check_host_gw(iface: &str, public_ip: Ipv4Addr) -> anyhow::Result<()> {
    let held = interfaces()?
        .into_iter()
        .any(|(n, addrs)| n == iface && addrs.contains(&public_ip));
    if !held {
        bail!(
            "host-gw: PublicIP {public_ip} is not an address of {iface}: a PublicIP that differs from the \
             interface's address probably means NAT, which host-gw cannot route through (peers reach \
             this host's subnet via its PublicIP as a next hop on the same link). Use vxlan, or drop --public-ip"
        );
    }
    Ok(())
}

/// Close this process's TCP connections from `addr`, an address the underlay no longer has.
/// The kernel keeps such a socket, silent until keepalives give up (15 s for etcd's
/// connections, and the lease rewrite would wait on it): closed (SOCK_DESTROY, as `ss -K`),
/// its user connects again from the new address. Other processes' sockets are left alone.
/// Returns how many were closed.
pub fn close_own_tcp_connections_from(addr: Ipv4Addr) -> anyhow::Result<usize> {
    let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let ino = target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(format!("ino:{ino}"))
        })
        .collect();
    let src = addr.to_string();
    let listing = netdev::ss(&["-tnHe", "src", &src])?;
    let mut closed = 0;
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !fields.iter().any(|f| ours.contains(*f)) {
            continue;
        }
        // State, Recv-Q, Send-Q, local address:port, peer address:port, then details.
        let (Some(local), Some(peer)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let (Some((_, sport)), Some((dst, dport))) = (local.rsplit_once(':'), peer.rsplit_once(':')) else {
            continue;
        };
        let (sport, dport) = (format!(":{sport}"), format!(":{dport}"));
        netdev::ss(&[
            "-K", "-tn", "src", &src, "sport", "=", &sport, "dst", dst, "dport", "=", &dport,
        ])?;
        closed += 1;
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Agent {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn args(flags: &[&str]) -> AgentArgs {
        Agent::parse_from(std::iter::once("agent").chain(flags.iter().copied())).args
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn lab() -> Vec<(String, Vec<Ipv4Addr>)> {
        vec![
            ("lo".into(), vec![ip("127.0.0.1")]),
            ("eth0".into(), vec![ip("192.168.1.10"), ip("192.168.1.11")]),
            ("eth1".into(), vec![ip("10.0.0.5")]),
            ("wg0".into(), vec![]),
        ]
    }

    fn pick(flags: &[&str]) -> anyhow::Result<Chosen> {
        let a = args(flags);
        choose(
            &a,
            &lab(),
            a.public_ip,
            a.iface_can_reach,
            &|target| {
                if target.octets()[0] == 10 {
                    Ok(("eth1".into(), Some(ip("10.0.0.5"))))
                } else {
                    anyhow::bail!("unreachable")
                }
            },
            &|| Ok("eth0".into()),
        )
    }

    fn chosen(name: &str, addr: &str) -> Chosen {
        Chosen {
            name: name.into(),
            addr: ip(addr),
        }
    }

    #[test]
    fn flannels_order_and_matching() {
        let cases: &[(&[&str], Chosen)] = &[
            (&[], chosen("eth0", "192.168.1.10")),
            (&["--iface=eth1"], chosen("eth1", "10.0.0.5")),
            // An address picks its interface and is the interface address.
            (&["--iface=192.168.1.11"], chosen("eth0", "192.168.1.11")),
            // The first that exists wins; a missing or address-less one is skipped.
            (
                &["--iface=eth9", "--iface=wg0", "--iface=eth1"],
                chosen("eth1", "10.0.0.5"),
            ),
            // --iface before --iface-regex before --iface-can-reach.
            (
                &["--iface=eth9", "--iface-regex=^eth0$", "--iface-can-reach=10.1.1.1"],
                chosen("eth0", "192.168.1.10"),
            ),
            (
                &["--iface=eth9", "--iface-can-reach=10.1.1.1"],
                chosen("eth1", "10.0.0.5"),
            ),
            // A regex is tried on addresses first, then on names.
            (&["--iface-regex=^192\\.168\\.1\\.11$"], chosen("eth0", "192.168.1.11")),
            (
                &["--iface-regex=^10\\.", "--iface-regex=^eth0$"],
                chosen("eth1", "10.0.0.5"),
            ),
            (&["--iface-regex=th1"], chosen("eth1", "10.0.0.5")),
            // --public-ip alone: the interface holding it.
            (&["--public-ip=10.0.0.5"], chosen("eth1", "10.0.0.5")),
            // ...or, behind NAT, the default route's.
            (&["--public-ip=203.0.113.9"], chosen("eth0", "192.168.1.10")),
        ];
        for (flags, want) in cases {
            let got = pick(flags).unwrap_or_else(|e| panic!("{flags:?}: {e:#}"));
            assert_eq!(&got, want, "{flags:?}");
        }
    }

    #[test]
    fn ipv6_addresses_ranked_as_flannel_ranks_them() {
        let info = serde_json::json!([
            {"local": "fe80::1", "scope": "link"},
            {"local": "fd00::9", "dynamic": true, "temporary": true},
            {"local": "fd00::8", "dynamic": true},
            {"local": "fd00::7", "deprecated": true},
            {"local": "::1"},
            {"local": "fd00::6"},
        ]);
        let got: Vec<String> = ranked_ipv6(&info).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["fd00::6", "fd00::8", "fd00::9", "fe80::1"]);
    }

    #[test]
    fn nothing_found_names_every_attempt() {
        let e = pick(&["--iface=eth9", "--iface-regex=^zz", "--iface-can-reach=192.0.2.1"])
            .unwrap_err()
            .to_string();
        for part in [
            "--iface eth9", "--iface-regex ^zz", "--iface-can-reach 192.0.2.1", "eth1 [10.0.0.5]",
        ] {
            assert!(e.contains(part), "{part} missing from: {e}");
        }
        let e = pick(&["--iface-regex=("]).unwrap_err();
        assert!(format!("{e:#}").contains("not a valid regex"), "{e:#}");
    }
}
