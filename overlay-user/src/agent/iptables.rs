//! Masquerading and FORWARD rules as flanneld v0.28.9 writes them: the same chains
//! (`FLANNEL-POSTRTG` in nat, `FLANNEL-FWD` in filter), rules and comments, jumps appended to
//! POSTROUTING and FORWARD, with iptables for IPv4 and ip6tables for IPv6; or, with
//! `"EnableNFTables": true`, its nftables tables `ip flannel-ipv4` and `ip6 flannel-ipv6`
//! with chains `postrtg` and `forward`. Being flannel's own rules, flanneld and this agent each
//! take over the other's. They stay when the agent stops (a restart leaves no gap for
//! masqueraded traffic), a background check puts back what a firewall reload deleted, and
//! `--cleanup` removes them.
use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use ipnetwork::{IpNetwork, Ipv4Network};

pub const NAT_CHAIN: &str = "FLANNEL-POSTRTG";
pub const FWD_CHAIN: &str = "FLANNEL-FWD";
pub const NFT_TABLE: &str = "flannel-ipv4";
pub const NFT_TABLE_V6: &str = "flannel-ipv6";
const NFT_NAT_CHAIN: &str = "postrtg";
const NFT_FWD_CHAIN: &str = "forward";
/// kube-proxy marks packets it wants masqueraded itself; flannel leaves them alone.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";
const MASQ_COMMENT: &str = "flanneld masq";
const FWD_COMMENT: &str = "flanneld forward";
/// Chains of earlier versions of this agent, removed when flannel's are installed.
const OLD_CHAINS: [(&str, &str, &str); 2] = [
    ("nat", "OVERLAY-POSTRTG", "POSTROUTING"),
    ("filter", "OVERLAY-FWD", "FORWARD"),
];

#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {message}")]
pub struct IptablesError {
    command: String,
    message: String,
}

/// The address family a rule set is for: which tools, table and multicast range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn multicast(self) -> &'static str {
        match self {
            Family::V4 => "224.0.0.0/4",
            Family::V6 => "ff00::/8",
        }
    }

    /// nftables' family word, also its address match (`ip saddr`, `ip6 saddr`).
    fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    fn nft_table(self) -> &'static str {
        match self {
            Family::V4 => NFT_TABLE,
            Family::V6 => NFT_TABLE_V6,
        }
    }

    fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

/// What the agent keeps installed, for one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// Both of one family: the network and our subnet of it.
    pub network: IpNetwork,
    pub subnet: IpNetwork,
    /// `--ip-masq`.
    pub masquerade: bool,
    /// `--random-fully` on MASQUERADE (flannel: unless --ip-masq-fully-random-disable).
    pub random_fully: bool,
    /// `--iptables-forward-rules`.
    pub forward: bool,
    /// `"EnableNFTables": true` in the network config.
    pub nftables: bool,
    /// `--ip-blackhole-route`.
    pub blackhole: bool,
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, IptablesError> {
    let command = || format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| IptablesError {
            command: command(),
            message: format!("cannot run {program} (install the iptables or nftables package): {e}"),
        })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        pipe.write_all(input.as_bytes()).map_err(|e| IptablesError {
            command: command(),
            message: format!("writing its input: {e}"),
        })?;
    }
    let out = child.wait_with_output().map_err(|e| IptablesError {
        command: command(),
        message: e.to_string(),
    })?;
    if !out.status.success() {
        let detail = match stdin {
            Some(input) => format!("{}\ninput was:\n{input}", String::from_utf8_lossy(&out.stderr).trim()),
            None => String::from_utf8_lossy(&out.stderr).trim().to_string(),
        };
        return Err(IptablesError {
            command: command(),
            message: detail,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl RuleSet {
    pub fn family(&self) -> Family {
        match self.network {
            IpNetwork::V4(_) => Family::V4,
            IpNetwork::V6(_) => Family::V6,
        }
    }
}

fn iptables(family: Family, args: &[&str]) -> Result<String, IptablesError> {
    let mut all = vec!["-w"];
    all.extend_from_slice(args);
    run(family.iptables(), &all, None)
}

/// One iptables rule: table, chain and the rule's arguments.
struct Rule {
    table: &'static str,
    chain: &'static str,
    spec: Vec<String>,
}

fn rule(table: &'static str, chain: &'static str, spec: &[&str]) -> Rule {
    Rule {
        table,
        chain,
        spec: spec.iter().map(|s| s.to_string()).collect(),
    }
}

/// flannel's `masqRules`: its own subnet's traffic within the network, the network's traffic
/// to its subnet, and traffic from outside to its subnet keep their addresses; traffic from
/// the network to the outside (multicast excepted) and from outside to other hosts' subnets
/// is masqueraded (so replies come back through this host). kube-proxy's marked packets are
/// left to kube-proxy.
fn masquerade_rules(set: &RuleSet) -> Vec<Rule> {
    let (n, s) = (set.network.to_string(), set.subnet.to_string());
    let c = ["-m", "comment", "--comment", MASQ_COMMENT];
    let masq: &[&str] = if set.random_fully {
        &["-j", "MASQUERADE", "--random-fully"]
    } else {
        &["-j", "MASQUERADE"]
    };
    fn with<'a>(head: &[&'a str], comment: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
        [head, comment, tail].concat()
    }
    vec![
        rule(
            "nat",
            NAT_CHAIN,
            &with(&["-m", "mark", "--mark", KUBE_PROXY_MARK], &c, &["-j", "RETURN"]),
        ),
        rule("nat", NAT_CHAIN, &with(&["-s", &s, "-d", &n], &c, &["-j", "RETURN"])),
        rule("nat", NAT_CHAIN, &with(&["-s", &n, "-d", &s], &c, &["-j", "RETURN"])),
        rule(
            "nat",
            NAT_CHAIN,
            &with(&["!", "-s", &n, "-d", &s], &c, &["-j", "RETURN"]),
        ),
        rule(
            "nat",
            NAT_CHAIN,
            &with(&["-s", &n, "!", "-d", set.family().multicast()], &c, masq),
        ),
        rule("nat", NAT_CHAIN, &with(&["!", "-s", &n, "-d", &n], &c, masq)),
    ]
}

fn masquerade_jump() -> Rule {
    rule(
        "nat",
        "POSTROUTING",
        &["-m", "comment", "--comment", MASQ_COMMENT, "-j", NAT_CHAIN],
    )
}

/// flannel's `forwardRules`: accept the network's traffic whatever FORWARD's policy (Docker sets DROP).
fn forward_rules(set: &RuleSet) -> Vec<Rule> {
    let n = set.network.to_string();
    vec![
        rule(
            "filter",
            FWD_CHAIN,
            &["-s", &n, "-m", "comment", "--comment", FWD_COMMENT, "-j", "ACCEPT"],
        ),
        rule(
            "filter",
            FWD_CHAIN,
            &["-d", &n, "-m", "comment", "--comment", FWD_COMMENT, "-j", "ACCEPT"],
        ),
    ]
}

fn forward_jump() -> Rule {
    rule(
        "filter",
        "FORWARD",
        &["-m", "comment", "--comment", FWD_COMMENT, "-j", FWD_CHAIN],
    )
}

/// An argument as iptables-restore reads it.
fn quoted(arg: &str) -> String {
    if arg.contains(' ') {
        format!("\"{arg}\"")
    } else {
        arg.to_string()
    }
}

/// Lines of `iptables -S <chain>` that jump to `target`, as `-D` lines for iptables-restore.
fn jumps_to(family: Family, table: &str, chain: &str, target: &str) -> Result<Vec<String>, IptablesError> {
    let listing = iptables(family, &["-t", table, "-S", chain])?;
    Ok(listing
        .lines()
        .filter(|l| l.ends_with(&format!("-j {target}")))
        .filter_map(|l| l.strip_prefix("-A "))
        .map(|l| format!("-D {l}"))
        .collect())
}

/// Whether iptables' MASQUERADE knows --random-fully (iptables 1.6.2 and later).
pub fn iptables_has_random_fully() -> bool {
    let Ok(version) = iptables(Family::V4, &["--version"]) else {
        return false;
    };
    let numbers: Vec<u32> = version
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .unwrap_or("")
        .split('.')
        .filter_map(|n| n.parse().ok())
        .collect();
    numbers >= vec![1, 6, 2]
}

/// Put `chain` in `table` in one iptables-restore transaction: the chain emptied and refilled,
/// every jump to it from `from` removed and one appended at the end, as flannel does.
fn restore_chain(
    family: Family,
    table: &str,
    chain: &str,
    from: &str,
    jump: &Rule,
    rules: &[Rule],
) -> Result<(), IptablesError> {
    let mut script = format!("*{table}\n:{chain} - [0:0]\n");
    for delete in jumps_to(family, table, from, chain).unwrap_or_default() {
        script += &format!("{delete}\n");
    }
    for r in std::iter::once(jump).chain(rules) {
        let spec: Vec<String> = r.spec.iter().map(|a| quoted(a)).collect();
        script += &format!("-A {} {}\n", r.chain, spec.join(" "));
    }
    script += "COMMIT\n";
    run(family.restore(), &["-w", "--noflush"], Some(&script)).map(|_| ())
}

fn remove_chain(family: Family, table: &str, chain: &str, from: &str) {
    for delete in jumps_to(family, table, from, chain).unwrap_or_default() {
        let args: Vec<String> = shell_words(&delete);
        let mut all = vec!["-t", table];
        all.extend(args.iter().map(String::as_str));
        let _ = iptables(family, &all);
    }
    let _ = iptables(family, &["-t", table, "-F", chain]);
    let _ = iptables(family, &["-t", table, "-X", chain]);
}

/// Split an `iptables -S` line into arguments (it quotes comments with double quotes).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    for ch in line.chars() {
        match ch {
            '"' => in_quotes = !in_quotes,
            ' ' if !in_quotes => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(ch),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// flannel's nftables rules, as one `nft -f` script that replaces the table atomically.
fn nft_script(set: &RuleSet, random_fully: bool) -> String {
    let (n, s) = (set.network, set.subnet);
    let (f, name) = (set.family().nft(), set.family().nft_table());
    let multicast = set.family().multicast();
    let t = format!("{f} {name}");
    // Adding the table before deleting it makes the delete succeed when there is none.
    let mut script = format!("add table {t}\ndelete table {t}\nadd table {t} {{ comment \"rules for {name}\" ; }}\n");
    if set.masquerade {
        let masq = if random_fully {
            "masquerade fully-random"
        } else {
            "masquerade"
        };
        script += &format!(
            "add chain {t} {NFT_NAT_CHAIN} {{ type nat hook postrouting priority srcnat ; \
             comment \"chain to manage traffic masquerading by flannel\" ; }}\n"
        );
        for r in [
            "meta mark & 0x4000 == 0x4000 return".to_string(),
            format!("{f} saddr {s} {f} daddr {n} return"),
            format!("{f} saddr {n} {f} daddr {s} return"),
            format!("{f} saddr != {n} {f} daddr {s} return"),
            format!("{f} saddr {n} {f} daddr != {multicast} {masq}"),
            format!("{f} saddr != {n} {f} daddr {n} {masq}"),
        ] {
            script += &format!("add rule {t} {NFT_NAT_CHAIN} {r}\n");
        }
    }
    if set.forward {
        script += &format!(
            "add chain {t} {NFT_FWD_CHAIN} {{ type filter hook forward priority filter ; \
             comment \"chain to accept flannel traffic\" ; }}\n"
        );
        script += &format!("add rule {t} {NFT_FWD_CHAIN} {f} saddr {n} accept\n");
        script += &format!("add rule {t} {NFT_FWD_CHAIN} {f} daddr {n} accept\n");
    }
    script
}

fn nft_expected_rules(set: &RuleSet) -> [(&'static str, usize); 2] {
    [
        (NFT_NAT_CHAIN, if set.masquerade { 6 } else { 0 }),
        (NFT_FWD_CHAIN, if set.forward { 2 } else { 0 }),
    ]
}

fn nft_install(set: &RuleSet) -> Result<(), IptablesError> {
    if set.random_fully {
        match run("nft", &["-f", "-"], Some(&nft_script(set, true))) {
            Ok(_) => return Ok(()),
            Err(e) => tracing::warn!("nftables refused masquerade fully-random, masquerading without it: {e}"),
        }
    }
    run("nft", &["-f", "-"], Some(&nft_script(set, false))).map(|_| ())
}

fn nft_remove(family: Family) {
    let t = format!("{} {}", family.nft(), family.nft_table());
    let _ = run("nft", &["-f", "-"], Some(&format!("add table {t}\ndelete table {t}\n")));
}

/// What of `set` is missing in the nftables table, if anything.
fn nft_missing(set: &RuleSet) -> Option<String> {
    let (f, name) = (set.family().nft(), set.family().nft_table());
    let listing = match run("nft", &["-j", "list", "table", f, name], None) {
        Ok(l) => l,
        Err(_) => return Some(format!("nftables table {f} {name}")),
    };
    let parsed: serde_json::Value = serde_json::from_str(&listing).ok()?;
    let items = parsed["nftables"].as_array()?;
    for (chain, expected) in nft_expected_rules(set) {
        if expected == 0 {
            continue;
        }
        let count = items.iter().filter(|i| i["rule"]["chain"] == chain).count();
        if count != expected {
            return Some(format!("nftables chain {name} {chain} ({count} of {expected} rules)"));
        }
    }
    None
}

/// Install `set`, replacing what an earlier start left, and remove the rules of the other mode.
pub fn install(set: &RuleSet) -> Result<(), IptablesError> {
    let family = set.family();
    if family == Family::V4 {
        for (table, chain, from) in OLD_CHAINS {
            remove_chain(family, table, chain, from);
        }
    }
    if set.nftables {
        remove_iptables(family);
        nft_install(set)?;
        tracing::info!(
            table = family.nft_table(),
            masquerade = set.masquerade,
            forward = set.forward,
            "installed nftables rules"
        );
        return Ok(());
    }
    nft_remove(family);
    if set.forward {
        restore_chain(
            family,
            "filter",
            FWD_CHAIN,
            "FORWARD",
            &forward_jump(),
            &forward_rules(set),
        )?;
        tracing::info!(network = %set.network, "installed FORWARD accept rules (chain {FWD_CHAIN})");
    } else {
        remove_chain(family, "filter", FWD_CHAIN, "FORWARD");
    }
    if set.masquerade {
        restore_chain(
            family,
            "nat",
            NAT_CHAIN,
            "POSTROUTING",
            &masquerade_jump(),
            &masquerade_rules(set),
        )?;
        tracing::info!(
            network = %set.network,
            random_fully = set.random_fully,
            "installed masquerading rules (chain {NAT_CHAIN})"
        );
    } else {
        remove_chain(family, "nat", NAT_CHAIN, "POSTROUTING");
    }
    Ok(())
}

/// The first rule of `set` that is not installed, described for the log.
pub fn missing(set: &RuleSet) -> Option<String> {
    if set.nftables {
        return nft_missing(set);
    }
    let mut wanted = Vec::new();
    if set.forward {
        wanted.push(forward_jump());
        wanted.extend(forward_rules(set));
    }
    if set.masquerade {
        wanted.push(masquerade_jump());
        wanted.extend(masquerade_rules(set));
    }
    wanted.into_iter().find_map(|r| {
        let mut args = vec!["-t", r.table, "-C", r.chain];
        args.extend(r.spec.iter().map(String::as_str));
        iptables(set.family(), &args).is_err().then(|| {
            format!(
                "{} -t {} -A {} {}",
                set.family().iptables(),
                r.table,
                r.chain,
                r.spec.join(" ")
            )
        })
    })
}

fn remove_iptables(family: Family) {
    remove_chain(family, "nat", NAT_CHAIN, "POSTROUTING");
    remove_chain(family, "filter", FWD_CHAIN, "FORWARD");
}

/// Remove every rule this agent (or flanneld) installs, both families, both modes: `--cleanup`.
pub fn remove_all() {
    for family in Family::ALL {
        remove_iptables(family);
        nft_remove(family);
    }
    for (table, chain, from) in OLD_CHAINS {
        remove_chain(Family::V4, table, chain, from);
    }
}

/// flannel's `-ip-blackhole-route`: a blackhole route for our subnet where no route for it
/// exists (with the container bridge holding the subnet, the bridge's route wins and this adds
/// nothing, as in flanneld).
fn ensure_blackhole(subnet: IpNetwork) {
    let s = subnet.to_string();
    let f = if subnet.is_ipv4() { Family::V4 } else { Family::V6 }.ip_flag();
    let existing = run("ip", &[f, "route", "show", "exact", &s, "type", "blackhole"], None).unwrap_or_default();
    if existing.trim().is_empty() {
        // With our protocol number, so `--cleanup` finds it with the backends' routes.
        match run(
            "ip",
            &[f, "route", "add", "blackhole", &s, "proto", crate::backend::ROUTE_PROTO],
            None,
        ) {
            Ok(_) => tracing::info!(subnet = %s, "added the blackhole route for our subnet"),
            Err(e) => tracing::debug!("blackhole route for {s}: {e}"),
        }
    }
}

/// `--cleanup`: the blackhole route for `subnet` (ours, or one flanneld left), if any.
pub fn remove_blackhole(subnet: Ipv4Network) {
    let s = subnet.to_string();
    if run("ip", &["route", "del", "blackhole", &s], None).is_ok() {
        tracing::info!(subnet = %s, "removed the blackhole route for our subnet");
    }
}

/// Keeps the current [`RuleSet`]s (one per family) installed: every `period` (flannel's
/// `--iptables-resync`) a rule found missing (`iptables -F`, a firewall reload) has its set
/// put back.
#[derive(Clone)]
pub struct Upkeep {
    current: Arc<Mutex<Vec<RuleSet>>>,
}

impl Upkeep {
    pub fn start(period: Duration) -> Self {
        let current: Arc<Mutex<Vec<RuleSet>>> = Arc::default();
        let watched = current.clone();
        std::thread::Builder::new()
            .name("rules-resync".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(period);
                    let sets = watched.lock().expect("rules").clone();
                    for set in sets {
                        if let Some(what) = missing(&set) {
                            tracing::warn!("{what} is missing: putting the rules back");
                            if let Err(e) = install(&set) {
                                tracing::warn!("restoring the rules failed (will retry): {e}");
                            }
                        }
                        if set.blackhole {
                            ensure_blackhole(set.subnet);
                        }
                    }
                }
            })
            .expect("spawning the rules thread");
        Upkeep { current }
    }

    /// Install `set` now and keep it installed from here on, in place of its family's last one.
    pub fn apply(&self, set: RuleSet) -> Result<(), IptablesError> {
        install(&set)?;
        let mut current = self.current.lock().expect("rules");
        current.retain(|s| s.family() != set.family());
        current.push(set);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> RuleSet {
        RuleSet {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            masquerade: true,
            random_fully: true,
            forward: true,
            nftables: false,
            blackhole: false,
        }
    }

    #[test]
    fn masquerade_rules_are_flannels_in_its_order() {
        let lines: Vec<String> = masquerade_rules(&set()).iter().map(|r| r.spec.join(" ")).collect();
        let c = "-m comment --comment flanneld masq";
        assert_eq!(
            lines,
            [
                format!("-m mark --mark 0x4000/0x4000 {c} -j RETURN"),
                format!("-s 10.244.3.0/24 -d 10.244.0.0/16 {c} -j RETURN"),
                format!("-s 10.244.0.0/16 -d 10.244.3.0/24 {c} -j RETURN"),
                format!("! -s 10.244.0.0/16 -d 10.244.3.0/24 {c} -j RETURN"),
                format!("-s 10.244.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully"),
                format!("! -s 10.244.0.0/16 -d 10.244.0.0/16 {c} -j MASQUERADE --random-fully"),
            ]
        );
        let plain = RuleSet {
            random_fully: false,
            ..set()
        };
        assert!(
            masquerade_rules(&plain)
                .iter()
                .all(|r| !r.spec.contains(&"--random-fully".to_string()))
        );
    }

    #[test]
    fn iptables_listing_lines_split_like_a_shell() {
        assert_eq!(
            shell_words(r#"-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#),
            [
                "-D", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"
            ]
        );
    }

    #[test]
    fn nft_script_replaces_the_table_with_flannels_chains() {
        let s = nft_script(&set(), true);
        assert!(
            s.starts_with("add table ip flannel-ipv4\ndelete table ip flannel-ipv4\n"),
            "{s}"
        );
        assert!(s.contains("add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority srcnat"));
        assert!(s.contains("add chain ip flannel-ipv4 forward { type filter hook forward priority filter"));
        assert!(s.contains("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"));
        let no_masq = nft_script(
            &RuleSet {
                masquerade: false,
                ..set()
            },
            false,
        );
        assert!(!no_masq.contains("postrtg") && no_masq.contains("forward"));
    }

    fn set_v6() -> RuleSet {
        RuleSet {
            network: "fd00:244::/56".parse().unwrap(),
            subnet: "fd00:244:0:3::/64".parse().unwrap(),
            ..set()
        }
    }

    #[test]
    fn ipv6_rules_are_flannels_masqip6rules_and_forward_rules() {
        let lines: Vec<String> = masquerade_rules(&set_v6()).iter().map(|r| r.spec.join(" ")).collect();
        let c = "-m comment --comment flanneld masq";
        assert_eq!(
            lines,
            [
                format!("-m mark --mark 0x4000/0x4000 {c} -j RETURN"),
                format!("-s fd00:244:0:3::/64 -d fd00:244::/56 {c} -j RETURN"),
                format!("-s fd00:244::/56 -d fd00:244:0:3::/64 {c} -j RETURN"),
                format!("! -s fd00:244::/56 -d fd00:244:0:3::/64 {c} -j RETURN"),
                format!("-s fd00:244::/56 ! -d ff00::/8 {c} -j MASQUERADE --random-fully"),
                format!("! -s fd00:244::/56 -d fd00:244::/56 {c} -j MASQUERADE --random-fully"),
            ]
        );
        let fwd: Vec<String> = forward_rules(&set_v6()).iter().map(|r| r.spec.join(" ")).collect();
        assert_eq!(
            fwd,
            [
                "-s fd00:244::/56 -m comment --comment flanneld forward -j ACCEPT",
                "-d fd00:244::/56 -m comment --comment flanneld forward -j ACCEPT",
            ]
        );
        assert_eq!(set_v6().family(), Family::V6);
        assert_eq!(Family::V6.iptables(), "ip6tables");
    }

    #[test]
    fn ipv6_nft_script_is_the_ip6_flannel_ipv6_table() {
        let s = nft_script(&set_v6(), false);
        assert!(
            s.starts_with("add table ip6 flannel-ipv6\ndelete table ip6 flannel-ipv6\n"),
            "{s}"
        );
        assert!(
            s.contains("add rule ip6 flannel-ipv6 postrtg ip6 saddr fd00:244::/56 ip6 daddr != ff00::/8 masquerade\n")
        );
        assert!(s.contains("add rule ip6 flannel-ipv6 forward ip6 daddr fd00:244::/56 accept\n"));
        assert!(!s.contains(" ip saddr"), "{s}");
    }
}
