//! The subnet file flannel writes for Docker and CNI (`/run/flannel/subnet.env`), written
//! atomically, and read back at start to find the previous subnet.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use ipnetwork::{Ipv4Network, Ipv6Network};
use tracing::warn;

use super::{config::NetworkConfig, lease::SubnetKey};

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("writing subnet file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// The file's text, line for line as flannel's `WriteSubnetFile`: the first usable address of
/// our subnet with its prefix (10.244.7.1/24), IPv6 lines when enabled, then MTU and IPMASQ.
pub fn render(config: &NetworkConfig, key: &SubnetKey, mtu: u32, ip_masq: bool) -> String {
    let mut out = String::new();
    if let Some(pool) = &config.ipv4 {
        let first = Ipv4Addr::from(u32::from(key.ipv4.network()) + 1);
        let subnet = Ipv4Network::new(first, key.ipv4.prefix()).expect("prefix from a valid network");
        out += &format!("FLANNEL_NETWORK={}\nFLANNEL_SUBNET={subnet}\n", pool.network);
    }
    if let (Some(pool), Some(v6)) = (&config.ipv6, key.ipv6) {
        let first = Ipv6Addr::from(u128::from(v6.network()) + 1);
        let subnet = Ipv6Network::new(first, v6.prefix()).expect("prefix from a valid network");
        out += &format!("FLANNEL_IPV6_NETWORK={}\nFLANNEL_IPV6_SUBNET={subnet}\n", pool.network);
    }
    out += &format!("FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ip_masq}\n");
    out
}

/// Write the subnet file so that readers see the old or the new file, never half of one:
/// a temporary file in the same directory, synced, then renamed over.
pub fn write_subnet_file(
    path: &Path,
    config: &NetworkConfig,
    key: &SubnetKey,
    mtu: u32,
    ip_masq: bool,
) -> Result<(), FileError> {
    write_atomic(path, render(config, key, mtu, ip_masq).as_bytes())
}

pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    let err = |source| FileError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Parse `KEY=VALUE` lines the way a shell sourcing the file sees simple assignments:
/// comments and blank lines skipped, `export ` allowed, one level of quotes removed.
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(a, b)| v.strip_prefix(*a).and_then(|v| v.strip_suffix(*b)))
            .unwrap_or(v);
        vars.insert(k.trim().to_string(), v.to_string());
    }
    vars
}

pub fn read_env(path: &Path) -> Result<BTreeMap<String, String>, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_env(&text))
}

/// The subnets recorded by a previous run (`FLANNEL_SUBNET`, `FLANNEL_IPV6_SUBNET`), as
/// networks. A missing file or value is `None`; an unreadable one is logged and `None`.
pub fn read_previous_subnets(path: &Path) -> (Option<Ipv4Network>, Option<Ipv6Network>) {
    let vars = match read_env(path) {
        Ok(v) => v,
        Err(FileError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return (None, None);
        }
        Err(e) => {
            warn!("{e}; not reusing a previous subnet");
            return (None, None);
        }
    };
    let v4 = vars.get("FLANNEL_SUBNET").and_then(|s| match s.parse::<Ipv4Network>() {
        Ok(n) if s.contains('/') => Some(Ipv4Network::new(n.network(), n.prefix()).expect("valid prefix")),
        _ => {
            warn!(
                "FLANNEL_SUBNET={s:?} in {} is not an IPv4 CIDR; ignoring it",
                path.display()
            );
            None
        }
    });
    let v6 = vars
        .get("FLANNEL_IPV6_SUBNET")
        .and_then(|s| match s.parse::<Ipv6Network>() {
            Ok(n) if s.contains('/') => Some(Ipv6Network::new(n.network(), n.prefix()).expect("valid prefix")),
            _ => {
                warn!(
                    "FLANNEL_IPV6_SUBNET={s:?} in {} is not an IPv6 CIDR; ignoring it",
                    path.display()
                );
                None
            }
        });
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_only_file_has_no_ipv4_lines_as_flannels() {
        let cfg = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:42::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let key = SubnetKey::parse("0.0.0.0-0&fd00:42:0:7::-64").unwrap();
        assert_eq!(
            render(&cfg, &key, 1450, true),
            "FLANNEL_IPV6_NETWORK=fd00:42::/56\nFLANNEL_IPV6_SUBNET=fd00:42:0:7::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn renders_like_flannel_docs() {
        // Documentation/reservations.md shows this file for lease 10.5.52.0/24.
        let cfg = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let key = SubnetKey::parse("10.5.52.0-24").unwrap();
        assert_eq!(
            render(&cfg, &key, 1450, false),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn renders_dual_stack_like_flannel_docs() {
        // Documentation/configuration.md, "Dual-stack".
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.42.0.0/16","EnableIPv6":true,"IPv6Network":"2001:cafe:42::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let key = SubnetKey::parse("10.42.0.0-24&2001:cafe:42::-64").unwrap();
        assert_eq!(
            render(&cfg, &key, 1450, true),
            "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\nFLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n\
             FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn written_atomically_and_read_back_as_previous_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        let cfg = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        write_subnet_file(&path, &cfg, &SubnetKey::parse("10.5.7.0-24").unwrap(), 1472, true).unwrap();
        write_subnet_file(&path, &cfg, &SubnetKey::parse("10.5.8.0-24").unwrap(), 1472, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        let (v4, v6) = read_previous_subnets(&path);
        assert_eq!(v4, Some("10.5.8.0/24".parse().unwrap()));
        assert_eq!(v6, None);
        assert_eq!(read_previous_subnets(&dir.path().join("absent")), (None, None));
        std::fs::write(&path, "FLANNEL_SUBNET=banana\n").unwrap();
        assert_eq!(read_previous_subnets(&path), (None, None));
    }

    #[test]
    fn env_parsing_handles_shell_forms() {
        let v = parse_env("# c\nexport A=1\nB=\"x y\"\nC='z'\n\nD=\n");
        assert_eq!(v["A"], "1");
        assert_eq!(v["B"], "x y");
        assert_eq!(v["C"], "z");
        assert_eq!(v["D"], "");
    }
}
