//! Masquerading and FORWARD rules with flannel's meaning, in chains of our own so they can be
//! replaced whole and removed on `--cleanup`.
use std::process::Command;

use ipnetwork::Ipv4Network;

const NAT_CHAIN: &str = "OVERLAY-POSTRTG";
const FWD_CHAIN: &str = "OVERLAY-FWD";

#[derive(Debug, thiserror::Error)]
#[error("`iptables {args}` failed: {message}")]
pub struct IptablesError {
    args: String,
    message: String,
}

fn iptables(args: &[&str]) -> Result<(), IptablesError> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| IptablesError {
            args: args.join(" "),
            message: format!("cannot run iptables (install the iptables package): {e}"),
        })?;
    if !out.status.success() {
        return Err(IptablesError {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    Ok(())
}

/// Create (or empty) `chain` in `table`, fill it with `rules`, and jump to it from `from`.
fn install_chain(table: &str, chain: &str, from: &str, rules: &[Vec<String>]) -> Result<(), IptablesError> {
    if iptables(&["-t", table, "-N", chain]).is_err() {
        iptables(&["-t", table, "-F", chain])?;
    }
    for rule in rules {
        let mut args = vec!["-t", table, "-A", chain];
        args.extend(rule.iter().map(String::as_str));
        iptables(&args)?;
    }
    let jump = ["-t", table, "-C", from, "-j", chain];
    if iptables(&jump).is_err() {
        iptables(&["-t", table, "-I", from, "1", "-j", chain])?;
    }
    Ok(())
}

fn remove_chain(table: &str, chain: &str, from: &str) {
    while iptables(&["-t", table, "-D", from, "-j", chain]).is_ok() {}
    let _ = iptables(&["-t", table, "-F", chain]);
    let _ = iptables(&["-t", table, "-X", chain]);
}

fn rule(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// flannel's masquerade rules: traffic within the overlay network keeps its addresses;
/// traffic from the network to the outside (multicast excepted) is masqueraded, and so is
/// traffic from outside the network to remote subnets, so replies come back through us.
pub fn install_masquerade(network: Ipv4Network, subnet: Ipv4Network) -> Result<(), IptablesError> {
    let (n, s) = (network.to_string(), subnet.to_string());
    let rules = [
        rule(&[
            "-s", &n, "-d", &n, "-m", "comment", "--comment", "overlay: within the network", "-j", "RETURN",
        ]),
        rule(&[
            "-s", &n, "!", "-d", "224.0.0.0/4", "-m", "comment", "--comment", "overlay: leaving the network", "-j",
            "MASQUERADE",
        ]),
        rule(&[
            "!", "-s", &n, "-d", &s, "-m", "comment", "--comment", "overlay: to our subnet", "-j", "RETURN",
        ]),
        rule(&[
            "!", "-s", &n, "-d", &n, "-m", "comment", "--comment", "overlay: to remote subnets", "-j", "MASQUERADE",
        ]),
    ];
    install_chain("nat", NAT_CHAIN, "POSTROUTING", &rules)?;
    tracing::info!(%network, "installed masquerading rules (chain {NAT_CHAIN})");
    Ok(())
}

/// Accept the network's forwarded traffic whatever FORWARD's policy (Docker sets DROP).
pub fn install_forward(network: Ipv4Network) -> Result<(), IptablesError> {
    let n = network.to_string();
    let rules = [
        rule(&[
            "-s", &n, "-m", "comment", "--comment", "overlay: from the network", "-j", "ACCEPT",
        ]),
        rule(&[
            "-d", &n, "-m", "comment", "--comment", "overlay: to the network", "-j", "ACCEPT",
        ]),
    ];
    install_chain("filter", FWD_CHAIN, "FORWARD", &rules)?;
    tracing::info!(%network, "installed FORWARD accept rules (chain {FWD_CHAIN})");
    Ok(())
}

pub fn remove_masquerade() {
    remove_chain("nat", NAT_CHAIN, "POSTROUTING");
}

pub fn remove_forward() {
    remove_chain("filter", FWD_CHAIN, "FORWARD");
}
