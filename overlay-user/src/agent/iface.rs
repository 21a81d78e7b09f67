//! Which interface carries inter-host traffic, and its address.
use std::net::Ipv4Addr;

use anyhow::{Context as _, bail};

use super::AgentArgs;
use crate::datapath::netdev;

/// `--iface` (names or addresses, first that exists), else `--iface-regex`, else the
/// interface of the default route; the PublicIP is `--public-ip` or that interface's address.
pub fn pick_interface(args: &AgentArgs) -> anyhow::Result<(String, Ipv4Addr)> {
    let addrs = interface_addresses()?;
    let mut chosen: Option<(String, Ipv4Addr)> = None;
    if !args.iface.is_empty() {
        for want in &args.iface {
            let found = match want.parse::<Ipv4Addr>() {
                Ok(ip) => addrs.iter().find(|(_, a)| *a == ip).cloned(),
                Err(_) => addrs.iter().find(|(n, _)| n == want).cloned(),
            };
            if found.is_some() {
                chosen = found;
                break;
            }
        }
        if chosen.is_none() {
            bail!(
                "none of --iface {} is an interface with an IPv4 address here",
                args.iface.join(",")
            );
        }
    } else if !args.iface_regex.is_empty() {
        for pattern in &args.iface_regex {
            let re = regex::Regex::new(pattern)
                .with_context(|| format!("--iface-regex {pattern:?} is not a valid regex"))?;
            if let Some(found) = addrs
                .iter()
                .find(|(n, a)| re.is_match(n) || re.is_match(&a.to_string()))
            {
                chosen = Some(found.clone());
                break;
            }
        }
        if chosen.is_none() {
            bail!("no interface matches --iface-regex {}", args.iface_regex.join(","));
        }
    } else {
        let out = netdev::ip(&["-j", "-4", "route", "show", "default"])?;
        let routes: serde_json::Value = serde_json::from_str(&out).context("reading the default route")?;
        let dev = routes
            .as_array()
            .and_then(|r| r.first())
            .and_then(|r| r["dev"].as_str())
            .context(
                "no default route: pass --iface (or --iface-regex) to name the interface for inter-host traffic",
            )?;
        chosen = addrs.iter().find(|(n, _)| n == dev).cloned();
        if chosen.is_none() {
            bail!("the default route's interface {dev} has no IPv4 address: pass --iface");
        }
    }
    let (name, addr) = chosen.expect("set above");
    Ok((name, args.public_ip.unwrap_or(addr)))
}

/// (interface, first IPv4 address) for every interface that has one.
pub fn interface_addresses() -> anyhow::Result<Vec<(String, Ipv4Addr)>> {
    let out = netdev::ip(&["-j", "-4", "addr", "show"])?;
    let links: serde_json::Value = serde_json::from_str(&out).context("reading interface addresses")?;
    let mut v = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let Some(name) = link["ifname"].as_str() else {
            continue;
        };
        let addr = link["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["local"].as_str()?.parse::<Ipv4Addr>().ok())
            .next();
        if let Some(addr) = addr {
            v.push((name.to_string(), addr));
        }
    }
    Ok(v)
}
