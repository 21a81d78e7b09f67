//! The scenario each kernel runs: two VMs, etcd on the switch, `overlay agent` on each VM as a
//! flannel unit starts it, a container behind a bridge on each built from the subnet file, and
//! per case (backend × datapath × decap hook): pings both ways, a TCP transfer checked by
//! checksum, an agent restart, the pin directory, and what cleanup leaves behind.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{Accel, Kernel, Switch, Vm, tail};
use crate::lab::workspace_bin;

#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub backend: &'static str,
    pub datapath: &'static str,
    pub decap: &'static str,
}

impl Case {
    pub fn name(&self) -> String {
        format!("{} {}/{}", self.backend, self.datapath, self.decap)
    }
}

/// Every case a kernel runs: each backend with each decap hook forced, then `auto` as users
/// run it (which must fall back to the kernel's datapath where eBPF does not work).
pub const CASES: &[Case] = &[
    Case {
        backend: "vxlan",
        datapath: "ebpf",
        decap: "xdp",
    },
    Case {
        backend: "vxlan",
        datapath: "ebpf",
        decap: "tc",
    },
    Case {
        backend: "udp",
        datapath: "ebpf",
        decap: "xdp",
    },
    Case {
        backend: "udp",
        datapath: "ebpf",
        decap: "tc",
    },
    Case {
        backend: "vxlan",
        datapath: "auto",
        decap: "auto",
    },
    Case {
        backend: "udp",
        datapath: "auto",
        decap: "auto",
    },
];

/// The columns of the result table after kernel, case and the datapath the agent chose.
pub const CHECKS: &[&str] = &["agents", "ping 1>2", "ping 2>1", "tcp", "restart", "pin dir", "cleanup"];

#[derive(Clone, Debug)]
pub enum Check {
    Pass(String),
    Fail(String),
    /// Not run: an earlier check failed, or it does not apply.
    Skip(String),
}

impl Check {
    fn cell(&self) -> String {
        match self {
            Check::Pass(d) if d.is_empty() => "ok".into(),
            Check::Pass(d) => format!("ok {d}"),
            Check::Fail(_) => "FAIL".into(),
            Check::Skip(d) if d.is_empty() => "-".into(),
            Check::Skip(d) => d.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub kernel: String,
    pub case: String,
    /// The backend the agent described in its ready line.
    pub chosen: String,
    pub checks: Vec<(&'static str, Check)>,
    pub seconds: f64,
}

impl Outcome {
    fn new(kernel: &Kernel, case: &str) -> Self {
        Outcome {
            kernel: kernel.release.clone(),
            case: case.to_string(),
            chosen: "-".into(),
            checks: Vec::new(),
            seconds: 0.0,
        }
    }

    pub fn failed(&self) -> bool {
        self.checks.iter().any(|(_, c)| matches!(c, Check::Fail(_)))
    }

    fn record(&mut self, name: &'static str, r: anyhow::Result<String>) -> bool {
        match r {
            Ok(d) => {
                self.checks.push((name, Check::Pass(d)));
                true
            }
            Err(e) => {
                self.checks.push((name, Check::Fail(format!("{e:#}"))));
                false
            }
        }
    }

    fn skip_rest(&mut self, why: &str) {
        for c in CHECKS {
            if !self.checks.iter().any(|(n, _)| n == c) {
                self.checks.push((c, Check::Skip(why.into())));
            }
        }
    }
}

pub struct Options {
    pub accel: Accel,
    pub cases: Vec<Case>,
    /// Bytes of the TCP transfer.
    pub transfer_bytes: u64,
    /// Print each step as it happens (the demo).
    pub narrate: bool,
}

/// Boot two VMs on `kernel` and run every case; a boot failure is one failed outcome.
pub fn run_kernel(kernel: &Kernel, opts: &Options, logs: &Path) -> Vec<Outcome> {
    let start = Instant::now();
    let mut boot = Outcome::new(kernel, "boot");
    let mut env = match Env::boot(kernel, opts, logs) {
        Ok(env) => env,
        Err(e) => {
            boot.record("agents", Err(e.context("booting the VMs")));
            boot.skip_rest("");
            boot.seconds = start.elapsed().as_secs_f64();
            return vec![boot];
        }
    };
    say(
        opts,
        &format!(
            "{}: both VMs up in {:.0} s",
            kernel.release,
            start.elapsed().as_secs_f64()
        ),
    );
    let mut out = Vec::new();
    for (n, case) in opts.cases.iter().enumerate() {
        let t = Instant::now();
        let mut o = Outcome::new(kernel, &case.name());
        env.run_case(n + 1, case, opts, &mut o);
        o.seconds = t.elapsed().as_secs_f64();
        say(
            opts,
            &format!(
                "{}: {} done in {:.0} s: {}",
                kernel.release,
                o.case,
                o.seconds,
                if o.failed() { "FAILED" } else { "passed" }
            ),
        );
        out.push(o);
    }
    out
}

fn say(opts: &Options, line: &str) {
    if opts.narrate {
        println!("{line}");
    } else {
        eprintln!("overlay-vms: {line}");
    }
}

/// Two booted VMs on a switch with etcd.
struct Env {
    vms: Vec<Vm>,
    switch: Switch,
    overlay: PathBuf,
    helper: PathBuf,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Generous: TCG emulates every instruction, and verifying the programs takes a while.
const READY_SECS: u32 = 120;
const HEALTHZ_PORT: u16 = 8285;

impl Env {
    fn boot(kernel: &Kernel, opts: &Options, logs: &Path) -> anyhow::Result<Self> {
        let overlay = workspace_bin("overlay");
        // By path, not current_exe(): a rebuild during a run leaves that name "(deleted)".
        let helper = workspace_bin("overlay-vms");
        if !overlay.exists() {
            anyhow::bail!("{} missing: cargo build --release", overlay.display());
        }
        let initramfs = logs.join("initramfs.cpio");
        kernel.build_initramfs(&initramfs).context("building the initramfs")?;
        let mut switch = Switch::new()?;
        let mut vms = Vec::new();
        for i in 1..=2 {
            vms.push(Vm::start(&mut switch, kernel, &initramfs, logs, i, opts.accel)?);
        }
        for vm in &mut vms {
            let t = vm.wait_booted(BOOT_TIMEOUT)?;
            say(
                opts,
                &format!("{}: {} booted in {:.0} s", kernel.release, vm.name(), t.as_secs_f64()),
            );
        }
        Ok(Env {
            vms,
            switch,
            overlay,
            helper,
        })
    }

    fn agent_args(&self, prefix: &str, case: &Case) -> String {
        format!(
            "{} agent -etcd-endpoints={} -etcd-prefix={prefix} -iface=eth0 --datapath {} --decap {} --healthz-port {HEALTHZ_PORT}",
            self.overlay.display(),
            self.switch.etcd.endpoint(),
            case.datapath,
            case.decap
        )
    }

    fn run_case(&mut self, n: usize, case: &Case, opts: &Options, o: &mut Outcome) {
        let prefix = format!("/matrix{n}/network");
        let config = format!(
            r#"{{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{{"Type":"{}"}}}}"#,
            case.backend
        );
        let endpoint = self.switch.etcd.endpoint();
        let set = self.switch.overlay(&[
            "config", "set", "--etcd-endpoints", &endpoint, "--etcd-prefix", &prefix, &config,
        ]);
        let args = self.agent_args(&prefix, case);
        let started = set.and_then(|_| self.start_agents(&args, n, "start", o));
        if let Some(needle) = expected_refusal(&o.kernel, case) {
            // Starting and dropping every packet would be the failure here, not refusing.
            match started {
                Ok(_) => o.record(
                    "agents",
                    Err(anyhow::anyhow!(
                        "{} came up on {}, whose bpf_skb_adjust_room lacks {needle}: it must refuse",
                        case.name(),
                        o.kernel
                    )),
                ),
                Err(e) if format!("{e:#}").contains(needle) => {
                    o.checks.push(("agents", Check::Pass(format!("refused, no {needle}"))));
                    true
                }
                Err(e) => o.record("agents", Err(e)),
            };
            o.skip_rest("n/a");
        } else if o.record("agents", started) {
            say(opts, &format!("  {}: agents ready: {}", case.name(), o.chosen));
            self.traffic_and_restart(&args, n, opts, o);
        } else {
            o.skip_rest("");
        }
        let cleanup = self.cleanup(&args);
        o.checks.retain(|(name, _)| *name != "cleanup");
        o.record("cleanup", cleanup);
    }

    fn traffic_and_restart(&mut self, args: &str, n: usize, opts: &Options, o: &mut Outcome) {
        let ips = match self.containers() {
            Ok(ips) => ips,
            Err(e) => {
                o.record("ping 1>2", Err(e.context("creating the containers")));
                o.skip_rest("");
                return;
            }
        };
        let p12 = self.ping(0, &ips[1]);
        let p21 = self.ping(1, &ips[0]);
        let reached = p12.is_ok() && p21.is_ok();
        o.record("ping 1>2", p12);
        o.record("ping 2>1", p21);
        say(
            opts,
            &format!(
                "  pings between {} and {}: {}",
                ips[0],
                ips[1],
                if reached { "ok" } else { "failed" }
            ),
        );
        if reached {
            let tcp = self.tcp(&ips[1], opts.transfer_bytes);
            o.record("tcp", tcp);
        } else {
            o.checks.push(("tcp", Check::Skip(String::new())));
        }
        let restart = self.restart(args, n, &ips, o);
        o.record("restart", restart);
        let pins = self.pin_dir(o);
        match pins {
            Ok(Some(d)) => o.checks.push(("pin dir", Check::Pass(d))),
            Ok(None) => o.checks.push(("pin dir", Check::Skip("n/a".into()))),
            Err(e) => o.checks.push(("pin dir", Check::Fail(format!("{e:#}")))),
        }
    }

    /// Start the agent on both VMs at once; the chosen backend goes into `o`.
    fn start_agents(&mut self, args: &str, n: usize, tag: &str, o: &mut Outcome) -> anyhow::Result<String> {
        let t = Instant::now();
        let mut pending = Vec::new();
        for vm in &mut self.vms {
            pending.push(vm.submit(&start_agent_script(args, &format!("case{n}-{tag}-agent{}", vm.index)))?);
        }
        let mut chosen = Vec::new();
        let mut errors = Vec::new();
        for (vm, p) in self.vms.iter_mut().zip(pending) {
            let ran = p.wait(vm, Duration::from_secs(u64::from(READY_SECS) + 30))?;
            if ran.ok() {
                let line = ran.output.lines().find(|l| l.contains("\"ready\"")).unwrap_or_default();
                let ready: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}: ready line is not JSON: {line:?}", vm.name()))?;
                chosen.push(short_backend(ready["backend"].as_str().unwrap_or("?")));
            } else {
                errors.push(format!("{}: {}", vm.name(), ran.output.trim()));
            }
        }
        chosen.dedup();
        if !chosen.is_empty() {
            o.chosen = chosen.join(" | ");
        }
        if !errors.is_empty() {
            anyhow::bail!("{}", errors.join("\n"));
        }
        Ok(format!("{:.0}s", t.elapsed().as_secs_f64()))
    }

    /// A container (namespace `ctr`, veth into bridge `cbr0` holding the lease's first
    /// address, MTU from the subnet file) on each VM; returns their addresses.
    fn containers(&mut self) -> anyhow::Result<Vec<String>> {
        let mut ips = Vec::new();
        for vm in &mut self.vms {
            let ran = vm.sh(CONTAINER_SCRIPT, Duration::from_secs(60))?;
            if !ran.ok() {
                anyhow::bail!("{}: {}", vm.name(), ran.output.trim());
            }
            ips.push(ran.output.lines().last().unwrap_or_default().trim().to_string());
        }
        Ok(ips)
    }

    /// From the container on VM `from` to `target`: the first reply within 30 tries (peers
    /// and neighbours settle), then 5 pings of which at least 4 must come back.
    fn ping(&mut self, from: usize, target: &str) -> anyhow::Result<String> {
        let script = format!(
            r#"i=0
while [ $i -lt 30 ]; do ip netns exec ctr ping -c 1 -W 1 {target} > /dev/null && break; i=$((i+1)); done
[ $i -lt 30 ] || {{ echo "no reply from {target} in 30 tries"; exit 1; }}
ip netns exec ctr ping -c 5 -i 0.3 -W 2 {target}
"#
        );
        let vm = &mut self.vms[from];
        let ran = vm.sh(&script, Duration::from_secs(120))?;
        let received = ping_received(&ran.output);
        match received {
            Some(r) if r >= 4 => Ok(format!("{r}/5")),
            _ => anyhow::bail!("{}: ping {target}: {}", vm.name(), tail(&ran.output, 6)),
        }
    }

    /// `bytes` from the container on VM 1 to the one on VM 2, checked by checksum.
    fn tcp(&mut self, server_ip: &str, bytes: u64) -> anyhow::Result<String> {
        let helper = self.helper.display().to_string();
        let server = self.vms[1].submit(&format!(
            "ip netns exec ctr {helper} tcp-serve --port 5201 --timeout-secs 150"
        ))?;
        let t = Instant::now();
        let client = self.vms[0].sh(
            &format!("ip netns exec ctr {helper} tcp-send --to {server_ip}:5201 --bytes {bytes}"),
            Duration::from_secs(180),
        )?;
        let secs = t.elapsed().as_secs_f64();
        let served = server.wait(&mut self.vms[1], Duration::from_secs(180))?;
        if !client.ok() || !served.ok() {
            anyhow::bail!(
                "sender: {}; receiver: {}",
                tail(&client.output, 3),
                tail(&served.output, 3)
            );
        }
        Ok(format!(
            "{} MB {:.1} Mbit/s",
            bytes / 1_000_000,
            bytes as f64 * 8.0 / secs / 1e6
        ))
    }

    /// Stop VM 1's agent (SIGTERM, as systemd does), start it again, and check both ways.
    fn restart(&mut self, args: &str, n: usize, ips: &[String], o: &mut Outcome) -> anyhow::Result<String> {
        let vm = &mut self.vms[0];
        let stop = vm.sh(STOP_AGENT_SCRIPT, Duration::from_secs(60))?;
        if !stop.ok() {
            anyhow::bail!("{}: stopping the agent: {}", vm.name(), stop.output.trim());
        }
        let t = Instant::now();
        let tag = format!("case{n}-restart-agent{}", vm.index);
        let ran = vm.sh(
            &start_agent_script(args, &tag),
            Duration::from_secs(u64::from(READY_SECS) + 30),
        )?;
        if !ran.ok() {
            anyhow::bail!("{}: agent did not come back: {}", vm.name(), ran.output.trim());
        }
        let line = ran.output.lines().find(|l| l.contains("\"ready\"")).unwrap_or_default();
        let ready: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let after = short_backend(ready["backend"].as_str().unwrap_or("?"));
        // A restart adopts what the first agent attached; only a different kind is news.
        if after.split(' ').next() != o.chosen.split(' ').next() {
            o.chosen = format!("{} (restart: {after})", o.chosen);
        }
        let secs = t.elapsed().as_secs_f64();
        self.ping(0, &ips[1]).context("1>2 after the restart")?;
        self.ping(1, &ips[0]).context("2>1 after the restart")?;
        Ok(format!("{secs:.0}s"))
    }

    /// What the agent left under its default pin directory on VM 1 (None: not an eBPF
    /// datapath), and its /status saved beside the logs.
    fn pin_dir(&mut self, o: &Outcome) -> anyhow::Result<Option<String>> {
        let vm = &mut self.vms[0];
        let ran = vm.sh(
            &format!(
                "curl -s http://127.0.0.1:{HEALTHZ_PORT}/status > /run/mailbox/status-$(date +%s).json\n\
                 grep -c ' /sys/fs/bpf bpf ' /proc/mounts\n\
                 ls /sys/fs/bpf/overlay | wc -l"
            ),
            Duration::from_secs(30),
        )?;
        if !o.chosen.contains("ebpf") {
            return Ok(None);
        }
        let lines: Vec<&str> = ran.output.lines().collect();
        match lines.as_slice() {
            [mounts, pins] if mounts.trim() != "0" && pins.trim() != "0" => Ok(Some(format!("{} pins", pins.trim()))),
            _ => anyhow::bail!(
                "{}: no bpffs or nothing pinned in /sys/fs/bpf/overlay: {}",
                vm.name(),
                ran.output.trim()
            ),
        }
    }

    /// Stop the agents, run `overlay agent --cleanup` as a user would, and report (then
    /// remove) whatever is left, so the next case starts clean.
    fn cleanup(&mut self, args: &str) -> anyhow::Result<String> {
        let mut left = Vec::new();
        for vm in &mut self.vms {
            let ran = vm.sh(&cleanup_script(args), Duration::from_secs(120))?;
            if !ran.ok() {
                left.push(format!("{}: {}", vm.name(), ran.output.trim()));
            }
        }
        if !left.is_empty() {
            anyhow::bail!("{}", left.join("\n"));
        }
        Ok(String::new())
    }
}

fn start_agent_script(args: &str, tag: &str) -> String {
    format!(
        r#"out=/run/mailbox/{tag}.out
log=/run/mailbox/{tag}.log
NO_COLOR=1 RUST_LOG=info {args} > $out 2> $log &
echo $! > /run/agent.pid
i=0
while [ $i -lt {ticks} ]; do
    if grep -q '"ready"' $out; then cat $out; exit 0; fi
    kill -0 $(cat /run/agent.pid) 2> /dev/null || {{ echo "agent exited:"; tail -n 12 $log; exit 3; }}
    sleep 0.2
    i=$((i+1))
done
echo "not ready after {READY_SECS} s:"; tail -n 12 $log; exit 2
"#,
        ticks = READY_SECS * 5
    )
}

const STOP_AGENT_SCRIPT: &str = r#"pid=$(cat /run/agent.pid)
kill -TERM $pid
i=0
while kill -0 $pid 2> /dev/null; do
    i=$((i+1))
    [ $i -lt 150 ] || { echo "agent $pid still running 30 s after SIGTERM"; exit 1; }
    sleep 0.2
done
"#;

const CONTAINER_SCRIPT: &str = r#". /run/flannel/subnet.env
bip=${FLANNEL_SUBNET%/*}
len=${FLANNEL_SUBNET#*/}
ip=${bip%.*}.$((${bip##*.} + 1))
ip netns add ctr
ip link add cbr0 type bridge
ip addr add $FLANNEL_SUBNET dev cbr0
ip link set cbr0 mtu $FLANNEL_MTU up
ip link add vethc mtu $FLANNEL_MTU type veth peer name eth0 netns ctr
ip link set vethc master cbr0 up
ip -n ctr link set lo up
ip -n ctr addr add $ip/$len dev eth0
ip -n ctr link set eth0 mtu $FLANNEL_MTU up
ip -n ctr route add default via $bip
echo $ip
"#;

fn cleanup_script(args: &str) -> String {
    format!(
        r#"pid=$(cat /run/agent.pid 2> /dev/null)
if [ -n "$pid" ]; then kill -TERM $pid 2> /dev/null; for i in $(seq 150); do kill -0 $pid 2> /dev/null || break; sleep 0.2; done; kill -KILL $pid 2> /dev/null; fi
rm -f /run/agent.pid
ip netns del ctr 2> /dev/null
ip link del cbr0 2> /dev/null
{args} --cleanup > /run/mailbox/cleanup.log 2>&1 || {{ echo "overlay agent --cleanup failed:"; tail -n 5 /run/mailbox/cleanup.log; bad=1; }}
for d in ovl0 flannel.1 flannel0; do
    if ip link show $d > /dev/null 2>&1; then echo "left behind: device $d"; ip link del $d; bad=1; fi
done
if ip link show eth0 | grep -q xdp; then echo "left behind: XDP on eth0"; ip link set eth0 xdp off; bad=1; fi
if [ -n "$(tc filter show dev eth0 ingress 2> /dev/null)" ]; then echo "left behind: tc filters on eth0"; bad=1; fi
tc qdisc del dev eth0 clsact 2> /dev/null
if [ -n "$(ls -A /sys/fs/bpf/overlay 2> /dev/null)" ]; then echo "left behind: pins in /sys/fs/bpf/overlay"; bad=1; fi
rm -rf /sys/fs/bpf/overlay /run/flannel
exit ${{bad:-0}}
"#
    )
}

/// What the agent must refuse on this kernel, by the word its error names: eBPF vxlan before
/// 5.13 (no BPF_F_ADJ_ROOM_ENCAP_L2_ETH).
fn expected_refusal(release: &str, case: &Case) -> Option<&'static str> {
    let version = kernel_version(release)?;
    (case.backend == "vxlan" && case.datapath == "ebpf" && version < (5, 13)).then_some("ENCAP_L2_ETH")
}

/// `5.10.0-46-amd64` → (5, 10).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// `ebpf-vxlan (decap xdp driver, device ovl0)` → `ebpf-vxlan (decap xdp driver)`.
fn short_backend(describe: &str) -> String {
    describe.replace(", device ovl0", "")
}

/// "5 packets transmitted, 4 received" → 4.
fn ping_received(text: &str) -> Option<u32> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let part = line.split(',').find(|p| p.contains("received"))?;
    part.split_whitespace().next()?.parse().ok()
}

/// The results as a table, one row per kernel and case, and the failures' reasons below it.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut header: Vec<String> = vec!["kernel".into(), "case".into(), "datapath chosen".into()];
    header.extend(CHECKS.iter().map(|c| c.to_string()));
    header.push("time".into());
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            let mut r = vec![o.kernel.clone(), o.case.clone(), o.chosen.clone()];
            for c in CHECKS {
                let cell = o
                    .checks
                    .iter()
                    .find(|(n, _)| n == c)
                    .map(|(_, ch)| ch.cell())
                    .unwrap_or_else(|| "-".into());
                r.push(cell);
            }
            r.push(format!("{:.0}s", o.seconds));
            r
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    let line = |s: &mut String, cells: &[String]| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(s, "| {} |", padded.join(" | "));
    };
    line(&mut s, &header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&mut s, &rule);
    for r in &rows {
        line(&mut s, r);
    }
    let failures: Vec<String> = outcomes
        .iter()
        .flat_map(|o| {
            o.checks.iter().filter_map(move |(n, c)| match c {
                Check::Fail(why) => Some(format!("{} {} {n}: {why}", o.kernel, o.case)),
                _ => None,
            })
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\nfailures:");
        for f in failures {
            let _ = writeln!(s, "- {}", f.replace('\n', "\n    "));
        }
    }
    s
}

/// Where one kernel's VM files (initramfs, consoles, agent logs) go: kept when a case failed.
pub fn logs_dir(series: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("overlay-vms-{}-{series}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_follow_the_kernel() {
        let vxlan = Case {
            backend: "vxlan",
            datapath: "ebpf",
            decap: "tc",
        };
        let udp = Case {
            backend: "udp",
            ..vxlan
        };
        assert_eq!(kernel_version("6.12.95+deb12-amd64"), Some((6, 12)));
        assert_eq!(expected_refusal("5.10.0-46-amd64", &vxlan), Some("ENCAP_L2_ETH"));
        assert_eq!(expected_refusal("5.10.0-46-amd64", &udp), None);
        assert_eq!(expected_refusal("6.1.0-50-amd64", &vxlan), None);
    }

    #[test]
    fn parses_ping_summary() {
        assert_eq!(
            ping_received("5 packets transmitted, 4 received, 20% packet loss, time 1204ms"),
            Some(4)
        );
        assert_eq!(ping_received("no reply"), None);
    }

    #[test]
    fn table_lists_failures() {
        let o = Outcome {
            kernel: "6.1.0-50-amd64".into(),
            case: "vxlan ebpf/tc".into(),
            chosen: "-".into(),
            checks: vec![("agents", Check::Fail("Parent Qdisc doesn't exists".into()))],
            seconds: 3.0,
        };
        let t = table(&[o]);
        assert!(t.contains("| 6.1.0-50-amd64 | vxlan ebpf/tc |"));
        assert!(t.contains("FAIL"));
        assert!(t.contains("agents: Parent Qdisc"));
    }
}
