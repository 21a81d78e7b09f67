//! What flannel's `dist/mk-docker-opts.sh` computes, as a pure function: Docker daemon options
//! from the subnet file's variables.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerOptsError {
    #[error("Invalid value of FLANNEL_IPMASQ: {0}")]
    InvalidIpMasq(String),
    #[error("FLANNEL_IPV6_SUBNET={0:?} is not an IPv6 CIDR (like fd00:0:0:1::1/64)")]
    InvalidIpv6Subnet(String),
}

/// The script's flags; the file paths (`-f`, `-d`) are the caller's business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerOptsFlags {
    /// `-i`: one `DOCKER_OPT_*="..."` line per option.
    pub individual: bool,
    /// `-c`: the combined line.
    pub combined: bool,
    /// `-m`: leave out `--ip-masq`.
    pub no_ip_masq: bool,
    /// `-k`: name of the combined variable.
    pub combined_key: String,
    /// `-6` (ours; the script has no IPv6): Docker's IPv6 options from `FLANNEL_IPV6_SUBNET`.
    pub ipv6: bool,
}

impl Default for DockerOptsFlags {
    fn default() -> Self {
        DockerOptsFlags {
            individual: false,
            combined: false,
            no_ip_masq: false,
            combined_key: "DOCKER_OPTS".into(),
            ipv6: false,
        }
    }
}

/// `vars` is what the script sees after sourcing the subnet file: the caller's environment
/// (only `FLANNEL_*`, `DOCKER_OPT_*` and the combined key matter) overlaid with the file.
/// Returns the docker env file's contents.
pub fn docker_opts(vars: &BTreeMap<String, String>, flags: &DockerOptsFlags) -> Result<String, DockerOptsError> {
    // Neither -i nor -c means both.
    let (individual, combined) = match (flags.individual, flags.combined) {
        (false, false) => (true, true),
        other => other,
    };
    let get = |k: &str| vars.get(k).map(String::as_str).unwrap_or("");

    // Variables already in the environment take part too, as `set | grep DOCKER_OPT_` finds them.
    let mut opts: BTreeMap<String, String> = vars
        .iter()
        .filter(|(k, _)| k.starts_with("DOCKER_OPT_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !get("FLANNEL_SUBNET").is_empty() {
        opts.insert("DOCKER_OPT_BIP".into(), format!("--bip={}", get("FLANNEL_SUBNET")));
    }
    if !get("FLANNEL_MTU").is_empty() {
        opts.insert("DOCKER_OPT_MTU".into(), format!("--mtu={}", get("FLANNEL_MTU")));
    }
    let v6 = get("FLANNEL_IPV6_SUBNET");
    if flags.ipv6 && !v6.is_empty() {
        // Docker wants the network (`--fixed-cidr-v6=fd00:0:0:1::/64`) and gives its bridge the
        // first address, the one flannel writes.
        let net: ipnetwork::Ipv6Network = v6
            .parse()
            .ok()
            .filter(|_| v6.contains('/'))
            .ok_or_else(|| DockerOptsError::InvalidIpv6Subnet(v6.to_string()))?;
        opts.insert("DOCKER_OPT_IPV6".into(), "--ipv6".into());
        opts.insert(
            "DOCKER_OPT_FIXED_CIDR_V6".into(),
            format!("--fixed-cidr-v6={}/{}", net.network(), net.prefix()),
        );
    }
    let masq = get("FLANNEL_IPMASQ");
    if !masq.is_empty() && !flags.no_ip_masq {
        // flannel masquerades itself, so Docker must not, and the other way round.
        let v = match masq {
            "true" => "--ip-masq=false",
            "false" => "--ip-masq=true",
            other => return Err(DockerOptsError::InvalidIpMasq(other.to_string())),
        };
        opts.insert("DOCKER_OPT_IPMASQ".into(), v.into());
    }

    // The combined value starts from the variable's current value plus a space, and each
    // option is appended with a leading space (hence the script's leading blank).
    let mut all = get(&flags.combined_key).to_string();
    if !all.is_empty() {
        all.push(' ');
    }
    let mut out = String::new();
    for (name, value) in &opts {
        if individual {
            out += &format!("{name}=\"{value}\"\n");
        }
        all += &format!(" {value}");
    }
    if combined {
        out += &format!("{}=\"{all}\"\n", flags.combined_key);
    }
    Ok(out)
}
