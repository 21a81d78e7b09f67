//! `overlay docker-opts` against what flannel's dist/mk-docker-opts.sh writes for the same
//! input. The script cannot be run here (not downloadable at test time, not ours to commit), so
//! every expected output below was derived by hand from the script's lines (line numbers of
//! flannel's dist/mk-docker-opts.sh as read for this port):
//! - 52-55: neither -i nor -c means both;
//! - 61-63: DOCKER_OPT_BIP="--bip=$FLANNEL_SUBNET" when set;
//! - 65-67: DOCKER_OPT_MTU="--mtu=$FLANNEL_MTU" when set;
//! - 69-78: unless -m, FLANNEL_IPMASQ=true gives --ip-masq=false and false gives true, anything
//!   else is "Invalid value of FLANNEL_IPMASQ: X" and exit 1;
//! - 80-84: the combined value starts as the combined variable's current value plus a space;
//! - 88-99: `set | grep DOCKER_OPT_` lists the options sorted by name (BIP, IPMASQ, MTU);
//!   each gives NAME="VALUE" with -i and appends " VALUE" to the combined value;
//! - 101-103: with -c, KEY="combined value".

use std::collections::BTreeMap;

use clap::Parser;
use overlay::cli::docker_opts::{Args, generate};

#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    args: Args,
}

const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

const BIP: &str = "DOCKER_OPT_BIP=\"--bip=10.1.7.1/24\"\n";
const MASQ: &str = "DOCKER_OPT_IPMASQ=\"--ip-masq=false\"\n";
const MTU: &str = "DOCKER_OPT_MTU=\"--mtu=1450\"\n";

/// Run `overlay docker-opts -f <file> -d <out> <flags>` with `env` as the environment.
fn run(subnet_env: Option<&str>, flags: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("subnet.env");
    if let Some(text) = subnet_env {
        std::fs::write(&input, text).unwrap();
    }
    let out = dir.path().join("docker_opts.env");
    let mut argv = vec![
        "docker-opts".to_string(),
        "-f".into(),
        input.display().to_string(),
        "-d".into(),
        out.display().to_string(),
    ];
    argv.extend(flags.iter().map(|s| s.to_string()));
    let cmd = Cmd::try_parse_from(&argv).map_err(|e| e.to_string())?;
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    generate(&cmd.args, env).map_err(|e| e.to_string())?;
    Ok(std::fs::read_to_string(out).unwrap())
}

#[test]
fn every_flag_combination_matches_the_script() {
    let combined = |key: &str, masq: bool| {
        let m = if masq { " --ip-masq=false" } else { "" };
        format!("{key}=\" --bip=10.1.7.1/24{m} --mtu=1450\"\n")
    };
    // (flags, expected file)
    let table: Vec<(&[&str], String)> = vec![
        (&[], format!("{BIP}{MASQ}{MTU}{}", combined("DOCKER_OPTS", true))),
        (&["-i"], format!("{BIP}{MASQ}{MTU}")),
        (&["-c"], combined("DOCKER_OPTS", true)),
        (
            &["-i", "-c"],
            format!("{BIP}{MASQ}{MTU}{}", combined("DOCKER_OPTS", true)),
        ),
        (&["-m"], format!("{BIP}{MTU}{}", combined("DOCKER_OPTS", false))),
        (&["-i", "-m"], format!("{BIP}{MTU}")),
        (&["-c", "-m"], combined("DOCKER_OPTS", false)),
        (
            &["-i", "-c", "-m"],
            format!("{BIP}{MTU}{}", combined("DOCKER_OPTS", false)),
        ),
        (&["-k", "OPTS"], format!("{BIP}{MASQ}{MTU}{}", combined("OPTS", true))),
        (&["-i", "-k", "OPTS"], format!("{BIP}{MASQ}{MTU}")),
        (&["-c", "-k", "OPTS"], combined("OPTS", true)),
        (
            &["-i", "-c", "-k", "OPTS"],
            format!("{BIP}{MASQ}{MTU}{}", combined("OPTS", true)),
        ),
        (&["-m", "-k", "OPTS"], format!("{BIP}{MTU}{}", combined("OPTS", false))),
        (&["-i", "-m", "-k", "OPTS"], format!("{BIP}{MTU}")),
        (&["-c", "-m", "-k", "OPTS"], combined("OPTS", false)),
        (&["-icm", "-kOPTS"], format!("{BIP}{MTU}{}", combined("OPTS", false))),
    ];
    for (flags, expected) in table {
        assert_eq!(run(Some(SUBNET_ENV), flags, &[]).unwrap(), expected, "flags {flags:?}");
    }
}

#[test]
fn ipmasq_false_inverts_and_an_invalid_value_fails_unless_m() {
    let env = SUBNET_ENV.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=false");
    assert_eq!(
        run(Some(&env), &["-c"], &[]).unwrap(),
        "DOCKER_OPTS=\" --bip=10.1.7.1/24 --ip-masq=true --mtu=1450\"\n"
    );
    let bad = SUBNET_ENV.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=yes");
    assert_eq!(
        run(Some(&bad), &[], &[]).unwrap_err(),
        "Invalid value of FLANNEL_IPMASQ: yes"
    );
    // Lines 69: the check only runs without -m.
    assert_eq!(
        run(Some(&bad), &["-c", "-m"], &[]).unwrap(),
        "DOCKER_OPTS=\" --bip=10.1.7.1/24 --mtu=1450\"\n"
    );
}

#[test]
fn missing_file_and_environment_behave_like_the_script() {
    // Lines 57-59: no file, nothing sourced: no options, an empty combined value.
    assert_eq!(run(None, &[], &[]).unwrap(), "DOCKER_OPTS=\"\"\n");
    assert_eq!(run(None, &["-i"], &[]).unwrap(), "");
    // Variables already exported reach the script too (the file overrides them), and a
    // preset combined variable is kept in front with one extra space (lines 80-84).
    let env = [
        ("FLANNEL_MTU", "9000"),
        ("DOCKER_OPTS", "--debug"),
        ("DOCKER_OPT_DNS", "--dns=10.0.0.10"),
    ];
    assert_eq!(
        run(Some("FLANNEL_SUBNET=10.1.7.1/24\n"), &[], &env).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=10.1.7.1/24\"\nDOCKER_OPT_DNS=\"--dns=10.0.0.10\"\nDOCKER_OPT_MTU=\"--mtu=9000\"\n\
         DOCKER_OPTS=\"--debug  --bip=10.1.7.1/24 --dns=10.0.0.10 --mtu=9000\"\n"
    );
}

#[test]
fn reads_the_file_the_agent_writes() {
    let cfg = overlay::subnet::NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
    let key = overlay::subnet::SubnetKey::parse("10.5.52.0-24").unwrap();
    let text = overlay::subnet::file::render(&cfg, &key, 1450, false);
    let vars: BTreeMap<String, String> = overlay::subnet::file::parse_env(&text);
    assert_eq!(vars["FLANNEL_SUBNET"], "10.5.52.1/24");
    assert_eq!(
        run(Some(&text), &["-c"], &[]).unwrap(),
        "DOCKER_OPTS=\" --bip=10.5.52.1/24 --ip-masq=true --mtu=1450\"\n"
    );
}

/// mk-docker-opts.sh has no IPv6 line: a dual-stack subnet file gives the IPv4 options only, as
/// the script gives. `-6` (ours) adds what Docker needs for IPv6 on its bridge.
#[test]
fn dual_stack_file_gives_the_scripts_output_and_ipv6_options_with_dash_6() {
    let cfg = overlay::subnet::NetworkConfig::parse(
        r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    let key = overlay::subnet::SubnetKey::parse("10.5.52.0-24&fd00:5:0:34::-64").unwrap();
    let text = overlay::subnet::file::render(&cfg, &key, 1450, true);
    let vars = overlay::subnet::file::parse_env(&text);
    assert_eq!(vars["FLANNEL_IPV6_NETWORK"], "fd00:5::/56");
    assert_eq!(vars["FLANNEL_IPV6_SUBNET"], "fd00:5:0:34::1/64");
    assert_eq!(
        run(Some(&text), &[], &[]).unwrap(),
        "DOCKER_OPT_BIP=\"--bip=10.5.52.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n\
         DOCKER_OPTS=\" --bip=10.5.52.1/24 --ip-masq=false --mtu=1450\"\n"
    );
    assert_eq!(
        run(Some(&text), &["-6", "-c"], &[]).unwrap(),
        "DOCKER_OPTS=\" --bip=10.5.52.1/24 --fixed-cidr-v6=fd00:5:0:34::/64 --ip-masq=false --ipv6 --mtu=1450\"\n"
    );
    let bad = run(Some("FLANNEL_IPV6_SUBNET=fd00::1\n"), &["-6"], &[]).unwrap_err();
    assert!(bad.contains("FLANNEL_IPV6_SUBNET") && bad.contains("fd00::1"), "{bad}");
    // IPv6-only: no FLANNEL_SUBNET, so no --bip.
    let v6only = "FLANNEL_IPV6_NETWORK=fd00:5::/56\nFLANNEL_IPV6_SUBNET=fd00:5:0:34::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
    assert_eq!(
        run(Some(v6only), &["-6", "-i"], &[]).unwrap(),
        "DOCKER_OPT_FIXED_CIDR_V6=\"--fixed-cidr-v6=fd00:5:0:34::/64\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n\
         DOCKER_OPT_IPV6=\"--ipv6\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n"
    );
}
