//! `/healthz` (alive), `/readyz` (lease held, subnet file written, datapath attached),
//! `/metrics` (Prometheus text) and `/status` (JSON for `overlay status`).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use overlay_common::CounterIndex;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::{backend::Peer, host::Counters, subnet::SubnetKey};

/// What the agent reports; updated by the agent loop, read by the HTTP handlers.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub lease_held: bool,
    pub subnet_file_written: bool,
    pub datapath_attached: bool,
    /// Why the datapath is off its underlay now (the interface gone or being re-attached).
    pub datapath_detached: Option<String>,
    /// Times the datapath was attached again to a re-created or changed underlay.
    pub underlay_reattached: u64,
    /// The network config now in etcd, when it differs from the one in use (not applied).
    pub config_pending: Option<String>,
    pub subnet: Option<String>,
    pub public_ip: Option<String>,
    pub backend: String,
    /// Why `--datapath auto` runs flannel's kernel datapath instead of eBPF here, if it does.
    pub fallback: Option<String>,
    /// What the kernel offers the eBPF datapath (probed at start, completed at attach).
    pub capabilities: Option<serde_json::Value>,
    pub lease_expires: Option<SystemTime>,
    /// The peers the agent wants, by subnet: its one copy of the desired state (see
    /// [`super::peers`]). Kept up to date one event at a time: rebuilding it per event cost
    /// O(peers) and held up the next map update (10 ms at 10,000 peers).
    pub peers: BTreeMap<SubnetKey, Peer>,
    /// Those of `peers` the backend has not taken yet (retried every second).
    pub unapplied: BTreeSet<SubnetKey>,
    pub counters: Option<Counters>,
    /// Counted by the lease manager as it re-establishes a broken watch.
    pub etcd_reconnects: Arc<AtomicU64>,
}

impl Status {
    pub fn ready(&self) -> Result<(), String> {
        if !self.lease_held {
            return Err("no subnet lease yet".into());
        }
        if !self.subnet_file_written {
            return Err("subnet file not written yet".into());
        }
        if let Some(why) = &self.datapath_detached {
            return Err(format!("datapath detached: {why}"));
        }
        if !self.datapath_attached {
            return Err("datapath not attached yet".into());
        }
        Ok(())
    }

    /// The peers in the datapath: wanted and taken by the backend.
    fn programmed_peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers
            .iter()
            .filter(|(k, _)| !self.unapplied.contains(k))
            .map(|(_, p)| p)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ready": self.ready().is_ok(),
            "subnet": self.subnet,
            "public_ip": self.public_ip,
            "backend": self.backend,
            "fallback": self.fallback,
            "capabilities": self.capabilities,
            "lease_expires_unix": self.lease_expires.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
            // A peer of an IPv6-only network shown by its IPv6 side, as our own subnet is.
            "peers": self.programmed_peers().map(|p| serde_json::json!({
                "subnet": p.ipv4().map(|n| n.to_string()).or(p.ipv6.map(|v| v.subnet.to_string())),
                "public_ip": match (p.ipv4(), p.ipv6) {
                    (None, Some(v6)) => v6.public_ip.to_string(),
                    _ => p.public_ip.to_string(),
                },
                "vtep_mac": p.vtep_mac.map(|m| m.to_string()),
                "ipv6_subnet": p.ipv6.map(|v| v.subnet.to_string()), "public_ipv6": p.ipv6.map(|v| v.public_ip.to_string()),
                "vtep_mac_v6": p.ipv6.and_then(|v| v.vtep_mac).map(|m| m.to_string()),
            })).collect::<Vec<_>>(),
            "unapplied_peers": self.unapplied.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "counters": self.counters.as_ref().map(|c| c.to_json()),
            "etcd_reconnects": self.etcd_reconnects.load(Ordering::Relaxed),
            "network_config_pending": self.config_pending,
        })
    }

    pub fn metrics(&self) -> String {
        let mut m = String::new();
        let expiry = self
            .lease_expires
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let _ = writeln!(
            m,
            "# HELP overlay_lease_expiry_timestamp_seconds When our subnet lease expires unless renewed (0: reservation or none)."
        );
        let _ = writeln!(m, "# TYPE overlay_lease_expiry_timestamp_seconds gauge");
        let _ = writeln!(m, "overlay_lease_expiry_timestamp_seconds {expiry}");
        let _ = writeln!(m, "# HELP overlay_peers Remote subnets in the datapath.");
        let _ = writeln!(m, "# TYPE overlay_peers gauge");
        let _ = writeln!(m, "overlay_peers {}", self.programmed_peers().count());
        let _ = writeln!(
            m,
            "# HELP overlay_ready 1 when the lease is held, the subnet file written and the datapath attached."
        );
        let _ = writeln!(m, "# TYPE overlay_ready gauge");
        let _ = writeln!(m, "overlay_ready {}", u8::from(self.ready().is_ok()));
        let _ = writeln!(
            m,
            "# HELP overlay_datapath_attached 1 when the datapath is on its underlay, 0 while it is detached (the interface gone)."
        );
        let _ = writeln!(m, "# TYPE overlay_datapath_attached gauge");
        let attached = self.datapath_attached && self.datapath_detached.is_none();
        let _ = writeln!(m, "overlay_datapath_attached {}", u8::from(attached));
        let _ = writeln!(
            m,
            "# HELP overlay_underlay_reattached_total Times the datapath was attached again to a re-created or changed underlay."
        );
        let _ = writeln!(m, "# TYPE overlay_underlay_reattached_total counter");
        let _ = writeln!(m, "overlay_underlay_reattached_total {}", self.underlay_reattached);
        let _ = writeln!(
            m,
            "# HELP overlay_etcd_reconnects_total Times the etcd watch broke and was re-established by a re-list."
        );
        let _ = writeln!(m, "# TYPE overlay_etcd_reconnects_total counter");
        let _ = writeln!(
            m,
            "overlay_etcd_reconnects_total {}",
            self.etcd_reconnects.load(Ordering::Relaxed)
        );
        if let Some(c) = &self.counters {
            for (metric, help, which) in [
                (
                    "overlay_encapsulated",
                    "encapsulated towards peers",
                    [
                        CounterIndex::EncapUdp,
                        CounterIndex::EncapVxlan,
                        CounterIndex::EncapVxlan6,
                    ],
                ),
                (
                    "overlay_decapsulated",
                    "decapsulated from peers",
                    [
                        CounterIndex::DecapUdp,
                        CounterIndex::DecapVxlan,
                        CounterIndex::DecapVxlan6,
                    ],
                ),
            ] {
                for unit in ["packets", "bytes"] {
                    let _ = writeln!(m, "# HELP {metric}_{unit}_total {unit} {help}, by wire format.");
                    let _ = writeln!(m, "# TYPE {metric}_{unit}_total counter");
                    // vxlan6: VXLAN over IPv6 (flannel-v6.<VNI>'s traffic).
                    for (idx, format) in which.iter().zip(["udp", "vxlan", "vxlan6"]) {
                        let v = c.get(*idx);
                        let n = if unit == "packets" { v.packets } else { v.bytes };
                        let _ = writeln!(m, "{metric}_{unit}_total{{format=\"{format}\"}} {n}");
                    }
                }
            }
            let _ = writeln!(
                m,
                "# HELP overlay_dropped_packets_total Packets the datapath dropped, by reason."
            );
            let _ = writeln!(m, "# TYPE overlay_dropped_packets_total counter");
            for idx in CounterIndex::ALL.iter().filter(|i| i.name().starts_with("drop_")) {
                let _ = writeln!(
                    m,
                    "overlay_dropped_packets_total{{reason=\"{}\"}} {}",
                    &idx.name()[5..],
                    c.get(*idx).packets
                );
            }
            let _ = writeln!(
                m,
                "# HELP overlay_bridge_frames_total Unicast frames on the container bridge's egress: \
                 handed straight to the container's port, or left to the bridge (MAC or its port not known)."
            );
            let _ = writeln!(m, "# TYPE overlay_bridge_frames_total counter");
            for (idx, path) in [
                (CounterIndex::BridgeRedirect, "port"),
                (CounterIndex::BridgeUnknownPort, "bridge"),
            ] {
                let _ = writeln!(
                    m,
                    "overlay_bridge_frames_total{{path=\"{path}\"}} {}",
                    c.get(idx).packets
                );
            }
            // Host routing: packets that skipped the host's stack (netfilter included), and
            // those it handed back for being over the MTU.
            for unit in ["packets", "bytes"] {
                let _ = writeln!(
                    m,
                    "# HELP overlay_host_routing_{unit}_total {unit} past the host's stack (bridge, IP forwarding, \
                     netfilter): into a local container, from one to a peer; oversize: handed to the stack."
                );
                let _ = writeln!(m, "# TYPE overlay_host_routing_{unit}_total counter");
                for (idx, path) in [
                    (CounterIndex::ShortcutToContainer, "to_container"),
                    (CounterIndex::ShortcutFromContainer, "from_container"),
                    (CounterIndex::ShortcutOversize, "oversize"),
                ] {
                    let v = c.get(idx);
                    let n = if unit == "packets" { v.packets } else { v.bytes };
                    let _ = writeln!(m, "overlay_host_routing_{unit}_total{{path=\"{path}\"}} {n}");
                }
            }
        }
        m
    }
}

pub type SharedStatus = Arc<Mutex<Status>>;

/// Serve until the task is dropped. Binding errors are returned at once.
pub async fn serve(addr: SocketAddr, status: SharedStatus) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz, /metrics, /status");
    Ok(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let status = status.clone();
            tokio::spawn(async move {
                // Read the whole request head (up to 4 KiB) before answering: closing on unread
                // bytes would reset the connection under the client.
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                let head_read = async {
                    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => return false,
                            Ok(k) => n += k,
                        }
                    }
                    true
                };
                if !matches!(
                    tokio::time::timeout(std::time::Duration::from_secs(5), head_read).await,
                    Ok(true)
                ) {
                    return;
                }
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (code, ctype, body) = respond(path, &status.lock().expect("status lock").clone());
                let head = format!(
                    "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
            });
        }
    })
}

fn respond(path: &str, status: &Status) -> (&'static str, &'static str, String) {
    match path {
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" => match status.ready() {
            Ok(()) => ("200 OK", "text/plain", "ready\n".into()),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("not ready: {why}\n")),
        },
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", status.metrics()),
        "/status" => ("200 OK", "application/json", status.to_json().to_string()),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /healthz, /readyz, /metrics or /status\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_all_three() {
        let mut s = Status::default();
        assert_eq!(respond("/readyz", &s).0, "503 Service Unavailable");
        s.lease_held = true;
        s.subnet_file_written = true;
        assert!(respond("/readyz", &s).2.contains("datapath"));
        s.datapath_attached = true;
        assert_eq!(respond("/readyz", &s).0, "200 OK");
        s.datapath_detached = Some("underlay interface eth0 is gone".into());
        let (code, _, body) = respond("/readyz", &s);
        assert_eq!(code, "503 Service Unavailable");
        assert!(body.contains("eth0 is gone"), "{body}");
        assert!(s.metrics().contains("overlay_datapath_attached 0"));
        assert_eq!(respond("/healthz", &Status::default()).0, "200 OK");
    }

    #[test]
    fn metrics_carry_counters_by_format_and_reason() {
        let mut c = vec![overlay_common::Counter::default(); CounterIndex::COUNT as usize];
        c[CounterIndex::EncapVxlan as usize] = overlay_common::Counter { packets: 7, bytes: 700 };
        c[CounterIndex::DropNoPeer as usize] = overlay_common::Counter { packets: 3, bytes: 300 };
        c[CounterIndex::BridgeRedirect as usize] = overlay_common::Counter { packets: 5, bytes: 500 };
        c[CounterIndex::ShortcutToContainer as usize] = overlay_common::Counter { packets: 9, bytes: 900 };
        let s = Status {
            counters: Some(Counters(c)),
            ..Default::default()
        };
        let m = s.metrics();
        assert!(
            m.contains("overlay_encapsulated_packets_total{format=\"vxlan\"} 7"),
            "{m}"
        );
        assert!(
            m.contains("overlay_encapsulated_bytes_total{format=\"vxlan\"} 700"),
            "{m}"
        );
        assert!(m.contains("overlay_dropped_packets_total{reason=\"no_peer\"} 3"), "{m}");
        assert!(m.contains("overlay_bridge_frames_total{path=\"port\"} 5"), "{m}");
        assert!(
            m.contains("overlay_host_routing_bytes_total{path=\"to_container\"} 900"),
            "{m}"
        );
        assert!(
            m.contains("overlay_host_routing_packets_total{path=\"from_container\"} 0"),
            "{m}"
        );
    }
}
