//! TCP throughput with iperf3, with what it cost: the machine's CPU time per Gbit, the skb
//! sizes on the underlay and, with --bpf-stats, our programs' run time.
use std::{
    io::Read as _,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::netns::Netns;
use serde_json::{Value, json};

use crate::{
    cpu::{CpuTimes, bpf_prog_stats, bpf_stats_delta},
    options::Options,
    topology::{Endpoint, Topology},
};

const IPERF_PORT: u16 = 5201;

/// Streams for the multi-stream TCP test.
pub const STREAMS: u32 = 4;

pub fn measure_tcp(topo: &Topology, opts: &Options, streams: u32, run: &mut Value) -> anyhow::Result<()> {
    let (c1, c2) = (topo.client(), topo.server());
    let key = if streams == 1 { "tcp1" } else { "tcp4" };
    let (h1, h2) = (&topo.lab.hosts[0], &topo.lab.hosts[1]);
    let tx_before = link_stats(&h1.ns, &h1.iface, "tx")?;
    let rx_before = link_stats(&h2.ns, &h2.iface, "rx")?;
    let bpf_before = if opts.bpf_stats && streams == 1 {
        Some(bpf_prog_stats()?)
    } else {
        None
    };

    // The profiling command, if any, for the 1-stream test: it sees this backend's traffic.
    let during = opts.while_tcp.as_deref().filter(|_| streams == 1).map(|cmd| {
        let round = run["round"].as_u64().unwrap_or(0).to_string();
        cmd.replace("{backend}", topo.backend.name()).replace("{round}", &round)
    });
    let cpu_before = CpuTimes::read()?;
    let (client, _server, during_out) = iperf3(c1, c2, opts.duration, &["-P", &streams.to_string()], during)?;
    if let Some(out) = during_out {
        run["tcp1_while"] = json!(out);
    }
    let cpu = CpuTimes::read()?.since(&cpu_before);
    let received = f64_at(&client, "/end/sum_received/bits_per_second")?;
    run[format!("{key}_bps")] = json!(received);
    // Both "hosts" run on this machine's CPUs, so the whole machine's busy time is the cost of
    // moving the bytes (plus whatever else the machine did meanwhile: see the idle figure).
    let gbits = f64_at(&client, "/end/sum_received/bytes")? * 8.0 / 1e9;
    run[format!("{key}_cpu_busy_s")] = json!(cpu.busy_s);
    run[format!("{key}_cpu_window_s")] = json!(cpu.window_s);
    run[format!("{key}_gbits")] = json!(gbits);
    if gbits > 0.0 {
        run[format!("{key}_cpu_s_per_gbit")] = json!(cpu.busy_s / gbits);
    }
    run[format!("{key}_retransmits")] = client
        .pointer("/end/sum_sent/retransmits")
        .cloned()
        .unwrap_or(Value::Null);
    run[format!("{key}_cpu")] = client
        .pointer("/end/cpu_utilization_percent")
        .cloned()
        .unwrap_or(Value::Null);

    // What crossed the underlay: the average skb size tells whether GSO super-packets or
    // wire-sized segments left host1 and reached host2 (a bridge between them may segment).
    let tx_after = link_stats(&h1.ns, &h1.iface, "tx")?;
    let rx_after = link_stats(&h2.ns, &h2.iface, "rx")?;
    for (side, before, after) in [("tx", tx_before, tx_after), ("rx", rx_before, rx_after)] {
        let (packets, bytes) = (after.0 - before.0, after.1 - before.1);
        run[format!("{key}_underlay_{side}")] = json!({
            "packets": packets,
            "bytes": bytes,
            "avg_bytes_per_skb": bytes.checked_div(packets).unwrap_or(0),
            "dropped": after.2 - before.2,
        });
    }
    if let Some(before) = bpf_before {
        run["tcp1_bpf_stats"] = bpf_stats_delta(&before, &bpf_prog_stats()?);
    }
    Ok(())
}

fn f64_at(v: &Value, pointer: &str) -> anyhow::Result<f64> {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .with_context(|| format!("iperf3 JSON has no number at {pointer}"))
}

/// A child process that is killed when dropped, on every path; and dies with us (PDEATHSIG)
/// if we are killed.
struct KillOnDrop(Child);

impl KillOnDrop {
    fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        Ok(KillOnDrop(child))
    }

    /// Wait up to `timeout` for the process to exit; kill it if it does not. Returns its exit
    /// status and everything it printed.
    fn wait(mut self, timeout: Duration) -> anyhow::Result<(ExitStatus, String, String)> {
        // Read both pipes while waiting: iperf3's JSON can outgrow a pipe buffer.
        let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_string(&mut s);
                }
                s
            })
        };
        let out = read(self.0.stdout.take().map(|p| Box::new(p) as _));
        let err = read(self.0.stderr.take().map(|p| Box::new(p) as _));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.0.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                bail!("no exit after {timeout:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok((status, out.join().unwrap_or_default(), err.join().unwrap_or_default()))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// One iperf3 test from c1 to a one-shot server in c2; returns the client's and the server's
/// JSON reports, and what `during` (a shell command run half a second into the test) printed.
fn iperf3(
    c1: Endpoint,
    c2: Endpoint,
    duration: u64,
    extra: &[&str],
    during: Option<String>,
) -> anyhow::Result<(Value, Value, Option<String>)> {
    let port = IPERF_PORT.to_string();
    let mut server = c2.ns.command("iperf3");
    server.args(["-s", "-1", "-J", "-p", &port]);
    let mut server = KillOnDrop::spawn(server).context("starting the iperf3 server (apt-get install iperf3)")?;
    wait_listening(c2.ns, IPERF_PORT, &mut server)?;

    let mut client = c1.ns.command("iperf3");
    let (dst, secs) = (c2.ip.to_string(), duration.to_string());
    client
        .args(["-c", &dst, "-p", &port, "-t", &secs, "-J", "--connect-timeout", "3000"])
        .args(extra);
    let what = format!("iperf3 -c {dst} {}", extra.join(" "));
    let client = KillOnDrop::spawn(client).with_context(|| format!("starting {what}"))?;
    let during_out = match during {
        Some(cmd) => {
            std::thread::sleep(Duration::from_millis(500));
            let mut sh = Command::new("sh");
            sh.args(["-c", &cmd]);
            let (status, out, err) = KillOnDrop::spawn(sh)?
                .wait(Duration::from_secs(duration + 20))
                .with_context(|| format!("--while-tcp {cmd:?}"))?;
            Some(format!("{status}\n{out}{err}"))
        }
        None => None,
    };
    let limit = Duration::from_secs(duration + 20);
    let (status, out, err) = client.wait(limit).with_context(|| what.clone())?;
    let client_json = iperf3_json(&out, &err, status).with_context(|| what.clone())?;
    // The one-shot server prints its report and exits once the client is done.
    let (status, out, err) = server.wait(Duration::from_secs(10)).context("iperf3 server")?;
    let server_json = iperf3_json(&out, &err, status).context("iperf3 server")?;
    Ok((client_json, server_json, during_out))
}

fn iperf3_json(out: &str, err: &str, status: ExitStatus) -> anyhow::Result<Value> {
    let v: Value =
        serde_json::from_str(out).with_context(|| format!("exited {status} without a JSON report: {}", err.trim()))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3 error: {e}");
    }
    if !status.success() {
        bail!("exited {status}: {}", err.trim());
    }
    Ok(v)
}

fn wait_listening(ns: &Netns, port: u16, server: &mut KillOnDrop) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let filter = format!(":{port}");
    loop {
        let out = ns.exec("ss", &["-Hltn", "sport", "=", &filter])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("iperf3 server in {} not listening on port {port} after 5 s", ns.name());
        }
        if let Some(status) = server.0.try_wait()? {
            bail!("iperf3 server exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (packets, bytes, dropped) of an interface's `side` ("rx" or "tx"), from its kernel counters.
fn link_stats(ns: &Netns, iface: &str, side: &str) -> anyhow::Result<(u64, u64, u64)> {
    let out = ns.ip(&["-j", "-s", "link", "show", "dev", iface])?;
    let v: Value =
        serde_json::from_str(&out).with_context(|| format!("unreadable `ip -j -s link` output for {iface}"))?;
    let s = &v[0]["stats64"][side];
    let get = |k: &str| s[k].as_u64().unwrap_or(0);
    Ok((get("packets"), get("bytes"), get("dropped")))
}
