//! What the run found: the per-round summary line, the JSON report with medians, spreads,
//! ratios and goals, and the tables printed at the end.
use std::fmt::{self, Write};

use overlay_tests::{etcd::ETCD_BIN, lab::Backend};
use serde_json::{Value, json};

use crate::{
    options::{BenchBackend, IpFamily, Options},
    read_trimmed,
    rtt::{PING_INTERVAL, PINGS, RR_ROUND_TRIPS},
    tcp::STREAMS,
    topology::{UNDERLAY_MTU, network_config},
    udp::{UDP_BATCH, UDP_PAYLOAD, UDP_SENDERS},
};

/// The figures of the table, in column order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Tcp1,
    Tcp4,
    Udp64,
    RttP50,
    RttP99,
    RrP50,
    RrP99,
    CpuPerGbit,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::Tcp1,
        Metric::Tcp4,
        Metric::Udp64,
        Metric::RttP50,
        Metric::RttP99,
        Metric::RrP50,
        Metric::RrP99,
        Metric::CpuPerGbit,
    ];

    /// Whether a bigger figure is better (throughput) or worse (latency, cost).
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Tcp1 | Metric::Tcp4 | Metric::Udp64)
    }

    /// Label in the chart.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP 1 stream",
            Metric::Tcp4 => "TCP 4 streams",
            Metric::Udp64 => "UDP 64 B pps",
            Metric::RttP50 => "ping RTT p50",
            Metric::RttP99 => "ping RTT p99",
            Metric::RrP50 => "UDP RTT p50",
            Metric::RrP99 => "UDP RTT p99",
            Metric::CpuPerGbit => "CPU s per Gbit",
        }
    }

    /// Column header, with the unit the table shows.
    pub fn header(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp1 Gbit/s",
            Metric::Tcp4 => "tcp4 Gbit/s",
            Metric::Udp64 => "udp64 kpps",
            Metric::RttP50 => "ping p50 us",
            Metric::RttP99 => "ping p99 us",
            Metric::RrP50 => "udp rtt p50 us",
            Metric::RrP99 => "udp rtt p99 us",
            Metric::CpuPerGbit => "cpu s/Gbit",
        }
    }

    /// Key in the JSON, with the unit the raw figure is in.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp1_bps",
            Metric::Tcp4 => "tcp4_bps",
            Metric::Udp64 => "udp64_rx_pps",
            Metric::RttP50 => "rtt_p50_us",
            Metric::RttP99 => "rtt_p99_us",
            Metric::RrP50 => "udp_rr_p50_us",
            Metric::RrP99 => "udp_rr_p99_us",
            Metric::CpuPerGbit => "tcp1_cpu_s_per_gbit",
        }
    }

    /// Raw figure to the table's unit.
    pub fn scale(self) -> f64 {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => 1e-9,
            Metric::Udp64 => 1e-3,
            Metric::RttP50 | Metric::RttP99 | Metric::RrP50 | Metric::RrP99 | Metric::CpuPerGbit => 1.0,
        }
    }
}

pub fn summary_line(run: &Value) -> String {
    let mut parts: Vec<String> = Metric::ALL
        .iter()
        .map(|m| match run[m.key()].as_f64() {
            Some(x) => format!("{} {:.1}", m.header(), x * m.scale()),
            None => format!("{} -", m.header()),
        })
        .collect();
    if let Some(modes) = run["xdp_mode"].as_array() {
        parts.push(format!(
            "decap {}",
            modes.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("/")
        ));
    }
    if let (Some(tx), Some(rx)) = (
        run["tcp1_underlay_tx"]["avg_bytes_per_skb"].as_u64(),
        run["tcp1_underlay_rx"]["avg_bytes_per_skb"].as_u64(),
    ) {
        parts.push(format!("tcp1 underlay skb tx/rx {tx}/{rx} B"));
    }
    if let Some(ns) = run["tcp1_bpf_stats"]["overlay_decap"]["ns_per_run"].as_f64() {
        parts.push(format!("decap {ns:.0} ns/run"));
    }
    if let Some(note) = run["note"].as_str() {
        parts.push(format!("NOTE {note}"));
    }
    for e in run["errors"].as_array().into_iter().flatten() {
        parts.push(format!("ERROR {}", e.as_str().unwrap_or_default()));
    }
    parts.join(", ")
}

#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

pub fn report_json(opts: &Options, runs: &[Vec<Value>]) -> Value {
    let stats =
        |runs: &[Value], m: Metric| spread(&runs.iter().filter_map(|r| r[m.key()].as_f64()).collect::<Vec<_>>());
    let reference = |which: BenchBackend| {
        opts.backends
            .iter()
            .position(|b| *b == which)
            .map(|i| runs[i].as_slice())
    };
    let userspace = reference(BenchBackend::UserspaceUdp);
    let backends: Vec<Value> = opts
        .backends
        .iter()
        .zip(runs)
        .map(|(b, runs)| {
            let mut summary = serde_json::Map::new();
            // IPv6 backends are measured against host-gw over IPv6.
            let host_gw = reference(b.host_gw_baseline());
            for m in Metric::ALL {
                let Some(s) = stats(runs, m) else { continue };
                let ratio = |r: Option<&[Value]>| r.and_then(|h| stats(h, m)).map(|h| s.median / h.median);
                summary.insert(
                    m.key().into(),
                    json!({
                        "median": s.median,
                        "min": s.min,
                        "max": s.max,
                        "ratio_to_host_gw": ratio(host_gw),
                        "ratio_to_userspace_udp": ratio(userspace),
                    }),
                );
            }
            let xdp = runs
                .iter()
                .find_map(|r| r.get("xdp_mode").cloned())
                .unwrap_or(Value::Null);
            let goals = if b.ebpf().is_some() {
                goals_json(&summary)
            } else {
                Value::Null
            };
            json!({
                "backend": b.name(),
                "ip_family": b.family().name(),
                "host_routing": b.host_routing(),
                "container_mtu": b.container_mtu(),
                "xdp_mode": xdp,
                "summary": summary,
                "goals": goals,
                "runs": runs,
            })
        })
        .collect();
    json!({
        "benchmark": "datapath",
        "config": {
            "underlay": opts.underlay.name(),
            "rounds": opts.rounds,
            "duration_s": opts.duration,
            "underlay_mtu": UNDERLAY_MTU,
            "streams": STREAMS,
            "udp_payload": UDP_PAYLOAD,
            "pings": PINGS,
            "udp_round_trips": RR_ROUND_TRIPS,
            "ping_interval_s": PING_INTERVAL,
            "kernel": read_trimmed("/proc/sys/kernel/osrelease"),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_at_end": read_trimmed("/proc/loadavg"),
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "topology": "two hosts on an underlay of MTU 1500 (veth: one veth pair; bridge: a bridge between them), one container per host behind docker0; c1 (host1) client, c2 (host2) server; underlay: host1 to host2 with no overlay",
            "ebpf_setup": format!(
                "ebpf-*: `overlay agent` on each host (--datapath=ebpf --iptables-forward-rules=false, plus the backend's --decap/--xdp-mode) against etcd ({ETCD_BIN}) in host1's namespace on its underlay address, network config {}; each agent reuses the static subnet pre-seeded in its subnet file; measured once each agent has the other host as a peer and, with TC decap, the bridge program redirects on both hosts",
                network_config(Backend::Vxlan, IpFamily::V4)
            ),
            "ipv6_setup": format!(
                "*-v6: measured over the containers' IPv6 addresses; the underlay and the containers are dual stack; host-gw-v6: IPv6 routes via each peer's PublicIPv6; kernel-vxlan-v6 (`--datapath=kernel`, flannel-v6.1) and ebpf-vxlan-v6: `overlay agent` as for ebpf-* with network config {}; their ratios are to host-gw-v6",
                network_config(Backend::Vxlan, IpFamily::V6)
            ),
            "baselines_setup": "host-gw, kernel-vxlan, userspace-udp: programmed as flannel programs them, peer entries written directly",
            "udp64_sender": format!("{UDP_SENDERS} threads, one flow each, sendmmsg batches of {UDP_BATCH}"),
            "cpu": "machine-wide busy time (user+nice+system+irq+softirq from /proc/stat) during the 1-stream TCP test, per Gbit received",
            "machine": machine_description(),
        },
        "backends": backends,
    })
}

/// The tables shown after the run: medians with their ratio to host-gw, the spread over the
/// rounds (if more than one), the ratio to userspace-udp (if it ran) and our goals.
pub fn write_tables(out: &mut impl Write, opts: &Options, report: &Value) -> fmt::Result {
    let rows: Vec<&Value> = report["backends"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let name_w = rows
        .iter()
        .filter_map(|r| r["backend"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(7)
        .max(7);

    writeln!(out)?;
    writeln!(
        out,
        "Medians over {} round(s) of {} s, ratio to host-gw (throughput: higher is better; RTT: lower is better)",
        opts.rounds, opts.duration
    )?;
    write_metric_table(out, &rows, name_w, true, median_cell)?;
    if rows.iter().any(|r| r["backend"] == BenchBackend::HostGwV6.name()) {
        writeln!(out, "note: the -v6 rows run over IPv6; their ratios are to host-gw-v6")?;
    }
    for r in &rows {
        let notes: std::collections::BTreeSet<&str> = r["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|run| run["note"].as_str())
            .collect();
        for note in notes {
            writeln!(out, "note: {}: {note}", r["backend"].as_str().unwrap_or("?"))?;
        }
    }
    if opts.rounds > 1 {
        writeln!(out)?;
        writeln!(out, "Spread (min-max over rounds)")?;
        write_metric_table(out, &rows, name_w, false, range_cell)?;
    }
    if rows.iter().any(|r| r["backend"] == BenchBackend::UserspaceUdp.name()) {
        writeln!(out)?;
        writeln!(
            out,
            "Ratio to userspace-udp (flannel's udp design, the baseline to beat)"
        )?;
        write_metric_table(out, &rows, name_w, false, userspace_ratio_cell)?;
    }
    let with_goals: Vec<&&Value> = rows.iter().filter(|r| r["goals"].is_array()).collect();
    if !with_goals.is_empty() {
        writeln!(out)?;
        writeln!(out, "Goals for our datapath (ratios to host-gw)")?;
        for r in with_goals {
            let parts: Vec<String> = r["goals"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| {
                    format!(
                        "{} {} {:.2}x: {}",
                        g["metric"].as_str().unwrap_or("?"),
                        g["goal"].as_str().unwrap_or("?"),
                        g["ratio"].as_f64().unwrap_or(f64::NAN),
                        match g["met"].as_bool() {
                            Some(true) => "met",
                            Some(false) => "MISSED",
                            None => "not measured",
                        }
                    )
                })
                .collect();
            writeln!(
                out,
                "{:<name_w$}  {}",
                r["backend"].as_str().unwrap_or("?"),
                parts.join("; ")
            )?;
        }
    }
    writeln!(out)
}

/// A header and a row per backend: its name, then (with `decap`) its decap hooks and a rule
/// under the header, as the main table has them, then `cell` of each metric.
fn write_metric_table(
    out: &mut impl Write,
    rows: &[&Value],
    name_w: usize,
    decap: bool,
    cell: fn(&Value, Metric) -> String,
) -> fmt::Result {
    let lead = |name: &str, hooks: &str| {
        if decap {
            format!("{name:<name_w$}  {hooks:<8}")
        } else {
            format!("{name:<name_w$}")
        }
    };
    let mut header = lead("backend", "decap");
    for m in Metric::ALL {
        header += &format!("  {:>15}", m.header());
    }
    writeln!(out, "{header}")?;
    if decap {
        writeln!(out, "{}", "-".repeat(header.len()))?;
    }
    for r in rows {
        let mut line = lead(r["backend"].as_str().unwrap_or("?"), &decap_cell(r));
        for m in Metric::ALL {
            line += &format!("  {:>15}", cell(r, m));
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The median in the table's unit and its ratio to host-gw.
fn median_cell(r: &Value, m: Metric) -> String {
    let s = &r["summary"][m.key()];
    let Some(median) = s["median"].as_f64() else {
        return "-".into();
    };
    let v = median * m.scale();
    let value = if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    };
    let ratio = s["ratio_to_host_gw"]
        .as_f64()
        .map(|x| format!("{x:.2}x"))
        .unwrap_or("-".into());
    format!("{value:>8} {ratio:>6}")
}

/// The lowest and highest figure over the rounds, in the table's unit.
fn range_cell(r: &Value, m: Metric) -> String {
    let s = &r["summary"][m.key()];
    if s["median"].as_f64().is_none() {
        return "-".into();
    }
    format!(
        "{:.1}-{:.1}",
        s["min"].as_f64().unwrap_or(0.0) * m.scale(),
        s["max"].as_f64().unwrap_or(0.0) * m.scale()
    )
}

fn userspace_ratio_cell(r: &Value, m: Metric) -> String {
    let x = r["summary"][m.key()]["ratio_to_userspace_udp"].as_f64();
    x.map(|x| format!("{x:.2}x")).unwrap_or("-".into())
}

/// The decap hooks of the hosts, deduplicated: "tc", "xdp" (native), "xdp-gen" (generic),
/// with "+hr" where host routing (the shortcut past the host's stack) was on.
fn decap_cell(r: &Value) -> String {
    let hooks = decap_hooks(r);
    if r["host_routing"] == "bpf" {
        format!("{hooks}+hr")
    } else {
        hooks
    }
}

fn decap_hooks(r: &Value) -> String {
    match r["xdp_mode"].as_array() {
        Some(modes) => {
            let mut m: Vec<&str> = modes
                .iter()
                .filter_map(Value::as_str)
                .map(|s| match s {
                    "Driver" => "xdp",
                    "Skb" => "xdp-gen",
                    other => other,
                })
                .collect();
            m.dedup();
            m.join("/")
        }
        None => "-".into(),
    }
}

/// Issue 11's goals for every eBPF row, as ratios to host-gw in the same run: 5 % more TCP
/// throughput with one stream, 10 % more 64-byte packets, 10 % less UDP round-trip time at the
/// median (the finer figure; ping rounds to whole microseconds), 10 % less CPU per Gbit.
const GOALS: [(Metric, &str, f64); 4] = [
    (Metric::Tcp1, ">=", 1.05),
    (Metric::Udp64, ">=", 1.1),
    (Metric::RrP50, "<=", 0.9),
    (Metric::CpuPerGbit, "<=", 0.9),
];

fn goals_json(summary: &serde_json::Map<String, Value>) -> Value {
    GOALS
        .iter()
        .map(|&(m, op, target)| {
            let ratio = summary.get(m.key()).and_then(|s| s["ratio_to_host_gw"].as_f64());
            let met = ratio.map(|r| if op == ">=" { r >= target } else { r <= target });
            json!({"metric": m.key(), "goal": format!("{op} {target}x"), "ratio": ratio, "met": met})
        })
        .collect()
}

/// CPU model, cores, memory and kernel, for the record.
fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(str::trim))
        .unwrap_or("unknown CPU");
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    format!(
        "{model}, {} CPUs, {:.0} GiB, Linux {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        mem_kb as f64 / (1 << 20) as f64,
        read_trimmed("/proc/sys/kernel/osrelease")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_median_and_range() {
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = spread(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!(spread(&[]).is_none());
    }

    /// A report as `report_json` makes it, for three backends: TCP figures for each, a packet
    /// rate for two, the rest left out ("-").
    fn sample_report() -> Value {
        let figure = |min: f64, max: f64, to_host_gw: Option<f64>, to_userspace: f64| {
            json!({
                "median": (min + max) / 2.0, "min": min, "max": max,
                "ratio_to_host_gw": to_host_gw, "ratio_to_userspace_udp": to_userspace,
            })
        };
        json!({"backends": [
            {
                "backend": "host-gw", "xdp_mode": null, "goals": null, "runs": [{}, {}],
                "summary": {
                    "tcp1_bps": figure(9e9, 10e9, Some(1.0), 4.0),
                    "udp64_rx_pps": figure(600e3, 700e3, Some(1.0), 5.0),
                },
            },
            {
                "backend": "ebpf-vxlan", "xdp_mode": ["tc", "Driver"], "runs": [{"note": "a note"}, {"note": "a note"}],
                "summary": {
                    "tcp1_bps": figure(8e9, 9e9, Some(0.895), 3.58),
                    "udp64_rx_pps": figure(640e3, 660e3, Some(0.9846), 5.1),
                },
                "goals": [
                    {"metric": "tcp1_bps", "goal": ">= 1x", "ratio": 0.895, "met": false},
                    {"metric": "udp64_rx_pps", "goal": ">= 1x", "ratio": 1.0, "met": true},
                    {"metric": "rtt_p50_us", "goal": "<= 1.1x", "ratio": null, "met": null},
                ],
            },
            {
                "backend": "userspace-udp", "xdp_mode": null, "goals": null, "runs": [{}, {}],
                "summary": {"tcp1_bps": figure(2e9, 3e9, None, 1.0)},
            },
        ]})
    }

    fn tables(rounds: usize, report: &Value) -> String {
        let opts = Options {
            underlay: crate::options::Underlay::Veth,
            rounds,
            duration: 5,
            json: "r.json".into(),
            svg: "r.svg".into(),
            backends: Vec::new(),
            bpf_stats: false,
            while_tcp: None,
        };
        let mut out = String::new();
        write_tables(&mut out, &opts, report).unwrap();
        out
    }

    /// The layout the tables had before they shared one printer, character for character.
    #[test]
    fn tables_show_medians_spreads_ratios_and_goals() {
        let expected = r#"
Medians over 2 round(s) of 5 s, ratio to host-gw (throughput: higher is better; RTT: lower is better)
backend        decap         tcp1 Gbit/s      tcp4 Gbit/s       udp64 kpps      ping p50 us      ping p99 us   udp rtt p50 us   udp rtt p99 us       cpu s/Gbit
---------------------------------------------------------------------------------------------------------------------------------------------------------------
host-gw        -             9.50  1.00x                -       650  1.00x                -                -                -                -                -
ebpf-vxlan     tc/xdp        8.50  0.90x                -       650  0.98x                -                -                -                -                -
userspace-udp  -             2.50      -                -                -                -                -                -                -                -
note: ebpf-vxlan: a note

Spread (min-max over rounds)
backend            tcp1 Gbit/s      tcp4 Gbit/s       udp64 kpps      ping p50 us      ping p99 us   udp rtt p50 us   udp rtt p99 us       cpu s/Gbit
host-gw               9.0-10.0                -      600.0-700.0                -                -                -                -                -
ebpf-vxlan             8.0-9.0                -      640.0-660.0                -                -                -                -                -
userspace-udp          2.0-3.0                -                -                -                -                -                -                -

Ratio to userspace-udp (flannel's udp design, the baseline to beat)
backend            tcp1 Gbit/s      tcp4 Gbit/s       udp64 kpps      ping p50 us      ping p99 us   udp rtt p50 us   udp rtt p99 us       cpu s/Gbit
host-gw                  4.00x                -            5.00x                -                -                -                -                -
ebpf-vxlan               3.58x                -            5.10x                -                -                -                -                -
userspace-udp            1.00x                -                -                -                -                -                -                -

Goals for our datapath (ratios to host-gw)
ebpf-vxlan     tcp1_bps >= 1x 0.90x: MISSED; udp64_rx_pps >= 1x 1.00x: met; rtt_p50_us <= 1.1x NaNx: not measured

"#;
        assert_eq!(tables(2, &sample_report()), expected);
    }

    /// Each family's backends are compared with the host-gw of their family.
    #[test]
    fn ipv6_backends_are_compared_with_host_gw_over_ipv6() {
        let backends = [
            BenchBackend::HostGw,
            BenchBackend::EbpfVxlan,
            BenchBackend::HostGwV6,
            BenchBackend::EbpfVxlanV6,
            BenchBackend::KernelVxlanV6,
        ];
        let opts = Options {
            underlay: crate::options::Underlay::Veth,
            rounds: 1,
            duration: 3,
            json: "r.json".into(),
            svg: "r.svg".into(),
            backends: backends.to_vec(),
            bpf_stats: false,
            while_tcp: None,
        };
        let tcp1 = [10e9, 8e9, 5e9, 4e9, 2e9];
        let runs: Vec<Vec<Value>> = tcp1.iter().map(|bps| vec![json!({ "tcp1_bps": bps })]).collect();
        let report = report_json(&opts, &runs);
        let ratio = |i: usize| report["backends"][i]["summary"]["tcp1_bps"]["ratio_to_host_gw"].as_f64();
        assert_eq!(ratio(0), Some(1.0));
        assert_eq!(ratio(1), Some(0.8));
        assert_eq!(ratio(2), Some(1.0));
        assert_eq!(ratio(3), Some(0.8));
        assert_eq!(ratio(4), Some(0.4));
        assert_eq!(report["backends"][3]["ip_family"], "IPv6");
        assert_eq!(report["backends"][3]["container_mtu"], 1430);
        assert!(report["backends"][3]["goals"].is_array(), "ours gets goals");
        assert!(report["backends"][4]["goals"].is_null(), "the kernel's does not");
        let mut out = String::new();
        write_tables(&mut out, &opts, &report).unwrap();
        assert!(
            out.contains("note: the -v6 rows run over IPv6; their ratios are to host-gw-v6\n"),
            "{out}"
        );
        // Without host-gw-v6 in the run, the IPv6 rows have no ratio rather than one to IPv4.
        let opts = Options {
            backends: vec![BenchBackend::HostGw, BenchBackend::EbpfVxlanV6],
            ..opts
        };
        let report = report_json(&opts, &[vec![json!({"tcp1_bps": 1e9})], vec![json!({"tcp1_bps": 1e9})]]);
        assert!(report["backends"][1]["summary"]["tcp1_bps"]["ratio_to_host_gw"].is_null());
        let mut out = String::new();
        write_tables(&mut out, &opts, &report).unwrap();
        assert!(!out.contains("-v6 rows"), "{out}");
    }

    /// Each goal judged on its own ratio, at the boundary too; a figure not measured is
    /// neither met nor missed.
    #[test]
    fn goals_are_issue_11s_per_metric() {
        let ratio = |r: f64| json!({"ratio_to_host_gw": r});
        let summary = json!({
            "tcp1_bps": ratio(1.05),
            "udp64_rx_pps": ratio(1.09),
            "udp_rr_p50_us": ratio(0.72),
        });
        let goals = goals_json(summary.as_object().unwrap());
        let judged: Vec<(&str, &str, Option<bool>)> = goals
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["metric"].as_str().unwrap(),
                    g["goal"].as_str().unwrap(),
                    g["met"].as_bool(),
                )
            })
            .collect();
        assert_eq!(
            judged,
            [
                ("tcp1_bps", ">= 1.05x", Some(true)),
                ("udp64_rx_pps", ">= 1.1x", Some(false)),
                ("udp_rr_p50_us", "<= 0.9x", Some(true)),
                (Metric::CpuPerGbit.key(), "<= 0.9x", None),
            ]
        );
    }

    #[test]
    fn tables_leave_out_the_spread_of_one_round_and_the_ratio_to_a_missing_baseline() {
        let mut report = sample_report();
        report["backends"].as_array_mut().unwrap().pop();
        let out = tables(1, &report);
        assert!(out.contains("Medians over 1 round(s)"), "{out}");
        assert!(!out.contains("Spread"), "{out}");
        assert!(!out.contains("Ratio to userspace-udp"), "{out}");
        assert!(out.contains("Goals for our datapath"), "{out}");
    }
}
