//! Bad input in etcd, fuzzed: while two real agents run, random and mutated lease keys and
//! values are written under (and beside) the subnet prefix: every JSON type in every field,
//! huge values, invalid UTF-8, keys outside the prefix, subnets overlapping an agent's own or
//! outside the network; valid leases are written in between. Neither agent may crash, a peer
//! (in `/status` and in the datapath's map) must come from a valid lease, every valid lease
//! must be learned, and a malformed one is warned about by key.
//!
//! Seeded and reproducible: the seed is printed; `OVERLAY_FUZZ_SEED=<n>` replays a run and
//! `OVERLAY_FUZZ_COUNT` sets how many writes (default 400).
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use ipnetwork::Ipv4Network;
use overlay::{backend::ebpf::Programs, host::MacAddr};
use overlay_tests::{cluster::Cluster, lab::workspace_bin};
use serde_json::{Value, json};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
const PREFIX: &str = "/coreos.com/network";

/// xorshift64*: small, and the same sequence for a seed on every machine and version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    /// `min` to `min + spread - 1` random bytes.
    fn bytes(&mut self, min: u64, spread: u64) -> Vec<u8> {
        let len = min + self.below(spread);
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Any JSON value, of every type, some nested, some huge.
fn any_json(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 2 { 8 } else { 10 }) {
        0 => Value::Null,
        1 => json!(rng.chance(2)),
        2 => json!(rng.next() as i64),
        3 => json!((rng.next() as f64) / 7.0),
        4 => json!(format!(
            "{}.{}.{}.{}",
            rng.below(300),
            rng.below(256),
            rng.below(256),
            rng.below(256)
        )),
        5 => json!(String::from_utf8_lossy(&rng.bytes(0, 24)).into_owned()),
        6 => json!("x".repeat(if rng.chance(10) { 200_000 } else { 40 })),
        7 => json!(format!("{:02x}:{:02x}:aa:bb:cc:dd", rng.below(256), rng.below(256))),
        8 => Value::Array((0..rng.below(4)).map(|_| any_json(rng, depth + 1)).collect()),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.below(4) {
                let k = rng.pick(&["VtepMAC", "VNI", "PublicIP", "x"]).to_string();
                m.insert(k, any_json(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

fn valid_lease(ip: Ipv4Addr, mac: &str) -> Value {
    json!({"PublicIP": ip.to_string(), "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": mac}})
}

/// A lease value: valid, with one field replaced by any JSON, mutated bytes, or not JSON.
fn fuzzed_value(rng: &mut Rng) -> Vec<u8> {
    let mut v = valid_lease(
        Ipv4Addr::new(192, 168, 250, 50 + rng.below(50) as u8),
        "02:00:00:00:00:09",
    );
    match rng.below(6) {
        0 => {
            let field = *rng.pick(&["PublicIP", "BackendType", "BackendData"]);
            v[field] = any_json(rng, 0);
            v.to_string().into_bytes()
        }
        1 => {
            let field = *rng.pick(&["VNI", "VtepMAC"]);
            v["BackendData"][field] = any_json(rng, 0);
            v.to_string().into_bytes()
        }
        2 => {
            let mut b = v.to_string().into_bytes();
            for _ in 0..=rng.below(4) {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.next() as u8;
            }
            b
        }
        3 => any_json(rng, 0).to_string().into_bytes(),
        4 => rng.bytes(0, 64),
        _ => {
            let mut b = v.to_string().into_bytes();
            b.truncate(rng.below(b.len() as u64) as usize);
            b
        }
    }
}

/// A key: a well-formed subnet (inside, outside, overlapping an agent's), a mutated one,
/// garbage or invalid UTF-8, or a key beside the subnet prefix.
fn fuzzed_key(rng: &mut Rng, agents: &[Ipv4Network]) -> Vec<u8> {
    let subnets = format!("{PREFIX}/subnets/");
    let segment: Vec<u8> = match rng.below(8) {
        0 => format!("10.244.{}.0-24", rng.below(256)).into_bytes(),
        1 => format!("10.{}.{}.0-24", rng.below(256), rng.below(256)).into_bytes(),
        2 => {
            let ours = rng.pick(agents);
            let len = *rng.pick(&[16u8, 20, 23, 25, 28, 32]);
            let net = Ipv4Network::new(ours.network(), len).unwrap().network();
            format!("{net}-{len}").into_bytes()
        }
        3 => {
            let mut s = format!("10.244.{}.0-24", rng.below(256)).into_bytes();
            let i = rng.below(s.len() as u64) as usize;
            s[i] = *rng.pick(b"0123456789.-/x ");
            s
        }
        4 => rng.bytes(1, 20),
        5 => format!("10.244.{}.{}-{}", rng.below(256), rng.below(256), rng.below(40)).into_bytes(),
        6 => return format!("{PREFIX}/other/{}", rng.below(1000)).into_bytes(),
        _ => return format!("{PREFIX}x/subnets/10.244.{}.0-24", rng.below(256)).into_bytes(),
    };
    [subnets.into_bytes(), segment].concat()
}

/// Whether a peer may come from `key` = `value`, judged here independently of the agent.
fn acceptable(key: &[u8], value: &[u8], agents: &[Ipv4Network]) -> bool {
    let Some(seg) = std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.strip_prefix(&format!("{PREFIX}/subnets/")))
    else {
        return false;
    };
    let Some((ip, len)) = seg.split_once('-') else {
        return false;
    };
    let (Ok(ip), Ok(len)) = (ip.parse::<Ipv4Addr>(), len.parse::<u8>()) else {
        return false;
    };
    let Ok(net) = Ipv4Network::new(ip, len) else {
        return false;
    };
    let network: Ipv4Network = "10.244.0.0/16".parse().unwrap();
    if net.network() != ip || !network.contains(ip) || len < 16 || agents.iter().any(|a| a.overlaps(net)) {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<Value>(value) else {
        return false;
    };
    let ip_ok = v["PublicIP"]
        .as_str()
        .and_then(|s| s.parse::<Ipv4Addr>().ok())
        .is_some_and(|a| !a.is_unspecified());
    let mac_ok = v["BackendData"]["VtepMAC"]
        .as_str()
        .is_some_and(|m| m.parse::<MacAddr>().is_ok());
    ip_ok && v["BackendType"] == "vxlan" && mac_ok
}

/// An agent whose stderr goes to a file, killed when dropped.
struct Agent {
    child: Child,
    log: PathBuf,
    ready: Value,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(c: &mut Cluster, i: usize, dir: &std::path::Path) -> Agent {
    let log = dir.join(format!("agent{i}.log"));
    let mut child = Command::new("ip")
        .args(["netns", "exec", c.lab.host(i).ns.name()])
        .arg(workspace_bin("overlay"))
        .args(c.agent_args(i, &[]).unwrap())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready = serde_json::from_str(&line).unwrap_or_else(|e| panic!("agent {i} not ready ({e}): {line}"));
    Agent { child, log, ready }
}

/// Write `key` = `value` as is, from the switch's namespace where etcd listens.
fn put(c: &Cluster, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
    let (endpoint, key, value) = (c.endpoint(), key.to_vec(), value.to_vec());
    c.switch()
        .spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let mut client = etcd_client::Client::connect([endpoint], None).await?;
                client.put(key, value, None).await?;
                Ok(())
            })
        })
        .join()
        .expect("writer thread")?
}

#[test]
fn fuzzed_leases_in_etcd_while_agents_run() {
    let seed = std::env::var("OVERLAY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let count: usize = std::env::var("OVERLAY_FUZZ_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    eprintln!("etcd fuzz: seed {seed} (OVERLAY_FUZZ_SEED={seed} replays it), {count} writes");
    let mut rng = Rng(seed);

    let mut c = Cluster::new(2, VXLAN).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agents: Vec<Agent> = (1..=2).map(|i| start_agent(&mut c, i, dir.path())).collect();
    let own: Vec<Ipv4Network> = agents
        .iter()
        .map(|a| a.ready["subnet"].as_str().unwrap().parse().unwrap())
        .collect();

    // The last value written at each key, and whether it was a deliberate valid lease.
    let mut written: BTreeMap<Vec<u8>, (Vec<u8>, bool)> = BTreeMap::new();
    let mut valid_written = 0;
    for n in 0..count {
        let (key, value, clean) = if rng.chance(8) {
            // A valid lease in a range the fuzzed keys also hit now and then.
            let third = 100 + rng.below(100);
            let net: Ipv4Network = format!("10.244.{third}.0/24").parse().unwrap();
            if own.iter().any(|o| o.overlaps(net)) {
                continue;
            }
            let key = format!("{PREFIX}/subnets/10.244.{third}.0-24").into_bytes();
            let v = valid_lease(
                Ipv4Addr::new(192, 168, 250, third as u8),
                &format!("02:00:00:00:01:{third:02x}"),
            );
            valid_written += 1;
            (key, v.to_string().into_bytes(), true)
        } else {
            let key = fuzzed_key(&mut rng, &own);
            // The agents' own keys stay theirs: overwriting one is a lease lost, not bad input.
            if own
                .iter()
                .any(|o| key == format!("{PREFIX}/subnets/{}-{}", o.network(), o.prefix()).into_bytes())
            {
                continue;
            }
            (key, fuzzed_value(&mut rng), false)
        };
        put(&c, &key, &value).unwrap_or_else(|e| panic!("write {n} ({}): {e}", String::from_utf8_lossy(&key)));
        written.insert(key, (value, clean));
        for (i, a) in agents.iter_mut().enumerate() {
            if let Ok(Some(status)) = a.child.try_wait() {
                let log = std::fs::read_to_string(&a.log).unwrap_or_default();
                panic!(
                    "agent {} exited ({status}) after write {n} (seed {seed}):\n{log}",
                    i + 1
                );
            }
        }
    }
    eprintln!(
        "{} keys written, {valid_written} valid leases among the writes",
        written.len()
    );

    let other = |i: usize| own[1 - i];
    let wanted: BTreeSet<Ipv4Network> = written
        .iter()
        .filter(|(_, (_, clean))| *clean)
        .map(|(k, _)| {
            let seg = std::str::from_utf8(k)
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .replace('-', "/");
            seg.parse().unwrap()
        })
        .collect();
    for (i, agent) in agents.iter().enumerate() {
        let status = c
            .wait_until("every valid lease is learned", Duration::from_secs(15), || {
                let s = c.status(i + 1)?;
                let peers: BTreeSet<Ipv4Network> = s["peers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["subnet"].as_str()?.parse().ok())
                    .collect();
                Ok(wanted.iter().all(|w| peers.contains(w)) && peers.contains(&other(i)))
            })
            .map(|_| c.status(i + 1).unwrap())
            .unwrap_or_else(|e| panic!("agent {} (seed {seed}): {e}", i + 1));
        let _listed: BTreeSet<Ipv4Network> = status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["subnet"].as_str().unwrap().parse().unwrap())
            .collect();
        // The datapath holds the same peers as /status (once the last events are applied).
        let pin = c.pin_dir(i + 1).unwrap();
        let status_peers = |c: &Cluster| -> anyhow::Result<BTreeSet<Ipv4Network>> {
            Ok(c.status(i + 1)?["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["subnet"].as_str()?.parse().ok())
                .collect())
        };
        let map_peers = || -> anyhow::Result<BTreeSet<Ipv4Network>> {
            Ok(Programs::load_pinned(Some(pin.as_path()))?
                .read_peers()?
                .into_keys()
                .collect())
        };
        let mut last = String::new();
        let agreed = c.wait_until("the datapath map equals /status", Duration::from_secs(5), || {
            let (a, b) = (status_peers(&c)?, map_peers()?);
            last = format!(
                "only in /status: {:?}; only in the map: {:?}",
                a.difference(&b).collect::<Vec<_>>(),
                b.difference(&a).collect::<Vec<_>>()
            );
            Ok(a == b)
        });
        assert!(agreed.is_ok(), "agent {}: {last} (seed {seed})", i + 1);
        let _ = &status;
        let peers = status_peers(&c).unwrap();
        for p in &peers {
            if *p == other(i) {
                continue;
            }
            let key = format!("{PREFIX}/subnets/{}-{}", p.network(), p.prefix()).into_bytes();
            let (value, _) = written
                .get(&key)
                .unwrap_or_else(|| panic!("agent {} has a peer {p} nobody wrote (seed {seed})", i + 1));
            assert!(
                acceptable(&key, value, &own),
                "agent {} took {p} from an invalid lease {:?} (seed {seed})",
                i + 1,
                String::from_utf8_lossy(value)
            );
        }
        // Malformed leases are warned about by key (those whose key prints as written).
        let log = std::fs::read_to_string(&agent.log).unwrap();
        let mut unnamed = Vec::new();
        for (key, (value, _)) in &written {
            let Ok(k) = std::str::from_utf8(key) else { continue };
            let Some(seg) = k.strip_prefix(&format!("{PREFIX}/subnets/")) else {
                continue;
            };
            let printable = seg.chars().all(|ch| ch.is_ascii_alphanumeric() || ".-".contains(ch));
            let json_broken = serde_json::from_slice::<Value>(value).is_err();
            if printable && !seg.is_empty() && json_broken && !log.contains(seg) {
                unnamed.push(seg.to_string());
            }
        }
        assert!(
            unnamed.is_empty(),
            "agent {}: no warning names {unnamed:?} (seed {seed})",
            i + 1
        );
    }
    drop(agents);
}
