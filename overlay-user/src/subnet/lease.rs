//! Leases as flannel stores them: the key `10.244.7.0-24` (dual stack:
//! `10.244.7.0-24&fc00:0:0:7::-64`), the JSON value, and the events a watch turns into.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    time::SystemTime,
};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::host::MacAddr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("key {key:?} is not a subnet key (expected e.g. 10.244.7.0-24)")]
    BadKey { key: String },
    #[error("value of {key:?} is not flannel lease JSON: {reason}")]
    BadValue { key: String, reason: String },
}

/// The subnet(s) a lease is for; its string form is the last part of the etcd key.
///
/// An IPv6-only lease has no IPv4 subnet; flannel writes its empty one all the same
/// (`0.0.0.0-0&fd00:0:0:1::-64`), and so do we: `ipv4` is then `0.0.0.0/0`
/// ([`SubnetKey::NO_IPV4`]), which [`SubnetKey::ipv4_subnet`] reports as None.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    pub ipv4: Ipv4Network,
    pub ipv6: Option<Ipv6Network>,
}

impl SubnetKey {
    /// flannel's empty `IP4Net`, the IPv4 part of an IPv6-only key.
    pub const NO_IPV4: Ipv4Network = match Ipv4Network::new_checked(Ipv4Addr::UNSPECIFIED, 0) {
        Some(n) => n,
        None => panic!("0.0.0.0/0 is a network"),
    };

    pub fn new(ipv4: Ipv4Network, ipv6: Option<Ipv6Network>) -> Self {
        SubnetKey { ipv4, ipv6 }
    }

    /// The key of an IPv6-only lease, as flannel writes it.
    pub fn ipv6_only(ipv6: Ipv6Network) -> Self {
        SubnetKey {
            ipv4: Self::NO_IPV4,
            ipv6: Some(ipv6),
        }
    }

    /// The IPv4 subnet, None for an IPv6-only lease.
    pub fn ipv4_subnet(&self) -> Option<Ipv4Network> {
        (self.ipv4 != Self::NO_IPV4).then_some(self.ipv4)
    }

    /// Parse the last segment of a lease key. Strict: the address must be the subnet's network
    /// address, so a hand-written `10.244.7.5-24` is refused rather than silently renamed.
    pub fn parse(segment: &str) -> Result<Self, LeaseError> {
        let bad = || LeaseError::BadKey {
            key: segment.to_string(),
        };
        let (v4, v6) = match segment.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (segment, None),
        };
        let ipv4 = parse_part::<Ipv4Addr>(v4, 32).ok_or_else(bad)?;
        let ipv4 = Ipv4Network::new(ipv4.0, ipv4.1).map_err(|_| bad())?;
        if ipv4.network() != ipv4.ip() {
            return Err(bad());
        }
        let ipv6 = match v6 {
            None => None,
            Some(s) => {
                let (ip, len) = parse_part::<Ipv6Addr>(s, 128).ok_or_else(bad)?;
                let net = Ipv6Network::new(ip, len).map_err(|_| bad())?;
                if net.network() != ip {
                    return Err(bad());
                }
                Some(net)
            }
        };
        Ok(SubnetKey { ipv4, ipv6 })
    }
}

fn parse_part<A: std::str::FromStr>(s: &str, max: u8) -> Option<(A, u8)> {
    let (ip, len) = s.rsplit_once('-')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    (len <= max).then_some(())?;
    Some((ip.parse().ok()?, len))
}

impl std::fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ipv4.network(), self.ipv4.prefix())?;
        if let Some(v6) = self.ipv6 {
            write!(f, "&{}-{}", v6.network(), v6.prefix())?;
        }
        Ok(())
    }
}

/// The lease value as flannel's `LeaseAttrs` marshals it:
/// `{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{...}}`.
/// `BackendType` and `BackendData` are read once, into [`LeaseBackend`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RawLeaseAttrs", into = "RawLeaseAttrs")]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend: LeaseBackend,
    pub backend_v6_data: Option<Value>,
}

/// The JSON shape, field for field.
#[derive(Serialize, Deserialize)]
struct RawLeaseAttrs {
    #[serde(rename = "PublicIP", default = "unspecified_v4")]
    public_ip: Ipv4Addr,
    /// flannel writes `null` when unset, so no `skip_serializing_if` here.
    #[serde(rename = "PublicIPv6", default)]
    public_ipv6: Option<Ipv6Addr>,
    /// Empty for flannel's udp backend, which omits the field.
    #[serde(rename = "BackendType", default, skip_serializing_if = "String::is_empty")]
    backend_type: String,
    #[serde(rename = "BackendData", default, skip_serializing_if = "Option::is_none")]
    backend_data: Option<Value>,
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "Option::is_none")]
    backend_v6_data: Option<Value>,
}

fn unspecified_v4() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

impl From<RawLeaseAttrs> for LeaseAttrs {
    fn from(raw: RawLeaseAttrs) -> Self {
        LeaseAttrs {
            public_ip: raw.public_ip,
            public_ipv6: raw.public_ipv6,
            backend: LeaseBackend::parse(raw.backend_type, raw.backend_data),
            backend_v6_data: raw.backend_v6_data,
        }
    }
}

impl From<LeaseAttrs> for RawLeaseAttrs {
    fn from(attrs: LeaseAttrs) -> Self {
        RawLeaseAttrs {
            public_ip: attrs.public_ip,
            public_ipv6: attrs.public_ipv6,
            backend_type: attrs.backend.written_type().to_string(),
            backend_data: attrs.backend.data(),
            backend_v6_data: attrs.backend_v6_data,
        }
    }
}

impl LeaseAttrs {
    pub fn new(public_ip: Ipv4Addr, backend: LeaseBackend) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend,
            backend_v6_data: None,
        }
    }

    /// Our IPv6 side: `PublicIPv6` and, for vxlan, `BackendV6Data` (the v6 device's VtepMAC).
    pub fn with_ipv6(mut self, public_ipv6: Ipv6Addr, v6_data: Option<VxlanData>) -> Self {
        self.public_ipv6 = Some(public_ipv6);
        self.backend_v6_data = v6_data.map(|v| v.to_json());
        self
    }

    /// `BackendV6Data` read as vxlan's (`{"VNI":1,"VtepMAC":"..."}`); None when absent.
    pub fn vxlan_v6(&self) -> Result<Option<VxlanData>, String> {
        match &self.backend_v6_data {
            None => Ok(None),
            Some(data) => VxlanData::parse(data, "BackendV6Data").map(Some),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("lease attributes always serialize")
    }

    /// Parse a lease value; `key` only names the lease in the error.
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Self, LeaseError> {
        let bad = |reason: String| LeaseError::BadValue {
            key: key.to_string(),
            reason,
        };
        // Go's decoder refuses an array where a struct is expected; serde would accept one.
        match serde_json::from_slice::<Value>(bytes).map_err(|e| bad(e.to_string()))? {
            v @ Value::Object(_) => serde_json::from_value(v).map_err(|e| bad(e.to_string())),
            other => Err(bad(format!("expected a JSON object, found {other}"))),
        }
    }
}

/// The backends whose leases we can be peers of: flannel's `Type` in the network config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Udp,
    Vxlan,
    HostGw,
}

impl BackendKind {
    /// flannel's name for it, in the config's `Type`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Udp => "udp",
            BackendKind::Vxlan => "vxlan",
            BackendKind::HostGw => "host-gw",
        }
    }
}

/// vxlan's `BackendData` (and `BackendV6Data`): `{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanData {
    pub vni: u32,
    pub vtep_mac: MacAddr,
}

impl VxlanData {
    pub fn to_json(&self) -> Value {
        serde_json::json!({"VNI": self.vni, "VtepMAC": self.vtep_mac.to_string()})
    }

    /// Read `field` (`BackendData` or `BackendV6Data`) of a vxlan lease; the error says why not.
    fn parse(data: &Value, field: &str) -> Result<Self, String> {
        let Value::Object(fields) = data else {
            return Err(format!("vxlan lease whose {field} is not an object"));
        };
        // flannel's struct has VNI as an int: absent reads as 0.
        let vni = match fields.get("VNI") {
            None => Some(0),
            Some(v) => v.as_u64().and_then(|v| u32::try_from(v).ok()),
        };
        let vni = vni.ok_or_else(|| format!("vxlan lease whose {field}.VNI is not a number"))?;
        let mac = fields
            .get("VtepMAC")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("vxlan lease without {field}.VtepMAC"))?;
        let vtep_mac = mac.parse::<MacAddr>()?;
        Ok(VxlanData { vni, vtep_mac })
    }
}

/// A lease's `BackendType` with its `BackendData`, read once when the lease is read. A lease
/// whose data we cannot use still holds its subnet, so it is kept, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseBackend {
    /// flannel's udp backend writes no `BackendType`.
    Udp,
    Vxlan(VxlanData),
    HostGw,
    /// A backend we do not speak (wireguard, ipip...), kept as written.
    Unsupported {
        backend_type: String,
        data: Option<Value>,
    },
    /// A backend we speak whose data is unusable (a vxlan lease without a VtepMAC, say).
    Invalid {
        backend_type: String,
        data: Option<Value>,
        reason: String,
    },
}

impl LeaseBackend {
    fn parse(backend_type: String, data: Option<Value>) -> Self {
        let invalid = |reason: &str, backend_type: String, data: Option<Value>| LeaseBackend::Invalid {
            backend_type,
            data,
            reason: reason.to_string(),
        };
        match backend_type.as_str() {
            "" | "udp" => LeaseBackend::Udp,
            "host-gw" => LeaseBackend::HostGw,
            "vxlan" => {
                let Some(value) = &data else {
                    return invalid("vxlan lease without BackendData", backend_type, data);
                };
                match VxlanData::parse(value, "BackendData") {
                    Ok(v) => LeaseBackend::Vxlan(v),
                    Err(e) => invalid(&e, backend_type, data),
                }
            }
            _ => LeaseBackend::Unsupported { backend_type, data },
        }
    }

    pub fn kind(&self) -> Option<BackendKind> {
        match self {
            LeaseBackend::Udp => Some(BackendKind::Udp),
            LeaseBackend::Vxlan(_) => Some(BackendKind::Vxlan),
            LeaseBackend::HostGw => Some(BackendKind::HostGw),
            LeaseBackend::Unsupported { .. } | LeaseBackend::Invalid { .. } => None,
        }
    }

    /// The `BackendType` as the lease writes it (empty for udp, as flannel writes it).
    pub fn written_type(&self) -> &str {
        match self {
            LeaseBackend::Udp => "",
            LeaseBackend::Vxlan(_) => "vxlan",
            LeaseBackend::HostGw => "host-gw",
            LeaseBackend::Unsupported { backend_type, .. } | LeaseBackend::Invalid { backend_type, .. } => backend_type,
        }
    }

    /// The backend's name for people: `udp` for the lease that writes none.
    pub fn type_name(&self) -> &str {
        match self.written_type() {
            "" => "udp",
            t => t,
        }
    }

    /// `BackendData` as JSON.
    pub fn data(&self) -> Option<Value> {
        match self {
            LeaseBackend::Udp | LeaseBackend::HostGw => None,
            LeaseBackend::Vxlan(v) => Some(v.to_json()),
            LeaseBackend::Unsupported { data, .. } | LeaseBackend::Invalid { data, .. } => data.clone(),
        }
    }
}

/// A subnet lease as read from (or written to) the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    /// The etcd lease holding the key; 0 means a reservation, which never expires.
    pub lease_id: i64,
    /// When the lease runs out, where known (acquire/renew, or a listing that asked for TTLs).
    pub expires: Option<SystemTime>,
    /// etcd's mod revision of the key, for compare-and-swap updates.
    pub mod_revision: i64,
}

impl Lease {
    /// Build a lease from a stored key segment and value; errors name `full_key`.
    pub fn from_kv(
        full_key: &str,
        segment: &str,
        value: &[u8],
        lease_id: i64,
        mod_revision: i64,
    ) -> Result<Self, LeaseError> {
        let key = SubnetKey::parse(segment).map_err(|_| LeaseError::BadKey {
            key: full_key.to_string(),
        })?;
        let attrs = LeaseAttrs::from_json(full_key, value)?;
        Ok(Lease {
            key,
            attrs,
            lease_id,
            expires: None,
            mod_revision,
        })
    }

    pub fn is_reservation(&self) -> bool {
        self.lease_id == 0
    }

    pub fn subnet(&self) -> Ipv4Network {
        self.key.ipv4
    }
}

/// What a watch tells the agent about other hosts' leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Added(Lease),
    /// Same subnet, different attributes (e.g. a new VtepMAC after a peer restart).
    Changed(Lease),
    Removed(Lease),
    /// Our own lease was lost and acquired again; the subnet may differ.
    Reacquired(Lease),
}

/// A change seen on the registry, before it is compared with what we know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    Put(Lease),
    Deleted(SubnetKey),
}

/// The set of peer leases we have told the consumer about. Turns raw changes and full
/// re-lists into events, so a re-list after a gap emits only the difference.
#[derive(Debug, Clone, Default)]
pub struct LeaseSet {
    known: BTreeMap<SubnetKey, Lease>,
}

impl LeaseSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.known.values()
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Apply one change. A put that repeats what we know (a renewal, a replayed event) is silent.
    pub fn apply(&mut self, event: RegistryEvent) -> Option<LeaseEvent> {
        match event {
            RegistryEvent::Put(lease) => match self.known.get(&lease.key) {
                Some(old) if old.attrs == lease.attrs => {
                    self.known.insert(lease.key, lease);
                    None
                }
                Some(_) => {
                    self.known.insert(lease.key, lease.clone());
                    Some(LeaseEvent::Changed(lease))
                }
                None => {
                    self.known.insert(lease.key, lease.clone());
                    Some(LeaseEvent::Added(lease))
                }
            },
            RegistryEvent::Deleted(key) => self.known.remove(&key).map(LeaseEvent::Removed),
        }
    }

    /// Replace what we know with a full listing; returns the difference as events.
    pub fn reset(&mut self, snapshot: Vec<Lease>) -> Vec<LeaseEvent> {
        let fresh: BTreeMap<SubnetKey, Lease> = snapshot.into_iter().map(|l| (l.key, l)).collect();
        let old = std::mem::replace(&mut self.known, fresh);
        let mut events = Vec::new();
        for (key, was) in &old {
            match self.known.get(key) {
                None => events.push(LeaseEvent::Removed(was.clone())),
                Some(now) if now.attrs != was.attrs => events.push(LeaseEvent::Changed(now.clone())),
                Some(_) => {}
            }
        }
        for (key, now) in &self.known {
            if !old.contains_key(key) {
                events.push(LeaseEvent::Added(now.clone()));
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip_and_flannel_format() {
        let k = SubnetKey::parse("10.244.7.0-24").unwrap();
        assert_eq!(k.ipv4, "10.244.7.0/24".parse().unwrap());
        assert_eq!(k.to_string(), "10.244.7.0-24");
        let k = SubnetKey::parse("10.42.1.0-24&2001:cafe:42:1::-64").unwrap();
        assert_eq!(k.ipv6, Some("2001:cafe:42:1::/64".parse().unwrap()));
        assert_eq!(k.to_string(), "10.42.1.0-24&2001:cafe:42:1::-64");
    }

    #[test]
    fn ipv6_only_key_is_flannels_empty_ipv4_and_the_ipv6_subnet() {
        let k = SubnetKey::parse("0.0.0.0-0&fd00:0:0:1::-64").unwrap();
        assert_eq!(k.ipv4_subnet(), None);
        assert_eq!(k, SubnetKey::ipv6_only("fd00:0:0:1::/64".parse().unwrap()));
        assert_eq!(k.to_string(), "0.0.0.0-0&fd00:0:0:1::-64");
        let dual = SubnetKey::parse("10.244.1.0-24&fd00:0:0:1::-64").unwrap();
        assert_eq!(dual.ipv4_subnet(), Some("10.244.1.0/24".parse().unwrap()));
    }

    #[test]
    fn dual_stack_lease_json_as_flannel_writes_it() {
        // flannel's vxlan newSubnetAttrs with both devices: BackendV6Data has the v6 device's MAC.
        let doc = r#"{"PublicIP":"192.168.1.2","PublicIPv6":"fd01::2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:02"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:66:00:02"}}"#;
        let a = LeaseAttrs::from_json("k", doc.as_bytes()).unwrap();
        assert_eq!(a.public_ipv6, Some("fd01::2".parse().unwrap()));
        let v6 = a.vxlan_v6().unwrap().unwrap();
        assert_eq!(v6.vtep_mac.to_string(), "aa:bb:cc:66:00:02");
        assert_eq!(a.to_json(), doc);
        let ours = LeaseAttrs::new(
            "192.168.1.2".parse().unwrap(),
            LeaseBackend::Vxlan(VxlanData {
                vni: 1,
                vtep_mac: "aa:bb:cc:00:00:02".parse().unwrap(),
            }),
        )
        .with_ipv6("fd01::2".parse().unwrap(), Some(v6));
        assert_eq!(ours.to_json(), doc, "we write what flannel writes");
        let bad = LeaseAttrs::from_json(
            "k",
            br#"{"PublicIP":"192.168.1.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:02"},"BackendV6Data":{"VNI":1}}"#,
        )
        .unwrap();
        assert!(bad.vxlan_v6().unwrap_err().contains("BackendV6Data.VtepMAC"));
        // host-gw: PublicIPv6 only.
        let hg = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd01::3","BackendType":"host-gw"}"#;
        let a = LeaseAttrs::from_json("k", hg.as_bytes()).unwrap();
        assert_eq!(a.vxlan_v6(), Ok(None));
        assert_eq!(a.to_json(), hg);
    }

    #[test]
    fn bad_keys_are_refused_with_the_key_named() {
        for bad in [
            "config", "10.244.7.0", "10.244.7.0-33", "10.244.7.5-24", "10.244.7.0-2x", "x-24", "10.244.7.0-24&zz-64",
            "",
        ] {
            let err = SubnetKey::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn lease_json_from_flannel_docs_parses_and_reserializes_identically() {
        // Documentation/reservations.md.
        let doc = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let a = LeaseAttrs::from_json("k", doc.as_bytes()).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(
            a.backend,
            LeaseBackend::Vxlan(VxlanData {
                vni: 1,
                vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap()
            })
        );
        assert_eq!(a.to_json(), doc);
    }

    #[test]
    fn udp_lease_has_no_backend_type() {
        let a = LeaseAttrs::new(Ipv4Addr::new(10, 0, 0, 1), LeaseBackend::Udp);
        assert_eq!(a.to_json(), r#"{"PublicIP":"10.0.0.1","PublicIPv6":null}"#);
        let back = LeaseAttrs::from_json("k", a.to_json().as_bytes()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn bad_lease_json_names_the_key() {
        for bad in [
            "{", r#"{"PublicIP":"nope"}"#, "[]", r#"{"PublicIP":"10.0.0.1","PublicIPv6":"x"}"#,
        ] {
            let err = LeaseAttrs::from_json("/coreos.com/network/subnets/10.1.2.0-24", bad.as_bytes()).unwrap_err();
            assert!(err.to_string().contains("10.1.2.0-24"), "{err}");
        }
    }

    fn lease(key: &str, ip: [u8; 4]) -> Lease {
        Lease {
            key: SubnetKey::parse(key).unwrap(),
            attrs: LeaseAttrs::new(ip.into(), LeaseBackend::HostGw),
            lease_id: 1,
            expires: None,
            mod_revision: 1,
        }
    }

    #[test]
    fn lease_set_emits_add_change_remove_once() {
        let mut s = LeaseSet::new();
        let a = lease("10.1.1.0-24", [1, 1, 1, 1]);
        assert_eq!(
            s.apply(RegistryEvent::Put(a.clone())),
            Some(LeaseEvent::Added(a.clone()))
        );
        assert_eq!(s.apply(RegistryEvent::Put(a.clone())), None, "repeat is silent");
        let mut a2 = a.clone();
        a2.attrs.public_ip = [2, 2, 2, 2].into();
        assert_eq!(
            s.apply(RegistryEvent::Put(a2.clone())),
            Some(LeaseEvent::Changed(a2.clone()))
        );
        assert_eq!(s.apply(RegistryEvent::Deleted(a.key)), Some(LeaseEvent::Removed(a2)));
        assert_eq!(s.apply(RegistryEvent::Deleted(a.key)), None);
    }

    #[test]
    fn lease_set_reset_emits_only_the_difference() {
        let mut s = LeaseSet::new();
        let (a, b, c) = (
            lease("10.1.1.0-24", [1; 4]),
            lease("10.1.2.0-24", [2; 4]),
            lease("10.1.3.0-24", [3; 4]),
        );
        s.reset(vec![a.clone(), b.clone()]);
        let mut b2 = b.clone();
        b2.attrs.backend = LeaseBackend::Udp;
        let events = s.reset(vec![b2.clone(), c.clone()]);
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events.contains(&LeaseEvent::Removed(a)));
        assert!(events.contains(&LeaseEvent::Changed(b2.clone())));
        assert!(events.contains(&LeaseEvent::Added(c.clone())));
        assert!(s.reset(vec![b2, c]).is_empty());
    }

    #[test]
    fn backend_data_is_read_once_and_bad_data_kept_with_the_reason() {
        let parse = |json: &str| LeaseAttrs::from_json("k", json.as_bytes()).unwrap().backend;
        assert_eq!(parse(r#"{"PublicIP":"10.0.0.1"}"#), LeaseBackend::Udp);
        assert_eq!(
            parse(r#"{"PublicIP":"10.0.0.1","BackendType":"host-gw"}"#),
            LeaseBackend::HostGw
        );
        for (json, why) in [
            (r#"{"BackendType":"vxlan"}"#, "without BackendData"),
            (
                r#"{"BackendType":"vxlan","BackendData":{"VNI":1}}"#, "without BackendData.VtepMAC",
            ),
            (
                r#"{"BackendType":"vxlan","BackendData":{"VNI":"1","VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
                "VNI",
            ),
            (
                r#"{"BackendType":"vxlan","BackendData":{"VtepMAC":"aa:bb"}}"#,
                "invalid MAC",
            ),
        ] {
            match parse(json) {
                LeaseBackend::Invalid { reason, .. } => assert!(reason.contains(why), "{json}: {reason}"),
                other => panic!("{json}: {other:?}"),
            }
        }
        let wg = parse(r#"{"BackendType":"wireguard","BackendData":{"PublicKey":"x"}}"#);
        assert_eq!(wg.kind(), None);
        assert_eq!(wg.type_name(), "wireguard");
        let again = LeaseAttrs::from_json(
            "k",
            LeaseAttrs::new(Ipv4Addr::LOCALHOST, wg.clone()).to_json().as_bytes(),
        );
        assert_eq!(again.unwrap().backend, wg, "kept as written");
    }
}
