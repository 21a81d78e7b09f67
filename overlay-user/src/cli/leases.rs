//! `overlay leases`: every subnet lease with its host, backend data and remaining TTL.

use std::time::Duration;

use crate::subnet::{
    Lease, LeaseAttrs, Registry, SubnetKey,
    etcd::{EtcdArgs, EtcdRegistry},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let reg = EtcdRegistry::connect(&args.etcd).await?;
        let leases = list(&reg).await?;
        print!(
            "{}",
            if args.json {
                render_json(&leases)
            } else {
                render_table(&leases)
            }
        );
        Ok(())
    })
}

/// Remaining time of a lease: `None` for a reservation.
pub type Ttl = Option<Duration>;

/// Leases sorted by subnet, each with its remaining TTL; malformed entries are warned about.
pub async fn list(reg: &impl Registry) -> anyhow::Result<Vec<(Lease, Ttl)>> {
    let listing = reg.list().await?;
    for e in &listing.skipped {
        tracing::warn!("skipping malformed lease: {e}");
    }
    let mut out = Vec::new();
    for l in listing.leases {
        let ttl = if l.is_reservation() {
            None
        } else {
            // Expired between the listing and now: show 0 rather than fail.
            Some(reg.time_to_live(l.lease_id).await?.unwrap_or_default())
        };
        out.push((l, ttl));
    }
    out.sort_by_key(|(l, _)| l.key);
    Ok(out)
}

fn ttl_text(ttl: Ttl) -> String {
    match ttl {
        None => "reservation".into(),
        Some(d) => {
            let s = d.as_secs();
            format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
        }
    }
}

/// The IPv4 subnet, or "-" for an IPv6-only lease, whose key carries flannel's empty
/// `0.0.0.0/0` in its place.
fn ipv4_text(key: &SubnetKey) -> String {
    key.ipv4_subnet().map_or("-".into(), |n| n.to_string())
}

/// BackendData, then BackendV6Data (the IPv6 device's) as `v6 {...}` where the lease has one.
fn backend_data_text(attrs: &LeaseAttrs) -> String {
    let parts: Vec<String> = [
        attrs.backend.data().map(|d| d.to_string()),
        attrs.backend_v6_data.as_ref().map(|d| format!("v6 {d}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() { "-".into() } else { parts.join(" ") }
}

pub fn render_table(leases: &[(Lease, Ttl)]) -> String {
    let rows: Vec<[String; 7]> = leases
        .iter()
        .map(|(l, ttl)| {
            [
                ipv4_text(&l.key),
                l.key.ipv6.map_or("-".into(), |n| n.to_string()),
                if l.key.ipv4_subnet().is_some() {
                    l.attrs.public_ip.to_string()
                } else {
                    "-".into()
                },
                l.attrs.public_ipv6.map_or("-".into(), |ip| ip.to_string()),
                l.attrs.backend.type_name().to_string(),
                ttl_text(*ttl),
                backend_data_text(&l.attrs),
            ]
        })
        .collect();
    let header = [
        "SUBNET", "IPV6 SUBNET", "PUBLIC IP", "PUBLIC IPV6", "BACKEND", "TTL", "BACKEND DATA",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

/// One object per lease: `Key` is the last part of its etcd key as flannel writes it (the
/// lease's identifier, `0.0.0.0-0&...` for an IPv6-only one); `Subnet` is null where the lease
/// has no IPv4, as `IPv6Subnet` is where it has no IPv6.
pub fn render_json(leases: &[(Lease, Ttl)]) -> String {
    let mut out = String::new();
    for (l, ttl) in leases {
        let v = serde_json::json!({
            "Key": l.key.to_string(),
            "Subnet": l.key.ipv4_subnet().map(|n| n.to_string()),
            "IPv6Subnet": l.key.ipv6.map(|n| n.to_string()),
            "Attrs": l.attrs,
            "TTLSeconds": ttl.map(|d| d.as_secs()),
            "Reservation": ttl.is_none(),
        });
        out += &format!("{v}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::{LeaseBackend, VxlanData};

    fn lease(key: &str, value: &str) -> Lease {
        let key = SubnetKey::parse(key).unwrap();
        Lease {
            key,
            attrs: LeaseAttrs::from_json(&key.to_string(), value.as_bytes()).unwrap(),
            lease_id: 1,
            expires: None,
            mod_revision: 1,
        }
    }

    /// An IPv4 lease, a dual-stack one and an IPv6-only one, as flannel writes them.
    fn leases() -> Vec<(Lease, Ttl)> {
        let ttl = Some(Duration::from_secs(3600 + 61));
        vec![
            (
                lease(
                    "10.244.1.0-24",
                    r#"{"PublicIP":"192.168.1.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}}"#,
                ),
                ttl,
            ),
            (
                lease(
                    "10.244.2.0-24&fd00:0:0:2::-64",
                    r#"{"PublicIP":"192.168.1.2","PublicIPv6":"fc00::2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"},"BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:06:02"}}"#,
                ),
                ttl,
            ),
            (
                lease(
                    "0.0.0.0-0&fd00:0:0:3::-64",
                    r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fc00::3","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:06:03"}}"#,
                ),
                None,
            ),
        ]
    }

    #[test]
    fn table_shows_ipv6_only_leases_by_their_ipv6_side() {
        let leases = leases();
        assert!(matches!(leases[2].0.attrs.backend, LeaseBackend::VxlanNoIpv4));
        let table = render_table(&leases);
        let expected = "\
SUBNET         IPV6 SUBNET      PUBLIC IP    PUBLIC IPV6  BACKEND  TTL          BACKEND DATA
10.244.1.0/24  -                192.168.1.1  -            vxlan    1h01m01s     {\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:01\"}
10.244.2.0/24  fd00:0:0:2::/64  192.168.1.2  fc00::2      vxlan    1h01m01s     {\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:02\"} v6 {\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:06:02\"}
-              fd00:0:0:3::/64  -            fc00::3      vxlan    reservation  v6 {\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:06:03\"}
";
        assert_eq!(table, expected);
        assert!(!table.contains("0.0.0.0"), "{table}");
        let v6 = VxlanData {
            vni: 1,
            vtep_mac: "0e:00:00:00:06:03".parse().unwrap(),
        };
        assert_eq!(leases[2].0.attrs.vxlan_v6().unwrap(), Some(v6));
    }

    #[test]
    fn json_names_each_lease_by_its_flannel_key() {
        let out = render_json(&leases());
        let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["Key"], "10.244.1.0-24");
        assert_eq!(rows[0]["Subnet"], "10.244.1.0/24");
        assert!(rows[0]["IPv6Subnet"].is_null());
        assert_eq!(rows[1]["Key"], "10.244.2.0-24&fd00:0:0:2::-64");
        assert_eq!(rows[1]["IPv6Subnet"], "fd00:0:0:2::/64");
        assert_eq!(rows[2]["Key"], "0.0.0.0-0&fd00:0:0:3::-64");
        assert!(rows[2]["Subnet"].is_null(), "{}", rows[2]);
        assert_eq!(rows[2]["IPv6Subnet"], "fd00:0:0:3::/64");
        assert_eq!(rows[2]["Attrs"]["PublicIPv6"], "fc00::3");
        assert_eq!(rows[2]["Reservation"], true);
        assert_eq!(rows[1]["TTLSeconds"], 3661);
    }
}
