//! Where the CPU time goes: the machine's busy time from /proc/stat and, with --bpf-stats,
//! the run time the kernel counts for our programs.
use std::{process::Command, time::Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

/// Machine-wide CPU time from the first line of /proc/stat.
pub struct CpuTimes {
    busy_jiffies: u64,
    at: Instant,
}

pub struct CpuUse {
    pub busy_s: f64,
    pub window_s: f64,
}

impl CpuTimes {
    pub fn read() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat.lines().next().unwrap_or_default();
        Ok(CpuTimes {
            busy_jiffies: busy_jiffies(line).with_context(|| format!("unreadable /proc/stat line {line:?}"))?,
            at: Instant::now(),
        })
    }

    pub fn since(&self, before: &CpuTimes) -> CpuUse {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        CpuUse {
            busy_s: self.busy_jiffies.saturating_sub(before.busy_jiffies) as f64 / hz,
            window_s: self.at.duration_since(before.at).as_secs_f64(),
        }
    }
}

/// user + nice + system + irq + softirq of a `cpu` line: time the CPUs worked. Idle, iowait
/// and steal (time a hypervisor gave to someone else) are not ours.
fn busy_jiffies(line: &str) -> Option<u64> {
    let mut f = line.split_whitespace();
    if !f.next()?.starts_with("cpu") {
        return None;
    }
    let v: Vec<u64> = f.map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    if v.len() < 4 {
        return None;
    }
    Some(at(0) + at(1) + at(2) + at(5) + at(6))
}

/// kernel.bpf_stats_enabled on for the run, back to its old value after.
pub struct BpfStatsEnabled {
    old: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsEnabled {
    pub fn enable() -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(BpfStatsEnabled {
            old: old.trim().to_string(),
        })
    }
}

impl Drop for BpfStatsEnabled {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.old);
    }
}

/// run_cnt and run_time_ns of every loaded program named like ours, by program id. Programs
/// are not per namespace: another run loading ours at the same time would be counted too.
pub fn bpf_prog_stats() -> anyhow::Result<Vec<(u64, String, u64, u64)>> {
    let out = overlay_tests::netns::run(Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let v: Value = serde_json::from_str(&out).context("unreadable `bpftool -j prog show` output")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            if !name.starts_with("overlay_") {
                return None;
            }
            Some((
                p["id"].as_u64()?,
                name.to_string(),
                p["run_cnt"].as_u64().unwrap_or(0),
                p["run_time_ns"].as_u64().unwrap_or(0),
            ))
        })
        .collect())
}

pub fn bpf_stats_delta(before: &[(u64, String, u64, u64)], after: &[(u64, String, u64, u64)]) -> Value {
    let mut out = serde_json::Map::new();
    for (id, name, cnt, ns) in after {
        let Some((_, _, cnt0, ns0)) = before.iter().find(|b| b.0 == *id) else {
            continue;
        };
        let e = out
            .entry(name.clone())
            .or_insert_with(|| json!({"run_cnt": 0u64, "run_time_ns": 0u64}));
        e["run_cnt"] = json!(e["run_cnt"].as_u64().unwrap_or(0) + (cnt - cnt0));
        e["run_time_ns"] = json!(e["run_time_ns"].as_u64().unwrap_or(0) + (ns - ns0));
    }
    for e in out.values_mut() {
        let (cnt, ns) = (
            e["run_cnt"].as_u64().unwrap_or(0),
            e["run_time_ns"].as_u64().unwrap_or(0),
        );
        e["ns_per_run"] = json!(if cnt > 0 { ns as f64 / cnt as f64 } else { 0.0 });
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_jiffies_leave_out_idle_iowait_and_steal() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        assert_eq!(busy_jiffies("cpu  10 1 5 1000 7 2 3 50 0 0"), Some(21));
        assert_eq!(busy_jiffies("intr 1 2 3"), None);
        assert_eq!(busy_jiffies("cpu 1 x 3 4"), None);
    }
}
