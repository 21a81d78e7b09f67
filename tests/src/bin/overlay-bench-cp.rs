//! `overlay-bench-cp` (`cargo xtask bench --control-plane`): the agent's control plane at scale,
//! against a real etcd.
//!
//! One host in a namespace lab with etcd on the switch, as the agent tests run it (`Cluster`).
//! Before the agent starts, etcd holds `--leases` peer leases (flannel vxlan JSON, distinct
//! PublicIPs and VtepMACs) in a 10.0.0.0/8 network cut into /24s. Figures:
//! - sync: agent start (process spawn) to every peer in the pinned `OVL_PEERS_V1` map, read
//!   from this process through the pin, so it is what the datapath sees;
//! - resident memory (VmRSS, and the peak VmHWM) of the agent with all peers;
//! - idle CPU: the agent's utime+stime over `--idle` seconds with nothing changing;
//! - change-to-map: `--changes` lease writes back to back (half new leases, half VtepMAC changes
//!   of existing ones), each timed from just before its etcd put to the first poll of the map
//!   that shows the new value; p50, p99, max.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
use overlay_common::{MAP_PEERS, Peer};
use overlay_tests::cluster::Cluster;
use serde_json::{Value, json};

const CONFIG: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
/// The issue's goals.
const GOAL_SYNC_S: f64 = 1.0;
const GOAL_P99_MS: f64 = 10.0;
const GOAL_RSS_MB: f64 = 30.0;

const USAGE: &str = "\
overlay-bench-cp: the agent's control plane at scale, against a real etcd on the lab's switch.

Usage: overlay-bench-cp [--leases N] [--changes N] [--idle SECS] [--json PATH]
       (also as `overlay-bench --control-plane ...` and `cargo xtask bench --control-plane`)

  --leases N     peer leases in etcd before the agent starts (default 10000)
  --changes N    lease writes in the burst, timed write to map (default 1000)
  --idle SECS    window for the agent's idle CPU (default 10)
  --quick        smoke run: 1000 leases, 100 changes, 2 s idle
  --json PATH    every figure (default target/bench/control-plane.json)

Needs root, etcd (etcd-server) and the `overlay` binary next to this one.";

struct Options {
    leases: usize,
    changes: usize,
    idle: u64,
    json: PathBuf,
}

fn parse_args() -> anyhow::Result<Option<Options>> {
    let mut o = Options {
        leases: 10_000,
        changes: 1000,
        idle: 10,
        json: PathBuf::from("target/bench/control-plane.json"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().with_context(|| format!("{flag} needs a value\n\n{USAGE}"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--control-plane" => {}
            "--leases" => o.leases = value("--leases")?.parse().context("--leases: not a number")?,
            "--changes" => o.changes = value("--changes")?.parse().context("--changes: not a number")?,
            "--idle" => o.idle = value("--idle")?.parse().context("--idle: not a number of seconds")?,
            "--quick" => (o.leases, o.changes, o.idle) = (1000, 100, 2),
            "--json" => o.json = value("--json")?.into(),
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    // 10.1.0.0/24 up: 254 * 256 /24s for existing plus new leases.
    if o.leases == 0 || o.leases + o.changes > 254 * 256 {
        bail!(
            "--leases must be 1 or more, and --leases + --changes at most {}",
            254 * 256
        );
    }
    Ok(Some(o))
}

/// The n-th lease of the bench: subnet 10.(1 + n/256).(n%256).0/24.
fn subnet_octets(n: usize) -> [u8; 4] {
    [10, (1 + n / 256) as u8, (n % 256) as u8, 0]
}

fn lease_key(n: usize) -> String {
    let o = subnet_octets(n);
    format!("/coreos.com/network/subnets/{}.{}.{}.{}-24", o[0], o[1], o[2], o[3])
}

/// PublicIP 172.16.0.0/12 + n: data only, nothing is ever sent there.
fn public_ip(n: usize) -> [u8; 4] {
    let x = 0xac10_0000u32 + 1 + n as u32;
    x.to_be_bytes()
}

fn vtep_mac(n: usize, generation: u8) -> [u8; 6] {
    [0x02, 0xbe, generation, (n >> 16) as u8, (n >> 8) as u8, n as u8]
}

fn lease_value(n: usize, generation: u8) -> String {
    let ip = public_ip(n);
    let mac = vtep_mac(n, generation);
    format!(
        r#"{{"PublicIP":"{}.{}.{}.{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}"}}}}"#,
        ip[0], ip[1], ip[2], ip[3], mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

fn expected_peer(n: usize, generation: u8) -> Peer {
    Peer {
        public_ip: public_ip(n),
        vtep_mac: vtep_mac(n, generation),
        _pad: [0; 2],
    }
}

type PeersMap = LpmTrie<MapData, [u8; 4], Peer>;

fn open_peers(path: &Path) -> anyhow::Result<PeersMap> {
    let data = MapData::from_pin(path).with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(LpmTrie::try_from(Map::LpmTrie(data))?)
}

/// Wait up to `timeout` for the agent to pin its peers map; then open it.
fn wait_for_peers_map(path: &Path, timeout: Duration) -> anyhow::Result<PeersMap> {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists()
            && let Ok(m) = open_peers(path)
        {
            return Ok(m);
        }
        if Instant::now() > deadline {
            bail!("{} not pinned after {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Run `f` with an etcd client on a thread inside the switch namespace, where etcd listens.
fn with_etcd<T: Send + 'static>(
    cluster: &Cluster,
    f: impl FnOnce(etcd_client::Client, tokio::runtime::Runtime) -> anyhow::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<anyhow::Result<T>>> {
    let endpoint = cluster.endpoint();
    cluster.switch().spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = rt
            .block_on(etcd_client::Client::connect([endpoint.as_str()], None))
            .with_context(|| format!("connecting to etcd at {endpoint}"))?;
        f(client, rt)
    })
}

fn join<T>(h: std::thread::JoinHandle<anyhow::Result<anyhow::Result<T>>>, what: &str) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("{what}: thread panicked"))?
        .and_then(|r| r)
        .with_context(|| what.to_string())
}

/// The agent's memory lines of /proc/pid/status, in MB (10^6 bytes): VmRSS and its parts
/// (anonymous: heap and stacks; file: the mapped binary and libraries), VmHWM (peak).
fn memory_breakdown(pid: u32) -> anyhow::Result<Value> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut m = serde_json::Map::new();
    for field in ["VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "VmData", "Threads"] {
        if let Some(v) = status.lines().find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        }) {
            let v = if field == "Threads" { v } else { v * 1024.0 / 1e6 };
            m.insert(field.to_string(), json!(v));
        }
    }
    Ok(Value::Object(m))
}

/// (VmRSS, VmHWM) of `pid` in MB (10^6 bytes).
fn memory_mb(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |field: &str| -> Option<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse::<f64>().ok())
    };
    Ok((
        kb("VmRSS:").context("no VmRSS")? * 1024.0 / 1e6,
        kb("VmHWM:").context("no VmHWM")? * 1024.0 / 1e6,
    ))
}

/// utime + stime of `pid` (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("unreadable /proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let ticks = f.get(11).context("no utime")?.parse::<u64>()? + f.get(12).context("no stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i]
}

fn main() -> anyhow::Result<()> {
    let Some(opts) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    if !nix::unistd::geteuid().is_root() {
        bail!("overlay-bench-cp needs root: it creates network namespaces and the agent loads eBPF programs");
    }
    let report = run(&opts)?;
    print_report(&report);
    if let Some(dir) = opts.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", opts.json.display()))?;
    println!("raw figures: {}", opts.json.display());
    Ok(())
}

fn run(opts: &Options) -> anyhow::Result<Value> {
    println!(
        "overlay-bench-cp: {} leases, {} changes, {} s idle window; kernel {}, load {}",
        opts.leases,
        opts.changes,
        opts.idle,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    let mut cluster = Cluster::new(1, CONFIG).context("starting the lab with etcd")?;

    // The leases, in transactions of 100 puts (etcd's default limit is 128 operations).
    let t = Instant::now();
    let n = opts.leases;
    join(
        with_etcd(&cluster, move |mut client, rt| {
            rt.block_on(async {
                for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
                    let ops: Vec<etcd_client::TxnOp> = chunk
                        .iter()
                        .map(|&i| etcd_client::TxnOp::put(lease_key(i), lease_value(i, 0), None))
                        .collect();
                    client.txn(etcd_client::Txn::new().and_then(ops)).await?;
                }
                anyhow::Ok(())
            })
        }),
        "writing the leases",
    )?;
    println!("wrote {n} leases in {:.2} s", t.elapsed().as_secs_f64());

    // Sync: spawn to every peer in the map.
    let pin = cluster.pin_dir(1)?.join(MAP_PEERS);
    let start = Instant::now();
    let watcher = {
        let pin = pin.clone();
        std::thread::spawn(move || -> anyhow::Result<(f64, f64, PeersMap, usize)> {
            let map = wait_for_peers_map(&pin, Duration::from_secs(60))?;
            let pinned_at = start.elapsed().as_secs_f64();
            let deadline = start + Duration::from_secs(120);
            let mut polls = 0;
            loop {
                polls += 1;
                let count = map.keys().filter(Result::is_ok).count();
                if count >= n {
                    return Ok((pinned_at, start.elapsed().as_secs_f64(), map, polls));
                }
                if Instant::now() > deadline {
                    bail!("{count} of {n} peers in the map after 120 s");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let agent = cluster.start_agent(1, &[]).context("starting the agent")?;
    let ready_s = start.elapsed().as_secs_f64();
    let pid = agent.pid();
    let (pinned_s, sync_s, map, polls) = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("map watcher panicked"))?
        .context("waiting for every peer in the map")?;
    let agent_cpu_after_sync = cpu_seconds(pid)?;
    println!("agent ready after {ready_s:.3} s, map pinned after {pinned_s:.3} s, {n} peers after {sync_s:.3} s");

    // Memory and idle CPU with every peer in place, once the agent has settled: its 1 s tick
    // gives back the heap the listing used, at most two ticks after the last event.
    std::thread::sleep(Duration::from_millis(2500));
    let (rss_mb, hwm_mb) = memory_mb(pid)?;
    let breakdown = memory_breakdown(pid)?;
    println!("agent memory (MB): {breakdown}");
    let cpu0 = cpu_seconds(pid)?;
    let t_idle = Instant::now();
    std::thread::sleep(Duration::from_secs(opts.idle));
    let idle_cpu = cpu_seconds(pid)? - cpu0;
    let idle_window = t_idle.elapsed().as_secs_f64();
    let idle_percent = 100.0 * idle_cpu / idle_window;
    println!("agent resident {rss_mb:.1} MB (peak {hwm_mb:.1} MB), idle CPU {idle_percent:.3}% of one core");

    // The burst: writes back to back on one thread, polls of the map on this one.
    let changes = opts.changes;
    let base = Instant::now();
    // Nanoseconds after `base` just before each put; 0: not written yet.
    let written: Arc<Vec<AtomicU64>> = Arc::new((0..changes).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    // Change k: even k changes the VtepMAC of existing lease k/2 (spread over the set), odd k
    // adds lease n + k/2.
    let target = move |k: usize| -> (usize, u8) {
        if k.is_multiple_of(2) {
            ((k / 2) * n.max(1) / changes.div_ceil(2).max(1), 1)
        } else {
            (n + k / 2, 0)
        }
    };
    let writer = {
        let written = written.clone();
        let done = done.clone();
        with_etcd(&cluster, move |mut client, rt| {
            let r = rt.block_on(async {
                for k in 0..changes {
                    let (lease, generation) = target(k);
                    written[k].store(base.elapsed().as_nanos().max(1) as u64, Ordering::Release);
                    client
                        .put(lease_key(lease), lease_value(lease, generation), None)
                        .await?;
                }
                anyhow::Ok(base.elapsed().as_secs_f64())
            });
            done.store(true, Ordering::Release);
            r
        })
    };
    let mut latency_ms = vec![f64::NAN; changes];
    let mut pending: Vec<usize> = (0..changes).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut passes = 0u64;
    let poll_start = Instant::now();
    while !pending.is_empty() && Instant::now() < deadline {
        passes += 1;
        pending.retain(|&k| {
            let w = written[k].load(Ordering::Acquire);
            if w == 0 {
                return true;
            }
            let (lease, generation) = target(k);
            let o = subnet_octets(lease);
            match map.get(&Key::new(24, o), 0) {
                Ok(p) if p == expected_peer(lease, generation) => {
                    latency_ms[k] = (base.elapsed().as_nanos() as u64 - w) as f64 / 1e6;
                    false
                }
                _ => true,
            }
        });
        std::thread::sleep(Duration::from_micros(100));
    }
    let poll_pass_ms = poll_start.elapsed().as_secs_f64() * 1e3 / passes.max(1) as f64;
    let write_s = join(writer, "the burst of lease writes")?;
    if !pending.is_empty() {
        bail!("{} of {changes} changes never reached the map", pending.len());
    }
    let mut sorted = latency_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&sorted, 50.0),
        percentile(&sorted, 99.0),
        *sorted.last().unwrap_or(&f64::NAN),
    );
    println!(
        "{changes} changes written in {write_s:.3} s; write to map p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
    );
    let (rss_after_mb, hwm_after_mb) = memory_mb(pid)?;
    let counters = agent.stop().unwrap_or(Value::Null);
    drop(cluster);

    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split(':')
                .nth(1)
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    Ok(json!({
        "benchmark": "control-plane",
        "config": {
            "leases": opts.leases,
            "changes": changes,
            "idle_window_s": opts.idle,
            "network_config": CONFIG,
            "etcd": "Debian's etcd on the lab's switch namespace, data on tmpfs; agent in a host namespace",
            "machine": format!("{machine}, {} CPUs", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        },
        "sync": {
            "agent_ready_s": ready_s,
            "map_pinned_s": pinned_s,
            "all_peers_in_map_s": sync_s,
            "map_polls": polls,
            "agent_cpu_s_at_sync": agent_cpu_after_sync,
            "goal_s": GOAL_SYNC_S,
            "met": sync_s < GOAL_SYNC_S,
        },
        "memory": {
            "rss_mb": rss_mb,
            "peak_rss_mb": hwm_mb,
            "rss_after_burst_mb": rss_after_mb,
            "peak_rss_after_burst_mb": hwm_after_mb,
            "breakdown_mb": breakdown,
            "goal_mb": GOAL_RSS_MB,
            "met": rss_mb < GOAL_RSS_MB,
        },
        "idle": {
            "cpu_s": idle_cpu,
            "window_s": idle_window,
            "cpu_percent_of_one_core": idle_percent,
        },
        "changes": {
            "count": changes,
            "write_s": write_s,
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": max,
            "mean_poll_pass_ms": poll_pass_ms,
            "goal_p99_ms": GOAL_P99_MS,
            "met": p99 < GOAL_P99_MS,
            "latencies_ms": latency_ms,
        },
        "agent_final": counters,
    }))
}

fn print_report(r: &Value) {
    let met = |v: &Value| {
        if v["met"].as_bool() == Some(true) {
            "met"
        } else {
            "MISSED"
        }
    };
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!();
    println!("{:<40} {:>12} {:>12}  result", "figure", "measured", "goal");
    println!("{}", "-".repeat(76));
    println!(
        "{:<40} {:>10.3} s {:>10} s  {}",
        format!("{} peers: agent start to all in map", r["config"]["leases"]),
        f(&r["sync"]["all_peers_in_map_s"]),
        format!("< {GOAL_SYNC_S}"),
        met(&r["sync"])
    );
    println!(
        "{:<40} {:>9.2} ms {:>9} ms  {}",
        "lease change to map, p99",
        f(&r["changes"]["p99_ms"]),
        format!("< {GOAL_P99_MS}"),
        met(&r["changes"])
    );
    println!(
        "{:<40} {:>9.2} ms",
        "lease change to map, p50",
        f(&r["changes"]["p50_ms"])
    );
    println!(
        "{:<40} {:>9.1} MB {:>9} MB  {}",
        "agent resident memory",
        f(&r["memory"]["rss_mb"]),
        format!("< {GOAL_RSS_MB}"),
        met(&r["memory"])
    );
    println!(
        "{:<40} {:>10.3} %",
        "agent CPU while idle (of one core)",
        f(&r["idle"]["cpu_percent_of_one_core"])
    );
    println!();
}
