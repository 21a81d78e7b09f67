//! A lab running the real thing: etcd on the underlay switch, `overlay agent` on every host
//! with its own subnet file and bpffs pin directory, containers built from the subnet file as
//! the seeds' docker does (`--bip` and `--mtu`).
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnetwork::Ipv4Network;
use tempfile::TempDir;

use crate::{
    etcd::Etcd,
    lab::{Lab, OverlayProcess, SWITCH_IP, workspace_bin},
    netns::Netns,
};

/// Where each agent serves /healthz etc., on its host namespace's loopback.
pub const HEALTHZ_PORT: u16 = 9099;

pub struct Cluster {
    /// Dropped before `etcd` and the mounts: namespaces first.
    pub lab: Lab,
    pub etcd: Etcd,
    dir: TempDir,
    mounts: Vec<PathBuf>,
}

impl Cluster {
    /// `hosts` hosts on a switch, etcd on the switch, and `config` as the network config.
    pub fn new(hosts: usize, config: &str) -> anyhow::Result<Self> {
        Self::new_opts(hosts, config, true)
    }

    /// As [`Self::new`]; with `die_with_parent` false, etcd outlives us (the demo's `--keep`).
    pub fn new_opts(hosts: usize, config: &str, die_with_parent: bool) -> anyhow::Result<Self> {
        let lab = Lab::with_switch(hosts, 1500)?;
        let etcd = Etcd::start_in_netns_opts(lab.switch.as_ref().expect("switch").name(), SWITCH_IP, die_with_parent);
        let dir = tempfile::Builder::new().prefix("overlay-cluster-").tempdir()?;
        let c = Cluster {
            lab,
            etcd,
            dir,
            mounts: Vec::new(),
        };
        c.overlay_on_switch(&["config", "set", "--etcd-endpoints", &c.etcd.endpoint(), config])?;
        Ok(c)
    }

    pub fn endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    pub fn switch(&self) -> &Netns {
        self.lab.switch.as_ref().expect("cluster labs have a switch")
    }

    /// Run the `overlay` CLI next to etcd (config, leases).
    pub fn overlay_on_switch(&self, args: &[&str]) -> anyhow::Result<String> {
        crate::netns::run(
            self.switch()
                .command(workspace_bin("overlay").to_str().expect("utf-8"))
                .args(args),
        )
    }

    /// `etcdctl` (v3 API) against the cluster's etcd.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        crate::netns::run(
            self.switch()
                .command("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", self.endpoint()))
                .args(args),
        )
    }

    /// A bpffs per host, mounted from here so that it outlives each `ip netns exec` (which gives
    /// the agent a private mount namespace) and a restarted agent finds its pins.
    pub fn pin_dir(&mut self, index: usize) -> anyhow::Result<PathBuf> {
        let dir = self.dir.path().join(format!("host{index}/bpf"));
        if !self.mounts.contains(&dir) {
            std::fs::create_dir_all(&dir)?;
            crate::netns::run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir))?;
            self.mounts.push(dir.clone());
        }
        Ok(dir)
    }

    pub fn subnet_file(&self, index: usize) -> PathBuf {
        self.dir.path().join(format!("host{index}/subnet.env"))
    }

    /// The flags an agent on host `index` gets: flanneld's, plus our per-host paths.
    pub fn agent_args(&mut self, index: usize, extra: &[&str]) -> anyhow::Result<Vec<String>> {
        let pin = self.pin_dir(index)?;
        let mut args: Vec<String> = vec![
            "agent".into(),
            format!("--etcd-endpoints={}", self.endpoint()),
            "--iface=eth0".into(),
            format!("--subnet-file={}", self.subnet_file(index).display()),
            format!("--pin-dir={}", pin.display()),
            "--healthz-ip=127.0.0.1".into(),
            format!("--healthz-port={HEALTHZ_PORT}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Ok(args)
    }

    pub fn start_agent(&mut self, index: usize, extra: &[&str]) -> anyhow::Result<OverlayProcess> {
        self.start_agent_opts(index, extra, true)
    }

    pub fn start_agent_opts(
        &mut self,
        index: usize,
        extra: &[&str],
        die_with_parent: bool,
    ) -> anyhow::Result<OverlayProcess> {
        let args = self.agent_args(index, extra)?;
        OverlayProcess::start_opts(
            &self.lab.host(index).ns,
            &args,
            Duration::from_secs(30),
            die_with_parent,
        )
        .with_context(|| format!("starting the agent on host{index}"))
    }

    /// Where per-host files (subnet files, pin directories) live.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Containers behind docker0 on host `index`, from the agent's ready line (its subnet file).
    pub fn add_containers(&mut self, index: usize, agent: &OverlayProcess, count: usize) -> anyhow::Result<()> {
        let subnet: Ipv4Network = agent.ready["subnet"]
            .as_str()
            .context("ready line without subnet")?
            .parse()?;
        let mtu = agent.ready["mtu"].as_u64().context("ready line without mtu")? as u32;
        let env = std::fs::read_to_string(self.subnet_file(index))?;
        let bip = format!(
            "FLANNEL_SUBNET={}/{}",
            Ipv4Addr::from(u32::from(subnet.network()) + 1),
            subnet.prefix()
        );
        if !env.contains(&bip) || !env.contains(&format!("FLANNEL_MTU={mtu}")) {
            bail!("subnet file of host{index} does not match the agent's lease {subnet} / MTU {mtu}:\n{env}");
        }
        self.lab.hosts[index - 1].add_containers(subnet, mtu, count)
    }

    /// An HTTP GET to the agent on host `index` (from inside its namespace).
    pub fn agent_get(&self, index: usize, path: &'static str) -> anyhow::Result<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT));
        self.lab
            .host(index)
            .ns
            .spawn(move || overlay::cli::status::http_get(addr, path))
            .join()
            .expect("thread")?
    }

    pub fn status(&self, index: usize) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.agent_get(index, "/status")?)?)
    }

    /// Subnets the agent on host `index` has programmed as peers.
    pub fn peer_subnets(&self, index: usize) -> anyhow::Result<Vec<String>> {
        let s = self.status(index)?;
        let mut v: Vec<String> = s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["subnet"].as_str().map(String::from))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Wait until the agent on each of the first `hosts` hosts has all the others as peers.
    pub fn wait_full_mesh(&self, hosts: usize, timeout: Duration) -> anyhow::Result<Duration> {
        self.wait_until("every agent knows every other host", timeout, || {
            Ok((1..=hosts).all(|i| self.peer_subnets(i).map(|p| p.len() == hosts - 1).unwrap_or(false)))
        })
    }

    /// Poll `check` until it holds or `timeout` passes; returns how long it took.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match check() {
                Ok(true) => return Ok(start.elapsed()),
                Ok(false) => {}
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("{what}: not true after {timeout:?} {last}")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Namespaces go first (the lab), then etcd with its drop, then our bpffs mounts.
        self.lab.hosts.clear();
        self.lab.switch = None;
        for m in self.mounts.drain(..) {
            let _ = Command::new("umount").arg(&m).output();
        }
    }
}
