//! The network config flannel keeps at `<prefix>/config`: parse, fill flannel's defaults,
//! validate. Field names, defaults and rules follow flannel's `pkg/subnet/config.go`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay_common::Format;
use serde_json::{Map, Value, json};

/// Linux kernel default VXLAN port, used by flannel when `Backend.Port` is 0 or absent
/// (the wire format owns it).
pub const VXLAN_DEFAULT_PORT: u16 = Format::Vxlan.default_port();
/// flannel's udp backend default port.
pub const UDP_DEFAULT_PORT: u16 = Format::Udp.default_port();
const VNI_MAX: u64 = (1 << 24) - 1;

/// A config that cannot be used; `field` is the JSON field at fault (`Backend.VNI` for nested ones).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    #[error("network config must be a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("network config field {field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl ConfigError {
    fn field(field: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// The field the error is about, if it is about one.
    pub fn field_name(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// The IPv4 address pool: subnets of `subnet_len` from `subnet_min` to `subnet_max` (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Pool {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
}

/// The IPv6 address pool, as [`Ipv4Pool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Pool {
    pub network: Ipv6Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv6Addr,
    pub subnet_max: Ipv6Addr,
}

impl Ipv4Pool {
    /// flannel's `isSubnetConfigCompat`: a lease may be kept if it has our length and lies in range.
    pub fn fits(&self, subnet: Ipv4Network) -> bool {
        subnet.prefix() == self.subnet_len && subnet.network() >= self.subnet_min && subnet.network() <= self.subnet_max
    }
}

impl Ipv6Pool {
    pub fn fits(&self, subnet: Ipv6Network) -> bool {
        subnet.prefix() == self.subnet_len && subnet.network() >= self.subnet_min && subnet.network() <= self.subnet_max
    }
}

/// `Backend` with its options; absent options hold flannel's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Vxlan {
        vni: u32,
        /// 0 means the kernel default, [`VXLAN_DEFAULT_PORT`].
        port: u16,
        gbp: bool,
        learning: bool,
        direct_routing: bool,
        /// 0 means "from the external interface".
        mtu: u32,
    },
    Udp {
        port: u16,
    },
    HostGw,
    /// A `Type` flannel knows (or not) that this agent does not implement: the config parses,
    /// as in flanneld, and the agent stops when it picks the backend (flanneld exits 1 there).
    Unsupported(String),
}

/// The types this agent implements, as error messages list them.
pub const SUPPORTED_BACKENDS: &str = "vxlan, host-gw, udp";
/// Bytes vxlan adds to each packet (outer Ethernet 14, IPv4 20, UDP 8, VXLAN 8), as flannel counts.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The smallest container MTU IPv4 allows hosts to assume (RFC 791).
const MIN_CONTAINER_MTU: u32 = 576;

impl Backend {
    /// The `Type` string flannel uses, also written as a lease's `BackendType`.
    pub fn type_name(&self) -> &str {
        match self {
            Backend::Vxlan { .. } => "vxlan",
            Backend::Udp { .. } => "udp",
            Backend::HostGw => "host-gw",
            Backend::Unsupported(t) => t,
        }
    }

    /// The MTU of vxlan's device and containers (`FLANNEL_MTU`): flannel's `Backend.MTU` is the
    /// MTU before encapsulation (vxlan/device.go sets the device to `MTU - 50`, and
    /// vxlan_network.go's `MTU()` reports the same). None: from the interface.
    pub fn vxlan_container_mtu(config_mtu: u32) -> Option<u32> {
        (config_mtu > 0).then(|| config_mtu.saturating_sub(VXLAN_OVERHEAD))
    }
}

/// A validated network config with flannel's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// `None` when `EnableIPv4` is false.
    pub ipv4: Option<Ipv4Pool>,
    /// `Some` when `EnableIPv6` is true.
    pub ipv6: Option<Ipv6Pool>,
    pub enable_nftables: bool,
    pub backend: Backend,
}

/// Top-level JSON object with Go's case-insensitive field matching (encoding/json matches
/// `"network"` to `Network`), so configs flannel accepts are accepted here too.
struct Fields<'a> {
    prefix: &'static str,
    by_lower: HashMap<String, &'a Value>,
}

impl<'a> Fields<'a> {
    fn new(prefix: &'static str, map: &'a Map<String, Value>) -> Self {
        let mut by_lower = HashMap::new();
        // An exact-case key wins over a case-folded one, as in encoding/json.
        for (k, v) in map {
            by_lower.entry(k.to_ascii_lowercase()).or_insert(v);
        }
        for (k, v) in map {
            if by_lower.contains_key(&k.to_ascii_lowercase()) && is_canonical(k) {
                by_lower.insert(k.to_ascii_lowercase(), v);
            }
        }
        Fields { prefix, by_lower }
    }

    fn name(&self, field: &str) -> String {
        format!("{}{}", self.prefix, field)
    }

    /// JSON `null` reads as absent, as Go leaves the zero value.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.by_lower
            .get(&field.to_ascii_lowercase())
            .copied()
            .filter(|v| !v.is_null())
    }

    fn bool(&self, field: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(field) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ConfigError::field(
                &self.name(field),
                format!("expected true or false, found {v}"),
            )),
        }
    }

    fn uint(&self, field: &str, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                Some(n) => Err(ConfigError::field(
                    &self.name(field),
                    format!("{n} is above the maximum {max}"),
                )),
                None => Err(ConfigError::field(
                    &self.name(field),
                    format!("expected a non-negative integer, found {v}"),
                )),
            },
        }
    }

    fn string(&self, field: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ConfigError::field(
                &self.name(field),
                format!("expected a string, found {v}"),
            )),
        }
    }
}

fn is_canonical(key: &str) -> bool {
    const KNOWN: &[&str] = &[
        "EnableIPv4", "EnableIPv6", "EnableNFTables", "Network", "IPv6Network", "SubnetLen", "SubnetMin", "SubnetMax",
        "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "Backend", "Type", "VNI", "Port", "GBP", "Learning",
        "DirectRouting", "MTU",
    ];
    KNOWN.contains(&key)
}

fn parse_v4_net(field: &str, s: &str) -> Result<Ipv4Network, ConfigError> {
    // Go's net.ParseCIDR: a prefix length is required and host bits are masked off.
    let (_, len) = s
        .split_once('/')
        .ok_or_else(|| ConfigError::field(field, format!("{s:?} is not an IPv4 CIDR (like 10.244.0.0/16)")))?;
    let net: Ipv4Network = s
        .parse()
        .map_err(|_| ConfigError::field(field, format!("{s:?} is not an IPv4 CIDR (like 10.244.0.0/16)")))?;
    if len.is_empty() {
        return Err(ConfigError::field(field, format!("{s:?} has no prefix length")));
    }
    Ok(Ipv4Network::new(net.network(), net.prefix()).expect("prefix already checked"))
}

fn parse_v6_net(field: &str, s: &str) -> Result<Ipv6Network, ConfigError> {
    let bad = || ConfigError::field(field, format!("{s:?} is not an IPv6 CIDR (like fc00::/48)"));
    if !s.contains('/') {
        return Err(bad());
    }
    let net: Ipv6Network = s.parse().map_err(|_| bad())?;
    Ok(Ipv6Network::new(net.network(), net.prefix()).expect("prefix already checked"))
}

fn parse_v4_addr(fields: &Fields, field: &str) -> Result<Option<Ipv4Addr>, ConfigError> {
    let Some(s) = fields.string(field)? else {
        return Ok(None);
    };
    let addr: Ipv4Addr = s
        .parse()
        .map_err(|_| ConfigError::field(&fields.name(field), format!("{s:?} is not an IPv4 address")))?;
    // flannel treats 0.0.0.0 as "not set".
    Ok((!addr.is_unspecified()).then_some(addr))
}

fn parse_v6_addr(fields: &Fields, field: &str) -> Result<Option<Ipv6Addr>, ConfigError> {
    let Some(s) = fields.string(field)? else {
        return Ok(None);
    };
    let addr: Ipv6Addr = s
        .parse()
        .map_err(|_| ConfigError::field(&fields.name(field), format!("{s:?} is not an IPv6 address")))?;
    Ok((!addr.is_unspecified()).then_some(addr))
}

impl NetworkConfig {
    /// Parse the JSON stored at `<prefix>/config`, fill defaults and validate.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let map = match &value {
            Value::Object(m) => m,
            Value::Null => return Err(ConfigError::NotAnObject("null")),
            Value::Array(_) => return Err(ConfigError::NotAnObject("an array")),
            Value::String(_) => return Err(ConfigError::NotAnObject("a string")),
            Value::Number(_) => return Err(ConfigError::NotAnObject("a number")),
            Value::Bool(_) => return Err(ConfigError::NotAnObject("a boolean")),
        };
        let f = Fields::new("", map);

        let enable_ipv4 = f.bool("EnableIPv4", true)?;
        let enable_ipv6 = f.bool("EnableIPv6", false)?;
        let enable_nftables = f.bool("EnableNFTables", false)?;
        if !enable_ipv4 && !enable_ipv6 {
            return Err(ConfigError::field("EnableIPv4", "neither IPv4 nor IPv6 is enabled"));
        }

        let ipv4 = if enable_ipv4 { Some(v4_pool(&f)?) } else { None };
        let ipv6 = if enable_ipv6 { Some(v6_pool(&f)?) } else { None };
        let backend = parse_backend(f.get("Backend"))?;
        Ok(NetworkConfig {
            ipv4,
            ipv6,
            enable_nftables,
            backend,
        })
    }

    /// Refuse what this agent does not do, naming the type or field: a backend type it does not
    /// implement, and vxlan options it would otherwise ignore.
    pub fn check_supported(&self) -> Result<(), ConfigError> {
        match &self.backend {
            Backend::Unsupported(t) => Err(ConfigError::field(
                "Backend.Type",
                format!("unsupported backend {t:?}; this agent supports {SUPPORTED_BACKENDS}"),
            )),
            Backend::Vxlan { gbp, learning, .. } => {
                let refused = [
                    (
                        *gbp, "Backend.GBP", "Group Based Policy marks are not carried by this agent",
                    ),
                    (
                        *learning,
                        "Backend.Learning",
                        "the vxlan device's address learning is not implemented here",
                    ),
                ];
                match refused.into_iter().find(|(on, _, _)| *on) {
                    Some((_, field, why)) => Err(ConfigError::field(
                        field,
                        format!("true is refused: {why}; remove it or set false"),
                    )),
                    None => Ok(()),
                }
            }
            Backend::Udp { .. } if self.ipv6.is_some() => Err(ConfigError::field(
                "EnableIPv6",
                "the udp backend carries IPv4 only (flannel's udp backend has no IPv6); \
                 use vxlan or host-gw for IPv6, or set EnableIPv6 false",
            )),
            Backend::Udp { .. } | Backend::HostGw => Ok(()),
        }
    }

    /// The config with every default spelled out, in flannel's field names.
    pub fn to_effective_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("EnableIPv4".into(), json!(self.ipv4.is_some()));
        m.insert("EnableIPv6".into(), json!(self.ipv6.is_some()));
        if self.enable_nftables {
            m.insert("EnableNFTables".into(), json!(true));
        }
        if let Some(p) = &self.ipv4 {
            m.insert("Network".into(), json!(p.network.to_string()));
            m.insert("SubnetLen".into(), json!(p.subnet_len));
            m.insert("SubnetMin".into(), json!(p.subnet_min.to_string()));
            m.insert("SubnetMax".into(), json!(p.subnet_max.to_string()));
        }
        if let Some(p) = &self.ipv6 {
            m.insert("IPv6Network".into(), json!(p.network.to_string()));
            m.insert("IPv6SubnetLen".into(), json!(p.subnet_len));
            m.insert("IPv6SubnetMin".into(), json!(p.subnet_min.to_string()));
            m.insert("IPv6SubnetMax".into(), json!(p.subnet_max.to_string()));
        }
        let backend = match &self.backend {
            Backend::Vxlan {
                vni,
                port,
                gbp,
                learning,
                direct_routing,
                mtu,
            } => json!({
                "Type": "vxlan", "VNI": vni,
                "Port": if *port == 0 { VXLAN_DEFAULT_PORT } else { *port },
                "GBP": gbp, "Learning": learning, "DirectRouting": direct_routing, "MTU": mtu,
            }),
            Backend::Udp { port } => json!({ "Type": "udp", "Port": port }),
            Backend::HostGw => json!({ "Type": "host-gw" }),
            Backend::Unsupported(t) => json!({ "Type": t }),
        };
        m.insert("Backend".into(), backend);
        Value::Object(m)
    }
}

fn v4_pool(f: &Fields) -> Result<Ipv4Pool, ConfigError> {
    let network = match f.string("Network")? {
        Some(s) => parse_v4_net("Network", s)?,
        None => {
            return Err(ConfigError::field(
                "Network", "missing; an IPv4 CIDR such as 10.244.0.0/16 is required",
            ));
        }
    };
    let prefix = network.prefix();
    let subnet_len = match f.uint("SubnetLen", u64::from(u8::MAX))?.unwrap_or(0) as u8 {
        0 if prefix > 28 => {
            // Four subnets of at least four addresses each, the first one unused.
            return Err(ConfigError::field(
                "Network",
                format!("{network} is too small; the smallest useful network is a /28"),
            ));
        }
        0 if prefix <= 22 => 24,
        0 => prefix + 2,
        len if len > 30 => {
            return Err(ConfigError::field(
                "SubnetLen",
                format!("/{len} is too long; it must be /30 or shorter"),
            ));
        }
        len if len < prefix + 2 => {
            return Err(ConfigError::field(
                "SubnetLen",
                format!(
                    "/{len} is too short for {network}: the network must hold at least four subnets (/{} or longer)",
                    prefix + 2
                ),
            ));
        }
        len => len,
    };
    let size = 1u64 << (32 - subnet_len);
    let start = u64::from(u32::from(network.network()));
    let end = start + (1u64 << (32 - prefix)) - 1;
    let mask = u32::MAX << (32 - subnet_len);
    let check = |field: &str, addr: Ipv4Addr| -> Result<Ipv4Addr, ConfigError> {
        if !network.contains(addr) {
            return Err(ConfigError::field(field, format!("{addr} is not in Network {network}")));
        }
        if u32::from(addr) & mask != u32::from(addr) {
            return Err(ConfigError::field(
                field,
                format!("{addr} is not on a /{subnet_len} boundary (SubnetLen)"),
            ));
        }
        Ok(addr)
    };
    let subnet_min = match parse_v4_addr(f, "SubnetMin")? {
        Some(a) => check("SubnetMin", a)?,
        // The first subnet is skipped: its first address is the network address.
        None => Ipv4Addr::from((start + size) as u32),
    };
    let subnet_max = match parse_v4_addr(f, "SubnetMax")? {
        Some(a) => check("SubnetMax", a)?,
        None => Ipv4Addr::from((end + 1 - size) as u32),
    };
    if subnet_min > subnet_max {
        return Err(ConfigError::field(
            "SubnetMin",
            format!("{subnet_min} is above SubnetMax {subnet_max}"),
        ));
    }
    Ok(Ipv4Pool {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

fn v6_pool(f: &Fields) -> Result<Ipv6Pool, ConfigError> {
    let network = match f.string("IPv6Network")? {
        Some(s) => parse_v6_net("IPv6Network", s)?,
        None => {
            return Err(ConfigError::field(
                "IPv6Network", "missing; EnableIPv6 needs an IPv6 CIDR such as fc00::/48",
            ));
        }
    };
    let prefix = network.prefix();
    let subnet_len = match f.uint("IPv6SubnetLen", u64::from(u8::MAX))?.unwrap_or(0) as u8 {
        0 if prefix > 124 => {
            return Err(ConfigError::field(
                "IPv6Network",
                format!("{network} is too small; the smallest useful network is a /124"),
            ));
        }
        0 if prefix <= 62 => 64,
        0 => prefix + 2,
        len if len > 126 => {
            return Err(ConfigError::field(
                "IPv6SubnetLen",
                format!("/{len} is too long; it must be /126 or shorter"),
            ));
        }
        len if len < prefix + 2 => {
            return Err(ConfigError::field(
                "IPv6SubnetLen",
                format!(
                    "/{len} is too short for {network}: the network must hold at least four subnets (/{} or longer)",
                    prefix + 2
                ),
            ));
        }
        len => len,
    };
    let size = 1u128 << (128 - subnet_len);
    let start = u128::from(network.network());
    let host_mask = if prefix == 0 {
        u128::MAX
    } else {
        (1u128 << (128 - prefix)) - 1
    };
    let end = start | host_mask;
    let mask = u128::MAX << (128 - subnet_len);
    let check = |field: &str, addr: Ipv6Addr| -> Result<Ipv6Addr, ConfigError> {
        if !network.contains(addr) {
            return Err(ConfigError::field(
                field,
                format!("{addr} is not in IPv6Network {network}"),
            ));
        }
        if u128::from(addr) & mask != u128::from(addr) {
            return Err(ConfigError::field(
                field,
                format!("{addr} is not on a /{subnet_len} boundary (IPv6SubnetLen)"),
            ));
        }
        Ok(addr)
    };
    let subnet_min = match parse_v6_addr(f, "IPv6SubnetMin")? {
        Some(a) => check("IPv6SubnetMin", a)?,
        None => Ipv6Addr::from(start + size),
    };
    let subnet_max = match parse_v6_addr(f, "IPv6SubnetMax")? {
        Some(a) => check("IPv6SubnetMax", a)?,
        None => Ipv6Addr::from(end - size + 1),
    };
    if subnet_min > subnet_max {
        return Err(ConfigError::field(
            "IPv6SubnetMin",
            format!("{subnet_min} is above IPv6SubnetMax {subnet_max}"),
        ));
    }
    Ok(Ipv6Pool {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

fn parse_backend(value: Option<&Value>) -> Result<Backend, ConfigError> {
    // flannel's parseBackendType: no Backend at all means udp.
    let Some(value) = value else {
        return Ok(Backend::Udp { port: UDP_DEFAULT_PORT });
    };
    let Value::Object(map) = value else {
        return Err(ConfigError::field(
            "Backend",
            format!("expected an object such as {{\"Type\": \"vxlan\"}}, found {value}"),
        ));
    };
    let f = Fields::new("Backend.", map);
    let port = |default: u16| -> Result<u16, ConfigError> {
        Ok(f.uint("Port", u64::from(u16::MAX))?.map_or(default, |p| p as u16))
    };
    match f.string("Type")? {
        None => Err(ConfigError::field(
            "Backend.Type",
            format!("missing; one of {SUPPORTED_BACKENDS}"),
        )),
        Some("vxlan") => Ok(Backend::Vxlan {
            vni: f.uint("VNI", VNI_MAX)?.map_or(1, |v| v as u32),
            port: port(0)?,
            gbp: f.bool("GBP", false)?,
            learning: f.bool("Learning", false)?,
            direct_routing: f.bool("DirectRouting", false)?,
            mtu: match f.uint("MTU", u64::from(u16::MAX))?.unwrap_or(0) as u32 {
                mtu @ 1.. if mtu < MIN_CONTAINER_MTU + VXLAN_OVERHEAD => {
                    return Err(ConfigError::field(
                        "Backend.MTU",
                        format!(
                            "{mtu} leaves {} for containers after vxlan's {VXLAN_OVERHEAD} bytes; \
                             it is the MTU before encapsulation and must be at least {}",
                            mtu.saturating_sub(VXLAN_OVERHEAD),
                            MIN_CONTAINER_MTU + VXLAN_OVERHEAD
                        ),
                    ));
                }
                mtu => mtu,
            },
        }),
        Some("udp") => Ok(Backend::Udp {
            port: port(UDP_DEFAULT_PORT)?,
        }),
        Some("host-gw") => Ok(Backend::HostGw),
        Some(other) => Ok(Backend::Unsupported(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn flannel_documentation_example_parses_with_its_values() {
        // Documentation/configuration.md, "Example configuration JSON".
        let doc = r#"{
	"Network": "10.0.0.0/8",
	"SubnetLen": 20,
	"SubnetMin": "10.10.0.0",
	"SubnetMax": "10.99.0.0",
	"Backend": {
		"Type": "udp",
		"Port": 7890
	}
}"#;
        let c = NetworkConfig::parse(doc).unwrap();
        let p = c.ipv4.unwrap();
        assert_eq!(p.network, "10.0.0.0/8".parse().unwrap());
        assert_eq!(p.subnet_len, 20);
        assert_eq!(p.subnet_min, v4("10.10.0.0"));
        assert_eq!(p.subnet_max, v4("10.99.0.0"));
        assert_eq!(c.backend, Backend::Udp { port: 7890 });
        assert!(c.ipv6.is_none());
    }

    #[test]
    fn defaults_follow_flannel() {
        let cases = [
            // (network, SubnetLen, SubnetMin, SubnetMax)
            ("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0"),
            ("10.5.0.0/22", 24, "10.5.1.0", "10.5.3.0"),
            ("10.5.0.0/23", 25, "10.5.0.128", "10.5.1.128"),
            ("10.5.0.0/28", 30, "10.5.0.4", "10.5.0.12"),
            ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
        ];
        for (net, len, min, max) in cases {
            let c = NetworkConfig::parse(&format!(r#"{{"Network":"{net}"}}"#)).unwrap();
            let p = c.ipv4.unwrap();
            assert_eq!(
                (p.subnet_len, p.subnet_min, p.subnet_max),
                (len, v4(min), v4(max)),
                "{net}"
            );
        }
    }

    #[test]
    fn missing_backend_is_udp_and_vxlan_options_are_read() {
        let c = NetworkConfig::parse(r#"{"Network":"10.1.0.0/16"}"#).unwrap();
        assert_eq!(c.backend, Backend::Udp { port: UDP_DEFAULT_PORT });
        let c = NetworkConfig::parse(
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","VNI":42,"Port":4789,"DirectRouting":true,"MTU":1400}}"#,
        )
        .unwrap();
        assert_eq!(
            c.backend,
            Backend::Vxlan {
                vni: 42,
                port: 4789,
                gbp: false,
                learning: false,
                direct_routing: true,
                mtu: 1400
            }
        );
        let c = NetworkConfig::parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert!(matches!(c.backend, Backend::Vxlan { vni: 1, port: 0, .. }));
        let c = NetworkConfig::parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap();
        assert_eq!(c.backend, Backend::HostGw);
    }

    #[test]
    fn field_names_match_case_insensitively_like_go() {
        let c = NetworkConfig::parse(r#"{"network":"10.1.0.0/16","subnetlen":26,"backend":{"type":"vxlan","vni":7}}"#)
            .unwrap();
        assert_eq!(c.ipv4.unwrap().subnet_len, 26);
        assert!(matches!(c.backend, Backend::Vxlan { vni: 7, .. }));
    }

    #[test]
    fn network_host_bits_are_masked_like_parsecidr() {
        let c = NetworkConfig::parse(r#"{"Network":"10.1.2.3/16"}"#).unwrap();
        assert_eq!(c.ipv4.unwrap().network, "10.1.0.0/16".parse().unwrap());
    }

    #[test]
    fn udp_with_ipv6_is_refused_naming_enable_ipv6() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.42.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:42::/56","Backend":{"Type":"udp"}}"#,
        )
        .unwrap();
        let e = c.check_supported().unwrap_err();
        assert_eq!(e.field_name(), Some("EnableIPv6"));
        assert!(e.to_string().contains("udp"), "{e}");
        let v4 = NetworkConfig::parse(r#"{"Network":"10.42.0.0/16","Backend":{"Type":"udp"}}"#).unwrap();
        assert!(v4.check_supported().is_ok());
        let v6only = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:42::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert!(v6only.ipv4.is_none() && v6only.check_supported().is_ok());
        let v6only_udp = NetworkConfig::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:42::/56","Backend":{"Type":"udp"}}"#,
        )
        .unwrap();
        let e = v6only_udp.check_supported().unwrap_err();
        assert_eq!(e.field_name(), Some("EnableIPv6"), "{e}");
    }

    #[test]
    fn ipv6_defaults_and_dual_stack() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.42.0.0/16","EnableIPv6":true,"IPv6Network":"2001:cafe:42::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let p = c.ipv6.unwrap();
        assert_eq!(p.subnet_len, 64);
        assert_eq!(p.subnet_min, "2001:cafe:42:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.subnet_max, "2001:cafe:42:ff::".parse::<Ipv6Addr>().unwrap());
        let c = NetworkConfig::parse(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/120"}"#).unwrap();
        assert!(c.ipv4.is_none());
        assert_eq!(c.ipv6.unwrap().subnet_len, 122);
    }

    #[test]
    fn invalid_configs_name_the_field_and_reason() {
        let cases: &[(&str, &str, &str)] = &[
            (r#"{}"#, "Network", "missing"),
            (r#"{"Network":"10.1.0.0"}"#, "Network", "not an IPv4 CIDR"),
            (r#"{"Network":"banana/8"}"#, "Network", "not an IPv4 CIDR"),
            (r#"{"Network":10}"#, "Network", "expected a string"),
            (r#"{"Network":"10.1.0.0/29"}"#, "Network", "too small"),
            (r#"{"Network":"10.1.0.0/16","SubnetLen":31}"#, "SubnetLen", "too long"),
            (
                r#"{"Network":"10.1.0.0/16","SubnetLen":17}"#, "SubnetLen", "at least four subnets",
            ),
            (
                r#"{"Network":"10.1.0.0/16","SubnetLen":-1}"#, "SubnetLen", "non-negative integer",
            ),
            (
                r#"{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}"#, "SubnetMin", "not in Network",
            ),
            (
                r#"{"Network":"10.1.0.0/16","SubnetMax":"10.1.3.5"}"#, "SubnetMax", "boundary",
            ),
            (
                r#"{"Network":"10.1.0.0/16","SubnetMin":"x"}"#, "SubnetMin", "not an IPv4 address",
            ),
            (
                r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.9.0","SubnetMax":"10.1.3.0"}"#,
                "SubnetMin",
                "above",
            ),
            (
                r#"{"Network":"10.1.0.0/16","EnableIPv6":true}"#, "IPv6Network", "missing",
            ),
            (
                r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/125"}"#,
                "IPv6Network",
                "too small",
            ),
            (
                r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":127}"#,
                "IPv6SubnetLen",
                "too long",
            ),
            (
                r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc01::"}"#,
                "IPv6SubnetMin",
                "not in IPv6Network",
            ),
            (
                r#"{"Network":"10.1.0.0/16","EnableIPv4":"yes"}"#, "EnableIPv4", "true or false",
            ),
            (r#"{"EnableIPv4":false}"#, "EnableIPv4", "neither"),
            (
                r#"{"Network":"10.1.0.0/16","Backend":"vxlan"}"#, "Backend", "expected an object",
            ),
            (r#"{"Network":"10.1.0.0/16","Backend":{}}"#, "Backend.Type", "missing"),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","MTU":600}}"#,
                "Backend.MTU",
                "before encapsulation",
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#,
                "Backend.VNI",
                "maximum",
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","Port":70000}}"#,
                "Backend.Port",
                "maximum",
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Port":"x"}}"#,
                "Backend.Port",
                "integer",
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","DirectRouting":1}}"#,
                "Backend.DirectRouting",
                "true or false",
            ),
        ];
        for (json, field, why) in cases {
            let err = NetworkConfig::parse(json).expect_err(json);
            assert_eq!(err.field_name(), Some(*field), "{json}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(field) && msg.contains(why), "{json}: {msg}");
        }
        assert!(matches!(NetworkConfig::parse("{"), Err(ConfigError::Json(_))));
        assert!(matches!(NetworkConfig::parse("[]"), Err(ConfigError::NotAnObject(_))));
    }

    #[test]
    fn unsupported_types_and_ignored_vxlan_fields_are_refused_by_name() {
        for t in [
            "wireguard", "ipip", "ipsec", "alloc", "extension", "tencent-vpc", "gce", "aws-vpc", "ali-vpc", "banana",
        ] {
            let c = NetworkConfig::parse(&format!(r#"{{"Network":"10.1.0.0/16","Backend":{{"Type":"{t}"}}}}"#))
                .expect("flanneld parses any type");
            let e = c.check_supported().expect_err(t);
            let msg = e.to_string();
            assert_eq!(e.field_name(), Some("Backend.Type"));
            assert!(
                msg.contains(&format!("{t:?}")) && msg.contains(SUPPORTED_BACKENDS),
                "{msg}"
            );
        }
        for field in ["GBP", "Learning"] {
            let c = NetworkConfig::parse(&format!(
                r#"{{"Network":"10.1.0.0/16","Backend":{{"Type":"vxlan","{field}":true}}}}"#
            ))
            .unwrap();
            let e = c.check_supported().expect_err(field);
            assert_eq!(e.field_name(), Some(format!("Backend.{field}").as_str()), "{e}");
        }
        for ok in [
            VXLAN_CONFIG_WITH_FALSE_OPTIONS,
            r#"{"Network":"10.1.0.0/16"}"#,
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
        ] {
            NetworkConfig::parse(ok).unwrap().check_supported().unwrap();
        }
    }

    const VXLAN_CONFIG_WITH_FALSE_OPTIONS: &str =
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","GBP":false,"Learning":false,"DirectRouting":false}}"#;

    #[test]
    fn vxlan_mtu_is_before_encapsulation() {
        assert_eq!(Backend::vxlan_container_mtu(0), None);
        assert_eq!(Backend::vxlan_container_mtu(9000), Some(8950));
        assert_eq!(Backend::vxlan_container_mtu(626), Some(576));
        let c = NetworkConfig::parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","MTU":626}}"#).unwrap();
        assert!(matches!(c.backend, Backend::Vxlan { mtu: 626, .. }));
    }

    #[test]
    fn effective_json_round_trips() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.1.0.0/16","SubnetLen":25,"EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan","VNI":3}}"#,
        )
        .unwrap();
        let again = NetworkConfig::parse(&c.to_effective_json().to_string()).unwrap();
        assert_eq!(again.ipv4, c.ipv4);
        assert_eq!(again.ipv6, c.ipv6);
        assert!(matches!(
            again.backend,
            Backend::Vxlan {
                vni: 3,
                port: VXLAN_DEFAULT_PORT,
                ..
            }
        ));
    }

    #[test]
    fn pool_fits_checks_length_and_range() {
        let p = NetworkConfig::parse(r#"{"Network":"10.1.0.0/16"}"#)
            .unwrap()
            .ipv4
            .unwrap();
        assert!(p.fits("10.1.7.0/24".parse().unwrap()));
        assert!(
            !p.fits("10.1.0.0/24".parse().unwrap()),
            "first subnet is below SubnetMin"
        );
        assert!(!p.fits("10.1.7.0/25".parse().unwrap()));
        assert!(!p.fits("10.2.7.0/24".parse().unwrap()));
    }
}
