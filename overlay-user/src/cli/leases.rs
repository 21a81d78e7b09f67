//! `overlay leases`: every subnet lease with its host, backend data and remaining TTL.

use std::time::Duration;

use crate::subnet::{
    Lease, Registry,
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

pub fn render_table(leases: &[(Lease, Ttl)]) -> String {
    let rows: Vec<[String; 6]> = leases
        .iter()
        .map(|(l, ttl)| {
            // An IPv6-only lease (key `0.0.0.0-0&...`, PublicIP 0.0.0.0, no BackendData) shows
            // no IPv4 subnet, its PublicIPv6 and its BackendV6Data.
            let v6_only = l.key.ipv4_subnet().is_none();
            let public_ip = match (v6_only, l.attrs.public_ipv6) {
                (true, Some(ip)) => ip.to_string(),
                _ => l.attrs.public_ip.to_string(),
            };
            let data = match (v6_only, &l.attrs.backend_v6_data) {
                (true, Some(d)) => Some(d.to_string()),
                _ => l.attrs.backend.data().map(|d| d.to_string()),
            };
            [
                l.key.ipv4_subnet().map_or("-".into(), |n| n.to_string()),
                l.key.ipv6.map_or("-".into(), |n| n.to_string()),
                public_ip,
                l.attrs.backend.type_name().to_string(),
                ttl_text(*ttl),
                data.unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let header = ["SUBNET", "IPV6 SUBNET", "PUBLIC IP", "BACKEND", "TTL", "BACKEND DATA"].map(String::from);
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

pub fn render_json(leases: &[(Lease, Ttl)]) -> String {
    let mut out = String::new();
    for (l, ttl) in leases {
        let v = serde_json::json!({
            "Subnet": l.key.ipv4.to_string(),
            "IPv6Subnet": l.key.ipv6.map(|n| n.to_string()),
            "Attrs": l.attrs,
            "TTLSeconds": ttl.map(|d| d.as_secs()),
            "Reservation": ttl.is_none(),
        });
        out += &format!("{v}\n");
    }
    out
}
