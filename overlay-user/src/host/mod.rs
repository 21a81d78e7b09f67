//! Host plumbing every backend uses, with nothing of the eBPF loader in it: links, addresses,
//! routes and sysctls ([`netdev`]), MAC addresses as leases write them, and the datapath
//! counters as the agent reports them.
pub mod linkwatch;
pub mod netdev;

use std::{fmt, str::FromStr};

use overlay_common::{Counter, CounterIndex};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("interface {name}: {reason}")]
    Interface { name: String, reason: String },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("sysctl {key}: {message}")]
    Sysctl { key: String, message: String },
    #[error("{0}")]
    Setup(String),
}

/// A MAC address as flannel writes it in leases (`"VtepMAC":"aa:bb:cc:dd:ee:ff"`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "invalid MAC address {s:?}: expected six hex bytes separated by ':'"
            ));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16)
                .ok()
                .filter(|_| p.len() == 2)
                .ok_or_else(|| format!("invalid MAC address {s:?}: {p:?} is not a hex byte"))?;
        }
        Ok(MacAddr(out))
    }
}

/// Per-counter totals over all CPUs, indexed as the eBPF programs count; the userspace
/// forwarder reports in the same table so `/metrics` reads one shape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub Vec<Counter>);

impl Counters {
    pub fn get(&self, index: CounterIndex) -> Counter {
        self.0.get(index as usize).copied().unwrap_or_default()
    }

    /// Non-zero counters by name, for logs, JSON and metrics.
    pub fn nonzero(&self) -> Vec<(&'static str, Counter)> {
        CounterIndex::ALL
            .iter()
            .map(|&i| (i.name(), self.get(i)))
            .filter(|(_, c)| c.packets != 0)
            .collect()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for &i in CounterIndex::ALL.iter() {
            let c = self.get(i);
            m.insert(
                i.name().into(),
                serde_json::json!({"packets": c.packets, "bytes": c.bytes}),
            );
        }
        serde_json::Value::Object(m)
    }
}
