//! Switching a flannel host in place: the agent started as flanneld's unit file starts it, on
//! hosts as they are (no bpffs mounted, flanneld's flags and variables, its rules and MTU).
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    cluster::{Cluster, HEALTHZ_PORT},
    lab::{OverlayProcess, workspace_bin},
    netns::{Netns, run},
    traffic::{parse_ping, ping},
};
use tempfile::TempDir;

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;

/// The flags a flanneld unit file from the guides passes, one dash each, and no `--pin-dir`:
/// the agent pins under its default, /sys/fs/bpf/overlay.
fn unit_file_flags(c: &Cluster, index: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "agent".into(),
        format!("-etcd-endpoints={}", c.endpoint()),
        "-etcd-prefix=/coreos.com/network".into(),
        "-iface=eth0".into(),
        "-ip-masq".into(),
        format!("-subnet-file={}", c.subnet_file(index).display()),
        "-healthz-ip=127.0.0.1".into(),
        format!("-healthz-port={HEALTHZ_PORT}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// 150 pings 20 ms apart from `from` to `to`, on a thread: (transmitted, received).
fn ping_across(from: &Netns, to: std::net::Ipv4Addr) -> std::thread::JoinHandle<anyhow::Result<(u32, u32)>> {
    let from = from.name().to_string();
    std::thread::spawn(move || {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &from, "ping", "-n", "-c", "150", "-i", "0.02", "-W", "1",
            ])
            .arg(to.to_string())
            .output()?;
        let r = parse_ping(&String::from_utf8_lossy(&out.stdout))?;
        Ok((r.transmitted, r.received))
    })
}

/// A host's own mount namespace that outlives each agent, as a real host's does: made once
/// with a fresh sysfs of the host's network namespace (so /sys/fs/bpf is not mounted, as on a
/// host without systemd), kept alive by a bind mount of its namespace file, entered with
/// `nsenter` for every agent start.
struct HostMountNs {
    dir: TempDir,
    netns: String,
}

impl HostMountNs {
    fn new(ns: &Netns) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("overlay-mntns-").tempdir()?;
        let path = dir.path().to_str().context("utf-8 temp dir")?.to_string();
        // A namespace file can only be bound on a mount that does not propagate.
        run(Command::new("mount").args(["--bind", &path, &path]))?;
        let ns_file = format!("{path}/mnt");
        let made = (|| {
            run(Command::new("mount").args(["--make-private", &path]))?;
            std::fs::File::create(&ns_file)?;
            run(Command::new("unshare").args([
                &format!("--mount={ns_file}"),
                "--propagation=slave",
                "nsenter",
                &format!("--net=/run/netns/{}", ns.name()),
                "sh",
                "-c",
                "umount -l /sys && mount -t sysfs sysfs /sys",
            ]))
        })();
        let me = HostMountNs {
            dir,
            netns: ns.name().to_string(),
        };
        made?;
        Ok(me)
    }

    fn ns_file(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// `program` run in this host: its network and mount namespaces.
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", self.ns_file().display()))
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(program);
        c
    }
}

impl Drop for HostMountNs {
    fn drop(&mut self) {
        // The namespace, its bpffs and pins go with the last reference.
        let _ = Command::new("umount").arg(self.ns_file()).output();
        let _ = Command::new("umount").arg(self.dir.path()).output();
    }
}

/// An agent started by a command of ours (not `ip netns exec`); SIGTERM on drop.
struct Agent {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    ready: serde_json::Value,
}

impl Agent {
    fn start(mut cmd: Command, timeout: Duration) -> anyhow::Result<Self> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).env(
            "RUST_LOG",
            std::env::var("OVERLAY_LOG").unwrap_or_else(|_| "warn".into()),
        );
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                overlay_tests::netns::unblock_signals();
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            let r = stdout.read_line(&mut line).map(|_| line);
            let _ = tx.send(r);
            stdout
        });
        let line = match rx.recv_timeout(timeout) {
            Ok(Ok(line)) if !line.is_empty() => line,
            Ok(_) => bail!("{cmd:?} exited before ready: {}", child.wait()?),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{cmd:?} not ready after {timeout:?}");
            }
        };
        let stdout = reader.join().expect("reader thread");
        Ok(Agent {
            child,
            _stdout: stdout,
            ready: serde_json::from_str(line.trim()).with_context(|| format!("ready line {line:?}"))?,
        })
    }

    fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "agent exited with {status}");
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn adopted(ready: &serde_json::Value) -> bool {
    ready["backend"].as_str().is_some_and(|b| b.contains("adopted"))
}

/// The default pin dir under `ip netns exec`, whose fresh /sys has no bpffs at /sys/fs/bpf
/// (plain sysfs refuses the mkdir): the agent mounts one there and starts. Each `ip netns exec`
/// is its own mount namespace, so that bpffs and its pins go when the agent exits: a restart
/// under a new `ip netns exec` loads the datapath afresh (keeping its subnet and VtepMAC).
#[test]
fn default_pin_dir_under_ip_netns_exec() -> anyhow::Result<()> {
    let mut c = Cluster::new(2, VXLAN)?;
    let mut agents = Vec::new();
    for i in 1..=2 {
        let a = OverlayProcess::start(&c.lab.host(i).ns, &unit_file_flags(&c, i, &[]), Duration::from_secs(30))?;
        c.add_containers(i, &a, 1)?;
        agents.push(a);
    }
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let (h1, h2) = (c.lab.host(1), c.lab.host(2));
    let r = ping(&h2.containers[0].ns, h1.containers[0].ip, 3, 56, false, "0.05")?;
    assert_eq!(r.received, 3, "{r:?}");

    let first = agents.remove(0);
    let subnet = first.ready["subnet"].clone();
    let lease: serde_json::Value = serde_json::from_str(first.ready["lease"].as_str().unwrap())?;
    first.stop()?;
    let again = OverlayProcess::start(&c.lab.host(1).ns, &unit_file_flags(&c, 1, &[]), Duration::from_secs(30))?;
    assert!(
        !adopted(&again.ready),
        "a new `ip netns exec` should not see the previous one's private bpffs: {}",
        again.ready
    );
    assert_eq!(again.ready["subnet"], subnet);
    let lease_again: serde_json::Value = serde_json::from_str(again.ready["lease"].as_str().unwrap())?;
    assert_eq!(lease_again["BackendData"], lease["BackendData"], "VtepMAC kept");
    c.wait_until("host1 reaches host2 again", Duration::from_secs(10), || {
        Ok(ping(&h1.containers[0].ns, h2.containers[0].ip, 1, 56, false, "0.05")?.received == 1)
    })?;
    Ok(())
}

/// The default pin dir on a host whose mount namespace outlives the agent (a real host, here
/// a persistent mount namespace with /sys/fs/bpf not mounted): the first agent mounts the
/// bpffs at /sys/fs/bpf, a restarted agent adopts the pinned datapath, no ping lost.
#[test]
fn default_pin_dir_restart_adopts_on_a_host_without_bpffs() -> anyhow::Result<()> {
    let mut c = Cluster::new(2, VXLAN)?;
    let mounts = HostMountNs::new(&c.lab.host(1).ns)?;
    let bin = workspace_bin("overlay");
    let before = run(mounts
        .command(Path::new("stat"))
        .args(["-f", "-c", "%T", "/sys/fs/bpf"]))?;
    assert_eq!(before.trim(), "sysfs", "the emulated host starts without a bpffs");

    let mut a1 = Agent::start(
        {
            let mut cmd = mounts.command(&bin);
            cmd.args(unit_file_flags(&c, 1, &[]));
            cmd
        },
        Duration::from_secs(30),
    )?;
    assert!(!adopted(&a1.ready), "{}", a1.ready);
    let subnet = a1.ready["subnet"].as_str().context("subnet")?.parse()?;
    let mtu = a1.ready["mtu"].as_u64().context("mtu")? as u32;
    c.lab.hosts[0].add_containers(subnet, mtu, 1)?;
    let a2 = OverlayProcess::start(&c.lab.host(2).ns, &unit_file_flags(&c, 2, &[]), Duration::from_secs(30))?;
    c.add_containers(2, &a2, 1)?;
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let after = run(mounts
        .command(Path::new("stat"))
        .args(["-f", "-c", "%T", "/sys/fs/bpf"]))?;
    assert_eq!(after.trim(), "bpf_fs", "the agent mounts a bpffs at /sys/fs/bpf");
    let pins = run(mounts.command(Path::new("ls")).arg("/sys/fs/bpf/overlay"))?;
    assert!(pins.contains("link"), "pins under the default dir: {pins}");

    let pinger = ping_across(&c.lab.host(2).containers[0].ns, c.lab.host(1).containers[0].ip);
    std::thread::sleep(Duration::from_millis(500));
    a1.stop()?;
    a1 = Agent::start(
        {
            let mut cmd = mounts.command(&bin);
            cmd.args(unit_file_flags(&c, 1, &[]));
            cmd
        },
        Duration::from_secs(30),
    )?;
    let (sent, received) = pinger.join().expect("pinger")?;
    assert!(
        adopted(&a1.ready),
        "the restart adopts the pinned datapath: {}",
        a1.ready
    );
    assert_eq!((sent, received), (150, 150), "pings lost across the restart");
    drop((a1, a2));
    Ok(())
}

/// Run `cmd` until it exits (at most `timeout`): exit code, stdout, stderr.
fn run_to_exit(mut cmd: Command, timeout: Duration) -> anyhow::Result<(Option<i32>, String, String)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn agent_command(c: &Cluster, index: usize, args: &[String]) -> Command {
    let mut cmd = c
        .lab
        .host(index)
        .ns
        .command(workspace_bin("overlay").to_str().expect("utf-8"));
    cmd.args(args).env("RUST_LOG", "warn");
    cmd
}

fn set_config(c: &Cluster, json: &str) -> anyhow::Result<()> {
    c.etcdctl(&["put", "/coreos.com/network/config", json]).map(|_| ())
}

/// flanneld exits 1 when its config names a backend it does not have; so do we, naming the
/// type and ours. `--version`, and Kubernetes refused with the reason.
#[test]
fn unsupported_backends_version_and_kubernetes_exit_as_flanneld() -> anyhow::Result<()> {
    let c = Cluster::new(1, VXLAN)?;
    for t in ["wireguard", "ipip", "ipsec", "alloc", "extension", "tencent-vpc"] {
        set_config(
            &c,
            &format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{t}"}}}}"#),
        )?;
        let (code, _, stderr) = run_to_exit(
            agent_command(&c, 1, &unit_file_flags(&c, 1, &[])),
            Duration::from_secs(20),
        )?;
        assert_eq!(code, Some(1), "{t}: {stderr}");
        assert!(
            stderr.contains(&format!("\"{t}\"")) && stderr.contains("vxlan, host-gw, udp"),
            "{t}: {stderr}"
        );
    }
    // `overlay config set` refuses what the agent would refuse.
    let refused = c.overlay_on_switch(&[
        "config",
        "set",
        "--etcd-endpoints",
        &c.endpoint(),
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#,
    ]);
    assert!(refused.is_err(), "config set stored a wireguard config");

    for flag in ["--version", "-version", "-version=true"] {
        let (code, stdout, stderr) = run_to_exit(
            agent_command(&c, 1, &["agent".into(), flag.into()]),
            Duration::from_secs(10),
        )?;
        assert_eq!(code, Some(0), "{flag}: {stderr}");
        assert!(stdout.starts_with("overlay "), "{flag}: {stdout}");
    }
    let (code, _, stderr) = run_to_exit(
        agent_command(&c, 1, &unit_file_flags(&c, 1, &["-kube-subnet-mgr"])),
        Duration::from_secs(10),
    )?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--kube-subnet-mgr") && stderr.contains("etcd"),
        "{stderr}"
    );
    // Go's flag errors exit 2.
    let (code, _, stderr) = run_to_exit(
        agent_command(&c, 1, &unit_file_flags(&c, 1, &["-ip-masq=maybe"])),
        Duration::from_secs(10),
    )?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("-ip-masq") && stderr.contains("maybe"), "{stderr}");
    Ok(())
}

/// Flags flanneld accepts that stopped our agent with exit 2, as a unit file and an
/// environment file would give them.
#[test]
fn flanneld_flags_and_variables_start_the_agent() -> anyhow::Result<()> {
    let mut c = Cluster::new(2, VXLAN)?;
    let flags = unit_file_flags(
        &c,
        1,
        &[
            "-iptables-resync=2", "-ip-masq=True", "-ip-masq-fully-random-disable=t", "-public-ipv6=fd00::1",
            "-ip-blackhole-route=0", "-vmodule=main=2", "-log_backtrace_at=main.go:1", "-net-config-path",
            "/etc/kube-flannel/net-conf.json", "-kube-subnet-mgr=false", "-kube-api-url=", "-kubeconfig-file=",
            "-kube-annotation-prefix=flannel.alpha.coreos.com", "-set-node-network-unavailable=0", "-v", "1",
            "--iptables-forward-rules=1",
        ],
    );
    let a1 = OverlayProcess::start_env(
        &c.lab.host(1).ns,
        &flags,
        &[
            ("FLANNELD_PUBLIC_IP", ""),
            ("FLANNELD_ETCD_CAFILE", ""),
            ("FLANNELD_IFACE_CAN_REACH", "192.168.250.254"),
            ("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "0x1e"),
            ("FLANNELD_IP_MASQ", "false"),
        ],
        Duration::from_secs(30),
    )?;
    c.add_containers(1, &a1, 1)?;
    let env = std::fs::read_to_string(c.subnet_file(1))?;
    assert!(
        env.contains("FLANNEL_IPMASQ=true"),
        "the command line wins over FLANNELD_IP_MASQ:\n{env}"
    );
    let nat = c
        .lab
        .host(1)
        .ns
        .exec("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"])?;
    assert!(
        nat.contains("MASQUERADE") && !nat.contains("random-fully"),
        "-ip-masq-fully-random-disable: {nat}"
    );
    // --iface-can-reach alone, from the environment, picks eth0 (the way to the switch).
    let only_can_reach: Vec<String> = unit_file_flags(&c, 2, &[])
        .into_iter()
        .filter(|f| f != "-iface=eth0")
        .collect();
    let a2 = OverlayProcess::start_env(
        &c.lab.host(2).ns,
        &only_can_reach,
        &[("FLANNELD_IFACE_CAN_REACH", "192.168.250.254"), ("FLANNELD_IFACE", "")],
        Duration::from_secs(30),
    )?;
    assert_eq!(a2.ready["public_ip"], "192.168.250.2", "{}", a2.ready);
    c.add_containers(2, &a2, 1)?;
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let r = ping(
        &c.lab.host(1).containers[0].ns,
        c.lab.host(2).containers[0].ip,
        3,
        56,
        false,
        "0.05",
    )?;
    assert_eq!(r.received, 3, "{r:?}");
    drop((a1, a2));
    Ok(())
}

fn nat_rules(ns: &Netns) -> anyhow::Result<String> {
    ns.exec("iptables", &["-t", "nat", "-S"])
}

/// The last rule of `chain` in `table` (flannel appends its jumps).
fn last_rule(ns: &Netns, table: &str, chain: &str) -> anyhow::Result<String> {
    let rules = ns.exec("iptables", &["-t", table, "-S", chain])?;
    Ok(rules.lines().last().unwrap_or_default().to_string())
}

/// flannel's chains, rules and comments, its jumps appended; deleted rules come back within
/// --iptables-resync; the rules stay across a stop and restart (one jump each, not two);
/// --cleanup removes them. The blackhole route comes where no route holds the subnet.
#[test]
fn iptables_rules_as_flannel_writes_and_keeps_them() -> anyhow::Result<()> {
    let c = Cluster::new(2, VXLAN)?;
    // Rules already there are kept before flannel's jumps, which are appended.
    c.lab.host(1).ns.exec(
        "iptables",
        &["-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "RETURN"],
    )?;
    let a1 = OverlayProcess::start(
        &c.lab.host(1).ns,
        &unit_file_flags(&c, 1, &["-iptables-resync=1"]),
        Duration::from_secs(30),
    )?;
    let subnet = a1.ready["subnet"].as_str().context("subnet")?.to_string();
    let h1 = &c.lab.host(1).ns;
    let chain = h1.exec("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"])?;
    let c_ = "-m comment --comment \"flanneld masq\"";
    let n = "10.244.0.0/16";
    let expected = [
        "-N FLANNEL-POSTRTG".to_string(),
        format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c_} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {subnet} -d {n} {c_} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {n} -d {subnet} {c_} -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {n} -d {subnet} {c_} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {n} ! -d 224.0.0.0/4 {c_} -j MASQUERADE --random-fully"),
        format!("-A FLANNEL-POSTRTG ! -s {n} -d {n} {c_} -j MASQUERADE --random-fully"),
    ];
    assert_eq!(chain.lines().collect::<Vec<_>>(), expected, "{chain}");
    assert_eq!(
        last_rule(h1, "nat", "POSTROUTING")?,
        format!("-A POSTROUTING {c_} -j FLANNEL-POSTRTG")
    );
    let fwd = h1.exec("iptables", &["-S", "FLANNEL-FWD"])?;
    let fc = "-m comment --comment \"flanneld forward\"";
    assert_eq!(
        fwd.lines().collect::<Vec<_>>(),
        [
            "-N FLANNEL-FWD".to_string(),
            format!("-A FLANNEL-FWD -s {n} {fc} -j ACCEPT"),
            format!("-A FLANNEL-FWD -d {n} {fc} -j ACCEPT"),
        ]
    );
    assert_eq!(
        last_rule(h1, "filter", "FORWARD")?,
        format!("-A FORWARD {fc} -j FLANNEL-FWD")
    );

    // A firewall reload: everything flushed; back within the resync period.
    let before = nat_rules(h1)?;
    for args in [
        vec!["-t", "nat", "-F"],
        vec!["-F", "FORWARD"],
        vec!["-F", "FLANNEL-FWD"],
    ] {
        h1.exec("iptables", &args)?;
    }
    c.wait_until("flushed rules are put back", Duration::from_secs(4), || {
        Ok(last_rule(h1, "filter", "FORWARD")?.ends_with("-j FLANNEL-FWD")
            && h1.exec("iptables", &["-S", "FLANNEL-FWD"])?.lines().count() == 3
            && nat_rules(h1)?.contains("-j MASQUERADE --random-fully")
            && last_rule(h1, "nat", "POSTROUTING")?.ends_with("-j FLANNEL-POSTRTG"))
    })?;

    // Stop: the rules stay. Restart: the same rules, one jump each.
    a1.stop()?;
    let kept = nat_rules(h1)?;
    assert!(
        kept.contains("-j FLANNEL-POSTRTG") && kept.contains("MASQUERADE"),
        "{kept}"
    );
    let a1 = OverlayProcess::start(&c.lab.host(1).ns, &unit_file_flags(&c, 1, &[]), Duration::from_secs(30))?;
    let again = nat_rules(h1)?;
    assert_eq!(again.matches("-j FLANNEL-POSTRTG").count(), 1, "{again}");
    assert_eq!(
        h1.exec("iptables", &["-S", "FORWARD"])?
            .matches("-j FLANNEL-FWD")
            .count(),
        1
    );
    assert_eq!(
        again.lines().filter(|l| l.contains("FLANNEL")).count(),
        before.lines().filter(|l| l.contains("FLANNEL")).count()
    );
    drop(a1);
    let (code, _, stderr) = run_to_exit(
        agent_command(&c, 1, &unit_file_flags(&c, 1, &["--cleanup"])),
        Duration::from_secs(20),
    )?;
    assert_eq!(code, Some(0), "{stderr}");
    let all = format!("{}{}", nat_rules(h1)?, h1.exec("iptables", &["-S"])?);
    assert!(
        !all.contains("FLANNEL") && !all.contains("flanneld"),
        "left after --cleanup:\n{all}"
    );

    // host2 has no container bridge: --ip-blackhole-route adds the route for its subnet.
    let a2 = OverlayProcess::start(
        &c.lab.host(2).ns,
        &unit_file_flags(&c, 2, &["-ip-blackhole-route", "-iptables-resync=1"]),
        Duration::from_secs(30),
    )?;
    let subnet2 = a2.ready["subnet"].as_str().context("subnet")?.to_string();
    let h2 = &c.lab.host(2).ns;
    c.wait_until("the blackhole route appears", Duration::from_secs(4), || {
        Ok(h2.ip(&["route", "show", "type", "blackhole"])?.contains(&subnet2))
    })?;
    drop(a2);
    // ... and --cleanup removes it, with one flanneld left for the same subnet (no protocol).
    let (code, _, stderr) = run_to_exit(
        agent_command(&c, 2, &unit_file_flags(&c, 2, &["--cleanup"])),
        Duration::from_secs(20),
    )?;
    assert_eq!(code, Some(0), "{stderr}");
    let left = h2.ip(&["route", "show", "type", "blackhole"])?;
    assert!(!left.contains(&subnet2), "blackhole route left after --cleanup: {left}");
    let a2 = OverlayProcess::start(&c.lab.host(2).ns, &unit_file_flags(&c, 2, &[]), Duration::from_secs(30))?;
    drop(a2);
    h2.ip(&["route", "add", "blackhole", &subnet2])?;
    let (code, _, stderr) = run_to_exit(
        agent_command(&c, 2, &unit_file_flags(&c, 2, &["--cleanup"])),
        Duration::from_secs(20),
    )?;
    assert_eq!(code, Some(0), "{stderr}");
    let left = h2.ip(&["route", "show", "type", "blackhole"])?;
    assert!(
        !left.contains(&subnet2),
        "flanneld's blackhole route left after --cleanup: {left}"
    );
    Ok(())
}

/// `"EnableNFTables": true`: flannel's nftables table and chains instead of iptables, kept
/// up the same way, traffic flowing.
#[test]
fn nftables_rules_when_the_config_asks() -> anyhow::Result<()> {
    let mut c = Cluster::new(
        2,
        r#"{"Network":"10.244.0.0/16","SubnetLen":24,"EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#,
    )?;
    let mut agents = Vec::new();
    for i in 1..=2 {
        let a = OverlayProcess::start(
            &c.lab.host(i).ns,
            &unit_file_flags(&c, i, &["-iptables-resync=1"]),
            Duration::from_secs(30),
        )?;
        c.add_containers(i, &a, 1)?;
        agents.push(a);
    }
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let h1 = &c.lab.host(1).ns;
    let table = h1.exec("nft", &["list", "table", "ip", "flannel-ipv4"])?;
    for needle in [
        "chain postrtg", "type nat hook postrouting priority srcnat", "chain forward",
        "type filter hook forward priority filter", "ip saddr 10.244.0.0/16 accept", "masquerade fully-random",
        "meta mark & 0x00004000 == 0x00004000 return",
    ] {
        assert!(table.contains(needle), "{needle} missing:\n{table}");
    }
    let ipt = format!("{}{}", nat_rules(h1)?, h1.exec("iptables", &["-S"])?);
    assert!(!ipt.contains("FLANNEL"), "iptables rules next to nftables:\n{ipt}");
    let r = ping(
        &c.lab.host(1).containers[0].ns,
        c.lab.host(2).containers[0].ip,
        3,
        56,
        false,
        "0.05",
    )?;
    assert_eq!(r.received, 3, "{r:?}");

    h1.exec("nft", &["flush", "chain", "ip", "flannel-ipv4", "postrtg"])?;
    c.wait_until("the flushed nftables chain is put back", Duration::from_secs(4), || {
        Ok(h1
            .exec("nft", &["list", "chain", "ip", "flannel-ipv4", "postrtg"])?
            .contains("masquerade"))
    })?;
    agents.remove(0).stop()?;
    assert!(
        h1.exec("nft", &["list", "table", "ip", "flannel-ipv4"]).is_ok(),
        "the table stays on stop"
    );
    let (code, _, stderr) = run_to_exit(
        agent_command(&c, 1, &unit_file_flags(&c, 1, &["--cleanup"])),
        Duration::from_secs(20),
    )?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        h1.exec("nft", &["list", "table", "ip", "flannel-ipv4"]).is_err(),
        "the table is left after --cleanup"
    );
    Ok(())
}

/// flannel's vxlan `MTU` is the MTU before encapsulation: device and FLANNEL_MTU are MTU - 50,
/// with our datapath and with the kernel's.
#[test]
fn vxlan_mtu_is_before_encapsulation_on_both_datapaths() -> anyhow::Result<()> {
    let mut c = Cluster::new(
        2,
        r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","MTU":1400}}"#,
    )?;
    let a1 = OverlayProcess::start(&c.lab.host(1).ns, &unit_file_flags(&c, 1, &[]), Duration::from_secs(30))?;
    let a2 = OverlayProcess::start(
        &c.lab.host(2).ns,
        &unit_file_flags(&c, 2, &["--datapath=kernel"]),
        Duration::from_secs(30),
    )?;
    for (i, a, device) in [(1, &a1, "ovl0"), (2, &a2, "flannel.1")] {
        assert_eq!(a.ready["mtu"], 1350, "host{i}: {}", a.ready);
        let env = std::fs::read_to_string(c.subnet_file(i))?;
        assert!(env.contains("FLANNEL_MTU=1350"), "host{i}:\n{env}");
        let link = c.lab.host(i).ns.ip(&["link", "show", device])?;
        assert!(link.contains("mtu 1350 "), "host{i}: {link}");
    }
    c.add_containers(1, &a1, 1)?;
    c.add_containers(2, &a2, 1)?;
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    // The largest unfragmented packet the containers may send crosses both ways.
    let (h1, h2) = (c.lab.host(1), c.lab.host(2));
    let r = ping(&h1.containers[0].ns, h2.containers[0].ip, 2, 1350 - 28, true, "0.05")?;
    assert_eq!(r.received, 2, "{r:?}");
    let r = ping(&h2.containers[0].ns, h1.containers[0].ip, 2, 1350 - 28, true, "0.05")?;
    assert_eq!(r.received, 2, "{r:?}");
    drop((a1, a2));
    Ok(())
}

/// --public-ip alone finds the interface that holds it (these hosts have no default route);
/// host-gw refuses a PublicIP that is not on the interface, with flannel's reason.
#[test]
fn interface_from_public_ip_and_host_gw_refuses_nat() -> anyhow::Result<()> {
    let c = Cluster::new(
        1,
        r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#,
    )?;
    let flags: Vec<String> = unit_file_flags(&c, 1, &["-public-ip=192.168.250.1"])
        .into_iter()
        .filter(|f| f != "-iface=eth0")
        .collect();
    let a = OverlayProcess::start(&c.lab.host(1).ns, &flags, Duration::from_secs(30))?;
    assert_eq!(a.ready["public_ip"], "192.168.250.1");
    drop(a);
    let (code, _, stderr) = run_to_exit(
        agent_command(&c, 1, &unit_file_flags(&c, 1, &["-public-ip=203.0.113.7"])),
        Duration::from_secs(20),
    )?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("203.0.113.7") && stderr.contains("NAT"), "{stderr}");
    Ok(())
}

/// vxlan `DirectRouting`: a peer on our link is routed via its PublicIP without encapsulation
/// (our datapath and the kernel's), a peer behind a gateway stays encapsulated.
#[test]
fn direct_routing_skips_encapsulation_on_the_same_link_only() -> anyhow::Result<()> {
    let mut c = Cluster::new(
        3,
        r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","DirectRouting":true}}"#,
    )?;
    // host1 reaches host3 through host2 as a router: "behind a gateway".
    c.lab.host(1).ns.ip(&[
        "route", "add", "192.168.250.3/32", "via", "192.168.250.2", "dev", "eth0",
    ])?;
    let datapaths = [(1, "--datapath=ebpf"), (2, "--datapath=kernel"), (3, "--datapath=ebpf")];
    let mut agents = Vec::new();
    for (i, datapath) in datapaths {
        let a = OverlayProcess::start(
            &c.lab.host(i).ns,
            &unit_file_flags(&c, i, &[datapath]),
            Duration::from_secs(30),
        )?;
        c.add_containers(i, &a, 1)?;
        agents.push(a);
    }
    c.wait_full_mesh(3, Duration::from_secs(10))?;
    // Host routing's shortcut would encapsulate to every peer: off under DirectRouting.
    for a in [&agents[0], &agents[2]] {
        let backend = a.ready["backend"].as_str().unwrap_or_default();
        assert!(backend.contains("host routing kernel"), "{backend}");
    }
    let subnet = |i: usize| c.lab.host(i).subnet.expect("subnet").to_string();
    let route1 = c.lab.host(1).ns.ip(&["route", "show", &subnet(2)])?;
    assert!(
        route1.contains("via 192.168.250.2 dev eth0"),
        "host1 -> host2 direct: {route1}"
    );
    let route1_3 = c.lab.host(1).ns.ip(&["route", "show", &subnet(3)])?;
    assert!(
        !route1_3.contains("via 192.168.250.3"),
        "host1 -> host3 is behind a gateway: {route1_3}"
    );
    let route2 = c.lab.host(2).ns.ip(&["route", "show", &subnet(1)])?;
    assert!(
        route2.contains("via 192.168.250.1 dev eth0"),
        "kernel datapath, direct: {route2}"
    );

    let encapsulated = |a: &OverlayProcess| -> anyhow::Result<u64> {
        Ok(a.counters()?["counters"]["encap_vxlan"]["packets"]
            .as_u64()
            .unwrap_or(0))
    };
    let before = encapsulated(&agents[0])?;
    let (h1, h2, h3) = (c.lab.host(1), c.lab.host(2), c.lab.host(3));
    let r = ping(&h1.containers[0].ns, h2.containers[0].ip, 5, 56, false, "0.05")?;
    assert_eq!(r.received, 5, "to the direct peer: {r:?}");
    let after_direct = encapsulated(&agents[0])?;
    assert_eq!(
        after_direct, before,
        "packets to the peer on our link were encapsulated"
    );
    let r = ping(&h1.containers[0].ns, h3.containers[0].ip, 5, 56, false, "0.05")?;
    assert_eq!(r.received, 5, "to the peer behind a gateway: {r:?}");
    let after_gateway = encapsulated(&agents[0])?;
    assert!(
        after_gateway >= after_direct + 5,
        "the peer behind a gateway was not encapsulated ({after_direct} -> {after_gateway})"
    );
    drop(agents);
    Ok(())
}

/// Taking over a host where flannel's vxlan datapath runs (our kernel datapath is flannel's:
/// flannel.1, its per-peer routes, fdb and neighbour entries, left in place when the agent
/// stops, as flanneld leaves them). The eBPF agent started in its place removes flannel.1 once
/// attached and traffic moves over. Pings every 20 ms from a container on the switched host
/// across `stop flanneld; start overlay`: under 1 s lost.
#[test]
fn taking_over_a_flannel_host_loses_under_a_second() -> anyhow::Result<()> {
    let mut c = Cluster::new(2, VXLAN)?;
    let flannel = OverlayProcess::start(
        &c.lab.host(1).ns,
        &unit_file_flags(&c, 1, &["--datapath=kernel"]),
        Duration::from_secs(30),
    )?;
    c.add_containers(1, &flannel, 1)?;
    let a2 = OverlayProcess::start(&c.lab.host(2).ns, &unit_file_flags(&c, 2, &[]), Duration::from_secs(30))?;
    c.add_containers(2, &a2, 1)?;
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let (h1, h2) = (c.lab.host(1), c.lab.host(2));
    let r = ping(&h1.containers[0].ns, h2.containers[0].ip, 3, 56, false, "0.05")?;
    assert_eq!(r.received, 3, "before the switch: {r:?}");
    let link: serde_json::Value = serde_json::from_str(&h1.ns.ip(&["-j", "link", "show", "flannel.1"])?)?;
    let flannel_mac = link[0]["address"].as_str().context("flannel.1's MAC")?.to_string();

    let from = h1.containers[0].ns.name().to_string();
    let to = h2.containers[0].ip;
    let pinger = std::thread::spawn(move || -> anyhow::Result<(u32, u32)> {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &from, "ping", "-n", "-c", "250", "-i", "0.02", "-W", "1",
            ])
            .arg(to.to_string())
            .output()?;
        let r = parse_ping(&String::from_utf8_lossy(&out.stdout))?;
        Ok((r.transmitted, r.received))
    });
    std::thread::sleep(Duration::from_millis(500));
    flannel.stop()?;
    assert!(
        h1.ns.ip(&["link", "show", "flannel.1"]).is_ok(),
        "flannel's device stays when it stops"
    );
    // A dual-stack flanneld leaves its IPv6 device too (on its IPv6 address: ::1 stands in).
    h1.ns.ip(&[
        "link", "add", "flannel-v6.1", "type", "vxlan", "id", "1", "local", "::1", "dstport", "8472", "nolearning",
    ])?;
    let ours = OverlayProcess::start(&c.lab.host(1).ns, &unit_file_flags(&c, 1, &[]), Duration::from_secs(30))?;
    let (sent, received) = pinger.join().expect("pinger")?;
    let lost = sent - received;
    println!(
        "takeover outage: {lost} of {sent} pings lost at 20 ms intervals (about {} ms)",
        lost * 20
    );
    for device in ["flannel.1", "flannel-v6.1"] {
        assert!(
            h1.ns.ip(&["link", "show", device]).is_err(),
            "{device} left after the takeover"
        );
    }
    let route = h1.ns.ip(&["route", "get", &to.to_string()])?;
    assert!(route.contains("dev ovl0"), "traffic still on flannel's path: {route}");
    // flannel's VtepMAC is kept: the lease and every peer's entries for us stay as they were.
    let lease: serde_json::Value = serde_json::from_str(ours.ready["lease"].as_str().context("lease")?)?;
    assert_eq!(lease["BackendData"]["VtepMAC"], flannel_mac.as_str(), "{lease}");
    let link: serde_json::Value = serde_json::from_str(&h1.ns.ip(&["-j", "link", "show", "ovl0"])?)?;
    assert_eq!(
        link[0]["address"],
        flannel_mac.as_str(),
        "ovl0 did not take flannel's VtepMAC"
    );
    assert!(
        lost < 50,
        "{lost} pings lost (20 ms apart): the switch took a second or more"
    );
    let r = ping(&h1.containers[0].ns, h2.containers[0].ip, 3, 56, false, "0.05")?;
    assert_eq!(r.received, 3, "after the switch: {r:?}");
    drop((ours, a2));
    Ok(())
}

/// flanneld's host-gw leaves a route via each peer's PublicIP when it stops. Taking over: a
/// live peer's route becomes ours (our protocol number), the route of a peer that went while
/// flanneld was down is removed, routes outside the network are left alone; traffic flows.
#[test]
fn host_gw_takeover_removes_flannels_stale_routes() -> anyhow::Result<()> {
    let mut c = Cluster::new(
        2,
        r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#,
    )?;
    let a2 = OverlayProcess::start(&c.lab.host(2).ns, &unit_file_flags(&c, 2, &[]), Duration::from_secs(30))?;
    c.add_containers(2, &a2, 1)?;
    let subnet2 = a2.ready["subnet"].as_str().context("subnet")?.to_string();
    let ip2 = c.lab.host(2).public_ip.to_string();
    let h1 = &c.lab.host(1).ns;
    // As flanneld host-gw on host1 left them: the live peer, a peer gone since (its host is
    // down: the gateway answers nothing), and a route of the admin's outside the network.
    for (dst, via) in [
        (subnet2.as_str(), ip2.as_str()),
        ("10.244.200.0/24", "192.168.250.77"),
        ("172.31.5.0/24", ip2.as_str()),
    ] {
        h1.ip(&["route", "add", dst, "via", via, "dev", "eth0"])?;
    }
    let a1 = OverlayProcess::start(&c.lab.host(1).ns, &unit_file_flags(&c, 1, &[]), Duration::from_secs(30))?;
    c.add_containers(1, &a1, 1)?;
    let h1 = &c.lab.host(1).ns;
    c.wait_until("flannel's stale route is removed", Duration::from_secs(5), || {
        Ok(!h1.ip(&["route", "show"])?.contains("10.244.200.0/24"))
    })?;
    let live = h1.ip(&["route", "show", &subnet2])?;
    assert!(live.contains("proto 73"), "the live peer's route is not ours: {live}");
    let other = h1.ip(&["route", "show", "172.31.5.0/24"])?;
    assert!(
        other.contains("via"),
        "a route outside the network was touched: {other:?}"
    );
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let (h1, h2) = (c.lab.host(1), c.lab.host(2));
    let r = ping(&h1.containers[0].ns, h2.containers[0].ip, 3, 56, false, "0.05")?;
    assert_eq!(r.received, 3, "host1 -> host2: {r:?}");
    drop((a1, a2));
    Ok(())
}
