//! The agent where a host differs from the usual: no bpffs can be mounted (the eBPF datapath
//! then runs unpinned under `--datapath auto`, and `--datapath ebpf` says why it cannot), and
//! the network config changed in etcd while it runs (logged, not applied, as flanneld does).
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use overlay_tests::{cluster::Cluster, lab::workspace_bin};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;

/// An agent whose stderr goes to a file, killed when dropped.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ip netns exec <ns> [prefix...] overlay <args>`, as a unit would start it.
fn spawn(ns: &str, prefix: &[&str], args: &[String], log: &Path) -> Child {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .args(prefix)
        .arg(workspace_bin("overlay"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    cmd.spawn().expect("starting the agent")
}

/// The agent's ready line, or None if it exited or `timeout` passed first.
fn start(ns: &str, prefix: &[&str], args: &[String], log: PathBuf, timeout: Duration) -> (Agent, Option<String>) {
    let mut child = spawn(ns, prefix, args, &log);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(timeout).ok().filter(|l| !l.is_empty());
    (Agent { child, log }, ready)
}

/// The cluster's agent flags without its `--pin-dir` (a bpffs the test mounted), so the
/// agent uses the default under /sys/fs/bpf, as a packaged unit does.
fn default_pin_args(c: &mut Cluster, extra: &[&str]) -> Vec<String> {
    c.agent_args(1, extra)
        .unwrap()
        .into_iter()
        .filter(|a| !a.starts_with("--pin-dir"))
        .collect()
}

/// Without CAP_SYS_ADMIN the agent cannot mount a bpffs (as in a container that may load BPF
/// programs but not mount); the rest of what it does needs only CAP_BPF and CAP_NET_ADMIN.
const NO_MOUNTS: &[&str] = &["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--"];

#[test]
fn auto_runs_unpinned_where_no_bpffs_can_be_mounted() {
    let mut c = Cluster::new(1, VXLAN).unwrap();
    let ns = c.lab.host(1).ns.name().to_string();
    let dir = tempfile::tempdir().unwrap();

    // Asked for explicitly, pinning that cannot work is an error naming the directory.
    let args = default_pin_args(&mut c, &["--datapath=ebpf"]);
    let (mut agent, ready) = start(
        &ns,
        NO_MOUNTS,
        &args,
        dir.path().join("ebpf.log"),
        Duration::from_secs(20),
    );
    assert!(ready.is_none(), "started without pinning: {ready:?}");
    let status = agent.child.wait().unwrap();
    let log = agent.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("--pin-dir /sys/fs/bpf/overlay") && log.contains("--datapath auto"),
        "the error names the pin directory and the way out:\n{log}"
    );

    // auto: the eBPF datapath, unpinned, with a warning that says what is lost.
    let args = default_pin_args(&mut c, &[]);
    let (agent, ready) = start(
        &ns,
        NO_MOUNTS,
        &args,
        dir.path().join("auto.log"),
        Duration::from_secs(20),
    );
    let log = agent.log();
    let ready: serde_json::Value =
        serde_json::from_str(&ready.unwrap_or_else(|| panic!("auto did not start:\n{log}"))).unwrap();
    let backend = ready["backend"].as_str().unwrap();
    assert!(
        backend.starts_with("ebpf-vxlan") && backend.contains("unpinned"),
        "{backend}"
    );
    assert!(log.contains("hitless restart is lost"), "{log}");
    // Nothing was pinned, and the programs are attached.
    assert!(c.lab.host(1).ns.ip(&["link", "show", "ovl0"]).is_ok());
    drop(agent);
}

#[test]
fn network_config_changed_while_running_is_logged_not_applied() {
    let mut c = Cluster::new(1, VXLAN).unwrap();
    let ns = c.lab.host(1).ns.name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let args = c.agent_args(1, &[]).unwrap();
    let (agent, ready) = start(&ns, &[], &args, dir.path().join("agent.log"), Duration::from_secs(20));
    let ready: serde_json::Value = serde_json::from_str(&ready.expect("agent ready")).unwrap();
    let subnet_file = std::fs::read_to_string(c.subnet_file(1)).unwrap();

    let changed = r#"{"Network":"10.99.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#;
    c.overlay_on_switch(&["config", "set", "--etcd-endpoints", &c.endpoint(), changed])
        .unwrap();
    let start = Instant::now();
    c.wait_until("/status shows the pending config", Duration::from_secs(15), || {
        Ok(c.status(1)?["network_config_pending"].as_str() == Some(changed))
    })
    .unwrap();
    // A few more checks pass: the warning is not repeated.
    std::thread::sleep(Duration::from_secs(6));
    let log = agent.log();
    eprintln!("config change reported after {:?}", start.elapsed());
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("changed while the agent runs"))
        .collect();
    assert_eq!(warnings.len(), 1, "logged once:\n{log}");
    assert!(
        warnings[0].contains("10.244.0.0/16") && warnings[0].contains("10.99.0.0/16"),
        "old and new: {}",
        warnings[0]
    );
    // Not applied: same subnet, backend and subnet file.
    let status = c.status(1).unwrap();
    assert_eq!(status["subnet"], ready["subnet"]);
    assert_eq!(status["backend"], ready["backend"]);
    assert_eq!(std::fs::read_to_string(c.subnet_file(1)).unwrap(), subnet_file);
    drop(agent);
}
