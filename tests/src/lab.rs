//! A multi-host lab on one machine, built from network namespaces as the seeds' guides build
//! it from machines: hosts on an underlay network, each with a Docker-like bridge (`docker0`)
//! and containers behind it.
use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnetwork::Ipv4Network;

use crate::netns::Netns;

/// Underlay addresses: 192.168.250.<host index>/24, private to the lab's namespaces.
pub fn underlay_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 250, index as u8)
}

pub struct Container {
    pub ns: Netns,
    pub ip: Ipv4Addr,
}

pub struct Host {
    pub index: usize,
    pub ns: Netns,
    /// Underlay interface inside the host namespace.
    pub iface: String,
    pub public_ip: Ipv4Addr,
    pub subnet: Option<Ipv4Network>,
    pub containers: Vec<Container>,
}

impl Host {
    pub fn name(&self) -> String {
        format!("host{}", self.index)
    }

    /// Create `docker0` with the subnet's first address (docker's `--bip`) and `count`
    /// containers behind it with MTU `mtu` (docker's `--mtu`), as the seeds' docker does.
    pub fn add_containers(&mut self, subnet: Ipv4Network, mtu: u32, count: usize) -> anyhow::Result<()> {
        let bip = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let ns = &self.ns;
        ns.ip(&["link", "add", "docker0", "type", "bridge"])?;
        ns.ip(&["addr", "add", &format!("{bip}/{}", subnet.prefix()), "dev", "docker0"])?;
        ns.ip(&["link", "set", "docker0", "mtu", &mtu.to_string(), "up"])?;
        for i in 0..count {
            let ip = Ipv4Addr::from(u32::from(subnet.network()) + 2 + i as u32);
            let c = self.plug_container(i, subnet, mtu, ip, None)?;
            self.containers.push(c);
        }
        self.subnet = Some(subnet);
        Ok(())
    }

    /// Replace container `i` as docker does when it restarts one: its port and namespace are
    /// deleted, and a new namespace is plugged into `docker0` through a new veth (a new
    /// ifindex), its `eth0` with the old IP and MAC.
    pub fn recreate_container(&mut self, i: usize) -> anyhow::Result<()> {
        let subnet = self.subnet.context("no containers on this host")?;
        let old = &self.containers[i];
        let eth0: serde_json::Value = serde_json::from_str(&old.ns.ip(&["-j", "link", "show", "eth0"])?)?;
        let mac = eth0[0]["address"].as_str().context("eth0 without a MAC")?.to_string();
        let mtu = eth0[0]["mtu"].as_u64().context("eth0 without an MTU")? as u32;
        let ip = old.ip;
        // Deleting the port takes the container's end with it at once; the namespace itself
        // is freed later by the kernel.
        self.ns.ip(&["link", "del", &format!("veth{i}")])?;
        let new = self.plug_container(i, subnet, mtu, ip, Some(&mac))?;
        drop(std::mem::replace(&mut self.containers[i], new));
        Ok(())
    }

    /// A container namespace behind `docker0` through port `veth<i>`, with `ip` (and `mac`).
    fn plug_container(
        &self,
        i: usize,
        subnet: Ipv4Network,
        mtu: u32,
        ip: Ipv4Addr,
        mac: Option<&str>,
    ) -> anyhow::Result<Container> {
        let bip = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let ns = &self.ns;
        let c = Netns::new(&format!("c{}{}", self.index, i))?;
        let veth = format!("veth{i}");
        ns.ip(&[
            "link",
            "add",
            &veth,
            "mtu",
            &mtu.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            c.name(),
        ])?;
        ns.ip(&["link", "set", &veth, "master", "docker0", "up"])?;
        if let Some(mac) = mac {
            c.ip(&["link", "set", "eth0", "address", mac])?;
        }
        c.ip(&["addr", "add", &format!("{ip}/{}", subnet.prefix()), "dev", "eth0"])?;
        c.ip(&["link", "set", "eth0", "mtu", &mtu.to_string(), "up"])?;
        c.ip(&["route", "add", "default", "via", &bip.to_string()])?;
        Ok(Container { ns: c, ip })
    }
}

pub struct Lab {
    pub hosts: Vec<Host>,
    /// The underlay bridge's namespace, when the hosts hang off a switch. The bridge itself
    /// has [`SWITCH_IP`], where lab services such as etcd listen.
    pub switch: Option<Netns>,
    underlay_mtu: u32,
}

/// The switch's own address on the underlay: etcd runs there in agent labs.
pub const SWITCH_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 250, 254);

impl Lab {
    /// `n` hosts on an underlay with the given MTU: a direct veth link for two hosts (the
    /// benchmark topology), a bridge ("switch") for more.
    pub fn new(n: usize, underlay_mtu: u32) -> anyhow::Result<Self> {
        if n == 2 {
            let mut lab = Lab {
                hosts: Vec::new(),
                switch: None,
                underlay_mtu,
            };
            let (a, b) = (lab.new_host(1)?, lab.new_host(2)?);
            plug_underlay(&a.ns, "eth0", &b, underlay_mtu)?;
            a.ns.ip(&["addr", "add", &format!("{}/24", a.public_ip), "dev", "eth0"])?;
            a.ns.ip(&["link", "set", "eth0", "up"])?;
            lab.hosts = vec![a, b];
            return Ok(lab);
        }
        Self::with_switch(n, underlay_mtu)
    }

    /// `n` hosts on an underlay bridge, which answers at [`SWITCH_IP`].
    pub fn with_switch(n: usize, underlay_mtu: u32) -> anyhow::Result<Self> {
        let sw = Netns::new("sw")?;
        sw.ip(&["link", "add", "sw0", "mtu", &underlay_mtu.to_string(), "type", "bridge"])?;
        sw.ip(&["addr", "add", &format!("{SWITCH_IP}/24"), "dev", "sw0"])?;
        sw.ip(&["link", "set", "sw0", "up"])?;
        let mut lab = Lab {
            hosts: Vec::new(),
            switch: Some(sw),
            underlay_mtu,
        };
        for _ in 0..n {
            lab.add_host()?;
        }
        Ok(lab)
    }

    /// Plug one more host into the switch; returns its index.
    pub fn add_host(&mut self) -> anyhow::Result<usize> {
        let index = self.hosts.len() + 1;
        let host = self.new_host(index)?;
        let sw = self
            .switch
            .as_ref()
            .context("hosts can be added only to a lab with a switch")?;
        let port = format!("p{index}");
        plug_underlay(sw, &port, &host, self.underlay_mtu)?;
        sw.ip(&["link", "set", &port, "master", "sw0", "up"])?;
        self.hosts.push(host);
        Ok(index)
    }

    fn new_host(&self, index: usize) -> anyhow::Result<Host> {
        let ns = Netns::new(&format!("h{index}"))?;
        // Docker sets the FORWARD policy to DROP; our hosts route like the seeds' do.
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(Host {
            index,
            ns,
            iface: "eth0".into(),
            public_ip: underlay_ip(index),
            subnet: None,
            containers: Vec::new(),
        })
    }

    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index - 1]
    }
}

/// A veth whose end `local` stays in `ns` and whose other end becomes `host`'s `eth0`, addressed
/// with the host's PublicIP and up.
fn plug_underlay(ns: &Netns, local: &str, host: &Host, mtu: u32) -> anyhow::Result<()> {
    let mtu = mtu.to_string();
    ns.ip(&[
        "link",
        "add",
        local,
        "mtu",
        &mtu,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        host.ns.name(),
    ])?;
    host.ns
        .ip(&["addr", "add", &format!("{}/24", host.public_ip), "dev", "eth0"])?;
    host.ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(())
}

/// Path of a binary built in this workspace's target directory (tests run from
/// `target/<profile>/deps/`), or `$OVERLAY_BIN` for `overlay`.
pub fn workspace_bin(name: &str) -> PathBuf {
    if name == "overlay"
        && let Some(p) = std::env::var_os("OVERLAY_BIN")
    {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// An `overlay` process running in a host namespace; stopped (SIGTERM, then SIGKILL) on drop.
pub struct OverlayProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// The JSON line the process printed when it became ready.
    pub ready: serde_json::Value,
}

impl OverlayProcess {
    /// Start `overlay <args>` in `ns` and wait (up to `timeout`) for its ready line on stdout.
    pub fn start(ns: &Netns, args: &[String], timeout: Duration) -> anyhow::Result<Self> {
        Self::start_opts(ns, args, timeout, true)
    }

    /// As [`Self::start`], with extra environment variables (e.g. `FLANNELD_*`).
    pub fn start_env(ns: &Netns, args: &[String], env: &[(&str, &str)], timeout: Duration) -> anyhow::Result<Self> {
        Self::spawn(ns, args, env, timeout, true)
    }

    /// As [`Self::start`]; with `die_with_parent` false the process outlives us (demo `--keep`).
    pub fn start_opts(ns: &Netns, args: &[String], timeout: Duration, die_with_parent: bool) -> anyhow::Result<Self> {
        Self::spawn(ns, args, &[], timeout, die_with_parent)
    }

    fn spawn(
        ns: &Netns,
        args: &[String],
        env: &[(&str, &str)],
        timeout: Duration,
        die_with_parent: bool,
    ) -> anyhow::Result<Self> {
        let bin = workspace_bin("overlay");
        if !bin.exists() {
            bail!(
                "{} not found: build the workspace first (cargo build --release)",
                bin.display()
            );
        }
        let mut cmd = ns.command(bin.to_str().expect("utf-8 path"));
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit());
        // Quiet unless asked: OVERLAY_LOG=info (or debug) shows what the agents do.
        cmd.env(
            "RUST_LOG",
            std::env::var("OVERLAY_LOG").unwrap_or_else(|_| "warn".into()),
        );
        cmd.envs(env.iter().copied());
        // The child dies with the thread that started it, even if the test is killed; and it
        // gets a clean signal mask (the demo blocks SIGINT/SIGTERM to handle Ctrl-C itself).
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(move || {
                crate::netns::unblock_signals();
                if die_with_parent {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let deadline = Instant::now() + timeout;
        let (tx, rx) = std::sync::mpsc::channel();
        // Read the ready line on a helper thread so the timeout holds even if the child hangs.
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            let r = stdout.read_line(&mut line).map(|_| line);
            let _ = tx.send(r);
            stdout
        });
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(line)) if !line.is_empty() => line,
            Ok(_) => {
                let status = child.wait()?;
                bail!("overlay {args:?} in {} exited before ready: {status}", ns.name());
            }
            Err(_) => {
                let _ = child.kill();
                bail!("overlay {args:?} in {} not ready after {timeout:?}", ns.name());
            }
        };
        let stdout = reader.join().expect("reader thread");
        let ready = serde_json::from_str(line.trim()).with_context(|| format!("ready line is not JSON: {line:?}"))?;
        Ok(OverlayProcess { child, stdout, ready })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The datapath counters as they are now, in the shape of the last line [`Self::stop`]
    /// returns (`{"counters": {name: {packets, bytes}}}`). Read from the counter map the
    /// process holds open, found through its /proc fdinfo: the map names of all running
    /// datapaths are the same.
    pub fn counters(&self) -> anyhow::Result<serde_json::Value> {
        use aya::maps::{Map, MapData, MapInfo, PerCpuArray};
        use overlay_common::{Counter, CounterIndex, MAP_COUNTERS};

        let pid = self.child.id();
        // The kernel keeps 15 characters of a map's name.
        let name = &MAP_COUNTERS[..MAP_COUNTERS.len().min(15)];
        let dir = format!("/proc/{pid}/fdinfo");
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let Ok(info) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            let Some(id) = info
                .lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
            else {
                continue;
            };
            if !MapInfo::from_id(id).is_ok_and(|m| m.name_as_str() == Some(name)) {
                continue;
            }
            let map: PerCpuArray<_, Counter> = Map::from_map_data(MapData::from_id(id)?)?.try_into()?;
            let mut totals = Vec::new();
            for i in 0..CounterIndex::COUNT {
                totals.push(map.get(&i, 0)?.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                }));
            }
            return Ok(serde_json::json!({ "counters": overlay::host::Counters(totals).to_json() }));
        }
        bail!("overlay (pid {pid}) holds no {name} map")
    }

    /// Whether the process has exited, with its status.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then read what the process prints on its way out (its final counters).
    pub fn stop(mut self) -> anyhow::Result<serde_json::Value> {
        self.terminate();
        let mut last = serde_json::Value::Null;
        let mut line = String::new();
        while self.stdout.read_line(&mut line)? > 0 {
            if let Ok(v) = serde_json::from_str(line.trim()) {
                last = v;
            }
            line.clear();
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!("overlay exited with {status}");
        }
        Ok(last)
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
}

impl Drop for OverlayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
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

/// Tunnel format names as the `overlay` CLI takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Udp,
    Vxlan,
    /// No tunnel (agents only: `overlay datapath` speaks the two wire formats).
    HostGw,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Udp => "udp",
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
        }
    }

    pub fn overhead(self) -> u32 {
        match self {
            Backend::Udp => 28,
            Backend::Vxlan => 50,
            Backend::HostGw => 0,
        }
    }
}

/// VtepMAC we give host `index` in static-peer runs, so peers can be listed up front.
pub fn static_vtep_mac(index: usize) -> String {
    format!("02:00:00:00:00:{index:02x}")
}

/// Container subnet of host `index` in static-peer runs.
pub fn static_subnet(index: usize) -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::new(10, 244, index as u8, 0), 24).expect("valid")
}

/// Arguments of `overlay datapath` for host `index` of `lab` with every other host as a peer.
pub fn static_datapath_args(lab: &Lab, index: usize, backend: Backend) -> Vec<String> {
    let host = &lab.hosts[index - 1];
    let mut args: Vec<String> = [
        "datapath",
        "--iface",
        &host.iface,
        "--public-ip",
        &host.public_ip.to_string(),
        "--subnet",
        &static_subnet(index).to_string(),
        "--network",
        "10.244.0.0/16",
        "--backend",
        backend.name(),
        "--vtep-mac",
        &static_vtep_mac(index),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for other in lab.hosts.iter().filter(|h| h.index != index) {
        args.push("--peer".into());
        args.push(format!(
            "{}={},{}",
            static_subnet(other.index),
            other.public_ip,
            static_vtep_mac(other.index)
        ));
    }
    args
}

/// Start the datapath on every host of `lab` with static peers; containers must exist.
pub fn start_static_datapaths(lab: &Lab, backend: Backend) -> anyhow::Result<Vec<OverlayProcess>> {
    start_static_datapaths_opts(lab, backend, true)
}

pub fn start_static_datapaths_opts(
    lab: &Lab,
    backend: Backend,
    die_with_parent: bool,
) -> anyhow::Result<Vec<OverlayProcess>> {
    lab.hosts
        .iter()
        .map(|h| {
            let args = static_datapath_args(lab, h.index, backend);
            OverlayProcess::start_opts(&h.ns, &args, Duration::from_secs(20), die_with_parent)
                .with_context(|| format!("starting the datapath on {}", h.name()))
        })
        .collect()
}

/// A lab of `n` hosts with `containers` containers each, on static subnets, sized for `backend`.
pub fn static_lab(n: usize, containers: usize, backend: Backend) -> anyhow::Result<Lab> {
    let underlay_mtu = 1500;
    let mut lab = Lab::new(n, underlay_mtu)?;
    for h in lab.hosts.iter_mut() {
        let subnet = static_subnet(h.index);
        h.add_containers(subnet, underlay_mtu - backend.overhead(), containers)?;
    }
    Ok(lab)
}

/// Program `ns` the way flannel's vxlan backend programs a host: a `flannel.1` vxlan device
/// (VNI 1, port 8472, nolearning) holding the subnet's network address, and per peer an onlink
/// route, a permanent neighbour entry and an FDB entry.
pub fn flannel_vxlan_host(
    ns: &Netns,
    iface: &str,
    public_ip: Ipv4Addr,
    subnet: Ipv4Network,
    vtep_mac: &str,
    underlay_mtu: u32,
) -> anyhow::Result<()> {
    let local = public_ip.to_string();
    ns.ip(&[
        "link", "add", "flannel.1", "address", vtep_mac, "type", "vxlan", "id", "1", "local", &local, "dev", iface,
        "dstport", "8472", "nolearning",
    ])?;
    ns.ip(&[
        "link",
        "set",
        "flannel.1",
        "mtu",
        &(underlay_mtu - 50).to_string(),
        "up",
    ])?;
    ns.ip(&["addr", "add", &format!("{}/32", subnet.network()), "dev", "flannel.1"])?;
    Ok(())
}

/// What flannel's vxlan backend adds when it learns a peer's lease.
pub fn flannel_vxlan_add_peer(
    ns: &Netns,
    subnet: Ipv4Network,
    public_ip: Ipv4Addr,
    vtep_mac: &str,
) -> anyhow::Result<()> {
    let gw = subnet.network().to_string();
    ns.ip(&[
        "neigh", "replace", &gw, "lladdr", vtep_mac, "dev", "flannel.1", "nud", "permanent",
    ])?;
    crate::netns::run(ns.command("bridge").args([
        "fdb",
        "append",
        vtep_mac,
        "dev",
        "flannel.1",
        "dst",
        &public_ip.to_string(),
    ]))?;
    ns.ip(&[
        "route",
        "replace",
        &subnet.to_string(),
        "via",
        &gw,
        "dev",
        "flannel.1",
        "onlink",
    ])?;
    Ok(())
}
