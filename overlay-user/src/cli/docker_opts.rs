//! `overlay docker-opts`: flannel's `mk-docker-opts.sh`, same flags, same output file.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use anyhow::{Context as _, bail};
use ipnetwork::Ipv4Network;

use crate::subnet::{
    docker_opts::{DockerOptsFlags, docker_opts},
    file::{DEFAULT_SUBNET_FILE, parse_env, write_atomic},
};

/// Generate Docker daemon options from the flannel subnet file.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Path to the flannel env file.
    #[arg(short = 'f', value_name = "FLANNEL-ENV-FILE", default_value = DEFAULT_SUBNET_FILE)]
    pub flannel_env: PathBuf,
    /// Path of the Docker env file to write.
    #[arg(short = 'd', value_name = "DOCKER-ENV-FILE", default_value = "/run/docker_opts.env")]
    pub docker_env: PathBuf,
    /// Output each Docker option as an individual variable, e.g. DOCKER_OPT_MTU=1500.
    #[arg(short = 'i')]
    pub individual: bool,
    /// Output the combined Docker options in one variable.
    #[arg(short = 'c')]
    pub combined: bool,
    /// Do not output --ip-masq (for older Docker versions).
    #[arg(short = 'm')]
    pub no_ip_masq: bool,
    /// Name of the combined options variable.
    #[arg(short = 'k', value_name = "COMBINED-KEY", default_value = "DOCKER_OPTS")]
    pub combined_key: String,
    /// Also output Docker's IPv6 options from FLANNEL_IPV6_SUBNET: DOCKER_OPT_IPV6="--ipv6" and
    /// DOCKER_OPT_FIXED_CIDR_V6="--fixed-cidr-v6=<its network>". Not in mk-docker-opts.sh,
    /// which writes nothing for IPv6; without -6 the output is the script's.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let vars = generate(&args, std::env::vars())?;
    // Last, as the script does: the file is already written when this fails.
    if let Some(subnet) = vars.get("FLANNEL_SUBNET").filter(|s| !s.is_empty()) {
        check_routes(subnet)?;
    }
    Ok(())
}

/// Everything but the routing-table check: read the subnet file over `env` (the script sources
/// it into its environment), write the Docker env file. Returns the variables used.
pub fn generate(
    args: &Args,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("FLANNEL_") || k.starts_with("DOCKER_OPT_") || *k == args.combined_key)
        .collect();
    // A missing subnet file is not an error for the script either.
    if args.flannel_env.is_file() {
        let text = std::fs::read_to_string(&args.flannel_env)
            .with_context(|| format!("reading {}", args.flannel_env.display()))?;
        vars.extend(parse_env(&text));
    }
    let flags = DockerOptsFlags {
        individual: args.individual,
        combined: args.combined,
        no_ip_masq: args.no_ip_masq,
        combined_key: args.combined_key.clone(),
        ipv6: args.ipv6,
    };
    let out = docker_opts(&vars, &flags)?;
    write_atomic(&args.docker_env, out.as_bytes())?;
    Ok(vars)
}

/// The script refuses a subnet that the routing table already sends via a gateway.
fn check_routes(flannel_subnet: &str) -> anyhow::Result<()> {
    let Ok(net) = flannel_subnet.parse::<Ipv4Network>() else {
        return Ok(());
    };
    let Ok(table) = std::fs::read_to_string("/proc/net/route") else {
        return Ok(());
    };
    if let Some(line) = gateway_route_to(&table, net) {
        bail!("Your routing table already contains the subnet: {line}");
    }
    Ok(())
}

fn gateway_route_to(table: &str, net: Ipv4Network) -> Option<String> {
    const RTF_GATEWAY: u32 = 0x2;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(|v| Ipv4Addr::from(v.swap_bytes()));
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Some(dst), Some(gw), Ok(flags), Some(mask)) =
            (hex(f[1]), hex(f[2]), u32::from_str_radix(f[3], 16), hex(f[7]))
        else {
            continue;
        };
        if flags & RTF_GATEWAY != 0 && dst == net.network() && mask == net.mask() {
            return Some(format!("{}/{} via {gw} dev {}", dst, net.prefix(), f[0]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_gateway_route_to_the_subnet() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t0007010A\t0201A8C0\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t0008010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let hit = gateway_route_to(table, "10.1.7.0/24".parse().unwrap()).unwrap();
        assert_eq!(hit, "10.1.7.0/24 via 192.168.1.2 dev eth0");
        assert_eq!(
            gateway_route_to(table, "10.1.8.0/24".parse().unwrap()),
            None,
            "no gateway"
        );
        assert_eq!(gateway_route_to(table, "10.1.9.0/24".parse().unwrap()), None);
    }
}
