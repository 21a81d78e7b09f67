//! `overlay agent`: flanneld's job with our datapath. Lease a subnet in etcd, write the subnet
//! file, program the backend, then keep the backend equal to the set of leases in etcd
//! ([`peers`]).
pub mod args;
pub mod health;
pub mod iface;
pub mod iptables;
pub mod notify;
pub mod peers;
pub mod takeover;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
pub use args::{AgentArgs, DatapathChoice};
use iface::{interface_addresses, pick_interface, pick_interface_v6, pick_ipv6};
use ipnetwork::Ipv4Network;
use tokio::{signal::unix::SignalKind, sync::mpsc};

use self::peers::PeerSync;
use crate::{
    backend::{
        Backend, BackendError,
        direct_routing::DirectRouting,
        ebpf::{Datapath, DatapathSpec, EbpfBackend, EbpfHostGw, Format, HostRouting},
        host_gw::HostGw,
        kernel_vxlan::KernelVxlan,
        userspace_udp::UserspaceUdp,
    },
    host::{MacAddr, linkwatch::LinkEvents, netdev},
    subnet::{
        self, BackendKind, Lease, LeaseAttrs, LeaseEvent, LeaseManager, ManagerOptions, NetworkConfig, Registry as _,
        SubnetKey, config::Backend as BackendConfig, etcd::EtcdRegistry,
    },
};

/// Name flannel gives its vxlan device; our kernel fallback uses it too.
pub const KERNEL_VXLAN_DEVICE: &str = "flannel.1";
const RETRY_EVERY: Duration = Duration::from_secs(1);

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    if args.version {
        println!("overlay {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    args.check().map_err(anyhow::Error::msg)?;
    if args.cleanup {
        return cleanup(&args);
    }
    // A mask inherited blocked (from a supervisor or shell that blocks them) would make us deaf
    // to SIGTERM: the runtime's threads inherit this thread's mask.
    let mut stop = nix::sys::signal::SigSet::empty();
    stop.add(nix::sys::signal::Signal::SIGTERM);
    stop.add(nix::sys::signal::Signal::SIGINT);
    stop.thread_unblock()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: AgentArgs) -> anyhow::Result<()> {
    let mut stop = Stop::new()?;
    // The interface depends on the config's families (IPv6-only picks by IPv6 address); an
    // IPv4 network picks it first, as before, so a bad --iface fails before etcd is asked.
    let early = if args.public_ipv6.is_none() || args.public_ip.is_some() {
        pick_interface(&args).ok()
    } else {
        None
    };

    let status: health::SharedStatus = Arc::new(Mutex::new(health::Status {
        public_ip: early.as_ref().map(|(_, ip)| ip.to_string()),
        ..Default::default()
    }));
    if args.healthz_port != 0 {
        let addr = SocketAddr::from((args.healthz_ip, args.healthz_port));
        let server = health::serve(addr, status.clone())
            .await
            .with_context(|| format!("listening on {addr} for /healthz"))?;
        tokio::spawn(server);
    }
    let manager = Arc::new(lease_manager(&args, &status).await?);

    let config = tokio::select! {
        c = manager.wait_for_config() => c,
        _ = stop.signalled() => return Ok(()),
    };
    let underlay = Underlay::pick(&args, &config, early)?;
    let (iface, public_ip) = (
        underlay.name.clone(),
        underlay.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
    );
    tracing::info!(%iface, public_ip = ?underlay.public_ip, public_ipv6 = ?underlay.public_ipv6, "using interface");
    status.lock().expect("status").public_ip = Some(
        underlay
            .public_ip
            .map(|ip| ip.to_string())
            .or(underlay.public_ipv6.map(|ip| ip.to_string()))
            .unwrap_or_default(),
    );
    let network = config.ipv4.as_ref().map(|p| p.network);
    // The text in use, to tell a later change of it (logged, not applied: see below).
    let config_text = manager.registry().get_config().await.ok().flatten().unwrap_or_default();
    tokio::spawn(report_config_changes(manager.clone(), config_text, status.clone()));
    let flannel_leftovers = takeover::find(&config, network, &iface);
    let (mut backend, kind, fallback) = make_backend(&config, &args, &underlay, flannel_leftovers.vtep_mac())?;
    status.lock().expect("status").fallback = fallback;
    tracing::info!(backend = %backend.describe(), ?network, ipv6_network = ?config.ipv6.map(|p| p.network), "network config read");

    let mut attrs = backend.lease_attrs();
    let mut lease = manager.acquire(&config, &attrs).await.context("leasing a subnet")?;
    tracing::info!(subnet = %lease.key, "subnet leased");
    {
        let mut s = status.lock().expect("status");
        s.lease_held = true;
        s.subnet = Some(shown_subnet(&lease.key));
        s.lease_expires = lease.expires;
    }
    let rules = iptables::Upkeep::start(Duration::from_secs(args.iptables_resync));
    if let Err(e) = activate(&mut *backend, &args, &config, &lease, network, &status, &rules) {
        // Loading is not everything: a kernel can take the programs and still refuse to
        // attach them. `auto` then falls back as it does when they do not load, and the
        // lease is taken again with the fallback's attributes (its VtepMAC).
        if args.datapath != DatapathChoice::Auto || !backend.describe().starts_with("ebpf-") {
            return Err(e);
        }
        let reason = format!("the eBPF datapath does not attach here: {e:#}");
        tracing::warn!("{reason}; falling back to flannel's kernel datapath");
        status.lock().expect("status").fallback = Some(reason);
        drop(backend);
        Datapath::cleanup(&args.pin_dir, &args.overlay_device)
            .context("removing what the eBPF datapath left before falling back")?;
        let kernel_args = AgentArgs {
            datapath: DatapathChoice::Kernel,
            ..args.clone()
        };
        backend = make_backend(&config, &kernel_args, &underlay, None)?.0;
        attrs = backend.lease_attrs();
        lease = manager.acquire(&config, &attrs).await.context("leasing a subnet")?;
        activate(&mut *backend, &args, &config, &lease, network, &status, &rules)?;
    }
    let flannel_routes = takeover::finish(flannel_leftovers, &backend.describe(), &iface);
    notify::notify("READY=1");
    // One JSON line on stdout when ready, for scripts and tests (systemd gets READY=1).
    println!(
        "{}",
        serde_json::json!({
            "ready": true,
            "subnet": shown_subnet(&lease.key),
            "ipv6_subnet": lease.key.ipv6.map(|n| n.to_string()),
            "public_ip": public_ip.to_string(),
            "public_ipv6": underlay.public_ipv6.map(|ip| ip.to_string()),
            "mtu": backend.mtu(),
            "backend": backend.describe(),
            "lease": attrs.to_json(),
        })
    );

    let own_subnet = lease.key;
    let current_lease = lease.clone();
    let (tx, rx) = mpsc::channel::<LeaseEvent>(1024);
    let (republish, republish_rx) = mpsc::channel::<LeaseAttrs>(4);
    let run_manager = manager.clone();
    let run_config = config.clone();
    let lease_task = tokio::spawn(async move {
        run_manager
            .run_republishing(&run_config, lease, tx, Some(republish_rx))
            .await
    });
    let agent = Agent {
        backend: &mut *backend,
        args: &args,
        config: &config,
        network,
        status: &status,
        rules: &rules,
        peers: PeerSync::new(kind, status.clone()),
        flannel_routes,
        underlay: UnderlayLink::read(&iface),
        iface: iface.clone(),
        public_ip,
        lease: current_lease,
        published: attrs.clone(),
        republish,
    };
    let result = agent.follow_leases(own_subnet, rx, lease_task, &mut stop).await;

    notify::notify("STOPPING=1");
    tracing::info!("stopping; the datapath stays for the next start (`overlay agent --cleanup` removes it)");
    if let Some(c) = backend.counters() {
        println!("{}", serde_json::json!({ "counters": c.to_json() }));
    }
    // The rules stay, as flanneld leaves them: no gap for masqueraded traffic across a restart.
    drop(backend);
    result
}

const CONFIG_CHECK_EVERY: Duration = Duration::from_secs(5);

/// flanneld reads the network config once, at start: a change while running is logged, old
/// and new, once per new text, and not applied (a new network or backend means every host's
/// restart). `/status` shows the pending text.
async fn report_config_changes(manager: Arc<LeaseManager<EtcdRegistry>>, in_use: String, status: health::SharedStatus) {
    let same = |a: &str, b: &str| match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    };
    let key = manager.registry().config_key();
    let mut last = in_use.clone();
    loop {
        tokio::time::sleep(CONFIG_CHECK_EVERY).await;
        // Unreachable etcd is the lease loop's to report.
        let Ok(now) = manager.registry().get_config().await else {
            continue;
        };
        let now = now.unwrap_or_default();
        if same(&now, &last) {
            continue;
        }
        if same(&now, &in_use) {
            tracing::info!(%key, "the network config in etcd is back to the one in use");
            status.lock().expect("status").config_pending = None;
        } else {
            tracing::warn!(
                %key,
                old = %in_use,
                new = %now,
                "the network config in etcd changed while the agent runs; not applied (read at start, \
                 as flanneld does): restart the agent to use it"
            );
            status.lock().expect("status").config_pending = Some(now.clone());
        }
        last = now;
    }
}

/// SIGTERM or SIGINT, whichever comes first.
struct Stop {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> anyhow::Result<Self> {
        Ok(Stop {
            term: tokio::signal::unix::signal(SignalKind::terminate())?,
            int: tokio::signal::unix::signal(SignalKind::interrupt())?,
        })
    }

    async fn signalled(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The lease manager on etcd with flanneld's timing (TTL, renew margin) and the subnets a
/// previous run wrote to the subnet file.
async fn lease_manager(args: &AgentArgs, status: &health::SharedStatus) -> anyhow::Result<LeaseManager<EtcdRegistry>> {
    let registry = EtcdRegistry::connect(&args.etcd).await.context("connecting to etcd")?;
    let (previous_subnet, previous_ipv6_subnet) = subnet::file::read_previous_subnets(&args.subnet_file);
    let lease_ttl = Duration::from_secs(args.lease_ttl_secs);
    let mut renew_margin = Duration::from_secs(args.renew_margin_minutes * 60);
    if renew_margin >= lease_ttl {
        // Only with the test-only short TTLs: keep flannel's proportions.
        renew_margin = lease_ttl / 3;
    }
    // Shared with /metrics, which reads it live.
    let reconnects = status.lock().expect("status").etcd_reconnects.clone();
    Ok(LeaseManager::new(
        registry,
        ManagerOptions {
            reconnects,
            lease_ttl,
            renew_margin,
            previous_subnet,
            previous_ipv6_subnet,
            reacquire_on_loss: args.reacquire_lease,
            ..Default::default()
        },
    )?)
}

/// The running agent once its lease is held: what the lease loop works on.
struct Agent<'a> {
    backend: &'a mut dyn Backend,
    args: &'a AgentArgs,
    config: &'a NetworkConfig,
    network: Option<Ipv4Network>,
    status: &'a health::SharedStatus,
    rules: &'a iptables::Upkeep,
    peers: PeerSync,
    /// flanneld's host-gw routes found at start, removed once our peers are in place.
    flannel_routes: takeover::Routes,
    iface: String,
    public_ip: Ipv4Addr,
    /// The underlay as the datapath was last attached to it.
    underlay: Option<UnderlayLink>,
    /// Ours, as last (re)acquired: re-attaching writes the subnet file from it.
    lease: Lease,
    /// What our lease publishes (or will, once the lease task wrote it).
    published: LeaseAttrs,
    /// To the lease task: rewrite our lease with these attributes.
    republish: mpsc::Sender<LeaseAttrs>,
}

/// What the datapath takes from its underlay: a new ifindex means the device was re-created
/// (the programs went with the old one), a new MTU or address changes what we derive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UnderlayLink {
    ifindex: u32,
    mtu: u32,
    addr: Option<Ipv4Addr>,
}

impl UnderlayLink {
    /// None: no such interface (now).
    fn read(iface: &str) -> Option<UnderlayLink> {
        let link = netdev::link_info(iface).ok()?;
        let addr = interface_addresses()
            .ok()
            .and_then(|a| a.into_iter().find(|(n, _)| n == iface).map(|(_, a)| a));
        Some(UnderlayLink {
            ifindex: link.ifindex,
            mtu: link.mtu,
            addr,
        })
    }
}

impl Agent<'_> {
    /// Apply lease events as they come, tick once a second (backend upkeep, counters, retries),
    /// until a signal, or the lease task ends (our lease revoked, etcd gone for good).
    async fn follow_leases(
        mut self,
        mut own_subnet: SubnetKey,
        mut rx: mpsc::Receiver<LeaseEvent>,
        mut lease_task: tokio::task::JoinHandle<Result<(), subnet::ManagerError>>,
        stop: &mut Stop,
    ) -> anyhow::Result<()> {
        // Lease events applied since the heap was last given back: see `release_free_heap`.
        let mut events_since_trim = 0usize;
        let mut tick = tokio::time::interval(RETRY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Without notifications the tick still finds a changed underlay, a second later.
        let mut links = match LinkEvents::subscribe() {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("{e}; underlay changes are noticed on the 1 s tick only");
                None
            }
        };
        let link_changed = async |links: &mut Option<LinkEvents>| match links {
            Some(l) => l.changed().await,
            None => std::future::pending().await,
        };
        let result = loop {
            tokio::select! {
                event = rx.recv() => {
                    let Some(event) = event else { continue };
                    // Drain what is queued, so a burst costs one pass, not one per event.
                    let mut batch = vec![event];
                    while let Ok(e) = rx.try_recv() {
                        batch.push(e);
                    }
                    events_since_trim += batch.len();
                    for event in batch {
                        if let Some(subnet) = self.apply(event)? {
                            own_subnet = subnet;
                        }
                    }
                }
                _ = link_changed(&mut links) => {
                    self.follow_underlay();
                    self.backend.tick();
                }
                _ = tick.tick() => {
                    self.follow_underlay();
                    self.publish_lease_attrs();
                    self.backend.tick();
                    let counters = self.backend.counters();
                    self.status.lock().expect("status").counters = counters;
                    self.peers.reconcile_if_dirty(self.backend);
                    self.flannel_routes.remove_if_due(self.peers.settled());
                    if events_since_trim >= TRIM_AFTER_EVENTS {
                        events_since_trim = 0;
                        release_free_heap();
                    }
                }
                r = &mut lease_task => {
                    break match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!("lease for {own_subnet}"))),
                        Err(e) => Err(anyhow::anyhow!("lease task failed: {e}")),
                    };
                }
                _ = stop.signalled() => break Ok(()),
            }
        };
        lease_task.abort();
        result
    }

    /// One lease event; Some(subnet) when our own lease was taken again (maybe another subnet).
    fn apply(&mut self, event: LeaseEvent) -> anyhow::Result<Option<SubnetKey>> {
        match event {
            LeaseEvent::Added(l) | LeaseEvent::Changed(l) => self.peers.lease_put(self.backend, &l),
            LeaseEvent::Removed(l) => self.peers.lease_removed(self.backend, l.key),
            LeaseEvent::Reacquired(l) => {
                tracing::warn!(subnet = %l.key, "our lease was lost and leased again");
                activate(
                    self.backend, self.args, self.config, &l, self.network, self.status, self.rules,
                )?;
                self.peers.mark_dirty();
                self.lease = l.clone();
                return Ok(Some(l.key));
            }
        }
        Ok(None)
    }

    /// Have the lease task rewrite our lease when what the backend publishes changed (a new
    /// PublicIP): the peers re-point their entries for us when they see it.
    fn publish_lease_attrs(&mut self) {
        let attrs = self.backend.lease_attrs();
        if attrs == self.published {
            return;
        }
        match self.republish.try_send(attrs.clone()) {
            Ok(()) => self.published = attrs,
            // Full or gone: the next re-attach or tick tries again.
            Err(e) => tracing::warn!("handing our new lease attributes to the lease task: {e}"),
        }
    }

    /// Keep the datapath on the underlay: when the interface is gone, say so (`/readyz` 503,
    /// `overlay_datapath_attached 0`); when it is back as a new device, or its MTU or address
    /// changed, attach again and re-derive the MTU and subnet file. A failed attach is
    /// retried on the next change or tick.
    fn follow_underlay(&mut self) {
        let now = UnderlayLink::read(&self.iface);
        let detached = self.status.lock().expect("status").datapath_detached.clone();
        if now.is_some() && now == self.underlay && detached.is_none() {
            return;
        }
        let why = match &now {
            None => Some(format!("underlay interface {} is gone", self.iface)),
            Some(u) if u.addr.is_none() && self.args.public_ip.is_none() && self.network.is_some() => {
                Some(format!("underlay interface {} has no IPv4 address", self.iface))
            }
            Some(_) => None,
        };
        if let Some(why) = why {
            if detached.as_ref() != Some(&why) {
                tracing::warn!("{why}: the datapath is detached until it is back");
                self.status.lock().expect("status").datapath_detached = Some(why);
            }
            return;
        }
        let now = now.expect("checked above");
        // Our PublicIP came from the interface: it follows, as flanneld's would on restart.
        if let Some(addr) = now.addr
            && self.args.public_ip.is_none()
            && self.network.is_some()
            && addr != self.public_ip
        {
            tracing::warn!(
                iface = %self.iface,
                old = %self.public_ip,
                new = %addr,
                "the underlay's address changed: our PublicIP follows it"
            );
            if let Err(e) = self.backend.set_public_ip(addr) {
                let why = format!("the underlay's address changed to {addr}, and {e}: restart the agent");
                tracing::error!("{why}");
                self.status.lock().expect("status").datapath_detached = Some(why);
                return;
            }
            match iface::close_own_tcp_connections_from(self.public_ip) {
                Ok(0) => {}
                Ok(n) => tracing::info!(old = %self.public_ip, "closed {n} etcd connections from the old address"),
                Err(e) => tracing::warn!(
                    "closing our connections from the old address {}: {e:#}; etcd requests wait for them to time out",
                    self.public_ip
                ),
            }
            self.public_ip = addr;
            self.status.lock().expect("status").public_ip = Some(addr.to_string());
        }
        let started = std::time::Instant::now();
        let result = activate(
            self.backend, self.args, self.config, &self.lease, self.network, self.status, self.rules,
        );
        match result {
            Ok(()) => {
                self.publish_lease_attrs();
                self.peers.mark_dirty();
                self.peers.reconcile_if_dirty(self.backend);
                tracing::info!(
                    iface = %self.iface,
                    ifindex = now.ifindex,
                    mtu = self.backend.mtu(),
                    took = ?started.elapsed(),
                    "datapath attached again to the underlay"
                );
                let mut s = self.status.lock().expect("status");
                s.datapath_detached = None;
                s.underlay_reattached += 1;
                drop(s);
                self.underlay = Some(now);
            }
            Err(e) => {
                let why = format!("attaching to underlay interface {} failed: {e:#}", self.iface);
                tracing::warn!("{why} (retrying)");
                self.status.lock().expect("status").datapath_detached = Some(why);
            }
        }
    }
}

/// After this many lease events (a full listing at start or after a compaction, a large burst),
/// the next tick gives freed heap back to the system.
const TRIM_AFTER_EVENTS: usize = 1000;

/// Return free heap pages to the kernel. A listing of 10,000 leases is decoded (etcd's response,
/// JSON, events) into short-lived allocations interleaved with the long-lived peer tables; glibc
/// keeps the freed pages, which then count as resident for good (18 of 40 MB at 10,000 peers).
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Program the backend for our lease, install rules and write the subnet file.
fn activate(
    backend: &mut dyn Backend,
    args: &AgentArgs,
    config: &NetworkConfig,
    lease: &Lease,
    network: Option<Ipv4Network>,
    status: &health::SharedStatus,
    rules: &iptables::Upkeep,
) -> anyhow::Result<()> {
    let subnet = lease.key.ipv4_subnet();
    if let (Some(subnet), Some(network)) = (subnet, network) {
        backend
            .activate(subnet, network)
            .with_context(|| format!("programming {}", backend.describe()))?;
    }
    if let (Some(subnet), Some(pool)) = (lease.key.ipv6, &config.ipv6) {
        backend
            .activate_ipv6(subnet, pool.network)
            .with_context(|| format!("programming IPv6 on {}", backend.describe()))?;
    }
    status.lock().expect("status").datapath_attached = true;
    let random_fully =
        !args.ip_masq_fully_random_disable && (config.enable_nftables || iptables::iptables_has_random_fully());
    // One set per family the network has, as flannel's iptables and ip6tables rules.
    let families = [
        subnet.zip(network).map(|(s, n)| (s.into(), n.into())),
        lease
            .key
            .ipv6
            .zip(config.ipv6.map(|p| p.network))
            .map(|(s, n)| (s.into(), n.into())),
    ];
    for (subnet, network) in families.into_iter().flatten() {
        rules.apply(iptables::RuleSet {
            network,
            subnet,
            masquerade: args.ip_masq,
            random_fully,
            forward: args.iptables_forward_rules,
            nftables: config.enable_nftables,
            blackhole: args.ip_blackhole_route,
        })?;
    }
    subnet::file::write_subnet_file(&args.subnet_file, config, &lease.key, backend.mtu(), args.ip_masq)
        .with_context(|| format!("writing {}", args.subnet_file.display()))?;
    tracing::info!(file = %args.subnet_file.display(), mtu = backend.mtu(), "subnet file written");
    let mut s = status.lock().expect("status");
    s.subnet_file_written = true;
    s.subnet = Some(shown_subnet(&lease.key));
    s.backend = backend.describe();
    s.capabilities = backend.capabilities();
    Ok(())
}

/// Our subnet for people: the IPv4 one, or the IPv6 one in an IPv6-only network.
fn shown_subnet(key: &SubnetKey) -> String {
    match (key.ipv4_subnet(), key.ipv6) {
        (None, Some(v6)) => v6.to_string(),
        _ => key.ipv4.to_string(),
    }
}

/// The interface for inter-host traffic and our addresses on it, per family the network has.
struct Underlay {
    name: String,
    /// None in an IPv6-only network.
    public_ip: Option<Ipv4Addr>,
    /// Some when the network has IPv6.
    public_ipv6: Option<Ipv6Addr>,
}

impl Underlay {
    /// As flannel: the interface by IPv4 unless the network is IPv6-only; then the IPv6 address
    /// (`--public-ipv6`, else the interface's best).
    fn pick(args: &AgentArgs, config: &NetworkConfig, early: Option<(String, Ipv4Addr)>) -> anyhow::Result<Self> {
        if config.ipv4.is_none() {
            let (name, v6) = pick_interface_v6(args)?;
            return Ok(Underlay {
                name,
                public_ip: None,
                public_ipv6: Some(v6),
            });
        }
        let (name, ip) = match early {
            Some(picked) => picked,
            None => pick_interface(args)?,
        };
        let public_ipv6 = match config.ipv6 {
            Some(_) => Some(pick_ipv6(args, &name)?),
            None => None,
        };
        Ok(Underlay {
            name,
            public_ip: Some(ip),
            public_ipv6,
        })
    }
}

/// The backend the config asks for, with the lease kind its peers have: eBPF where it loads
/// (or as `--datapath` says), else the kernel datapath flannel itself uses; and why `auto`
/// fell back, if it did. `vtep_mac`: flannel's, for our vxlan device to keep.
fn make_backend(
    config: &NetworkConfig,
    args: &AgentArgs,
    underlay: &Underlay,
    vtep_mac: Option<MacAddr>,
) -> anyhow::Result<(Box<dyn Backend>, BackendKind, Option<String>)> {
    let fell_back = std::cell::RefCell::new(None);
    let iface = underlay.name.as_str();
    let public_ip = underlay.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
    // An IPv6-only network: PublicIP 0.0.0.0, as flannel writes it; the backend carries IPv6 only.
    let ebpf = |format: Format, port: u16, vni: u32, mtu: u32, host_routing: HostRouting| {
        let pin_dir = pin_dir_for(args)?;
        EbpfBackend::new(DatapathSpec {
            underlay: iface.to_string(),
            public_ip,
            format,
            port: if port == 0 { format.default_port() } else { port },
            vni,
            overlay_device: args.overlay_device.clone(),
            mtu: (mtu > 0).then_some(mtu),
            vtep_mac: if format == Format::Vxlan { vtep_mac } else { None },
            xdp: args.xdp_mode,
            decap: args.decap,
            pin_dir,
            bridge_redirect: args.bridge_redirect,
            host_routing,
        })?
        .with_public_ipv6(underlay.public_ipv6)
    };
    // eBPF, or the kernel datapath if asked for or (auto) if eBPF is unavailable here.
    let choose = |ebpf: &dyn Fn() -> Result<EbpfBackend, BackendError>,
                  kernel: &dyn Fn() -> anyhow::Result<Box<dyn Backend>>,
                  fallback: &str|
     -> anyhow::Result<Box<dyn Backend>> {
        match args.datapath {
            DatapathChoice::Kernel => kernel(),
            DatapathChoice::Ebpf => Ok(Box::new(ebpf()?)),
            DatapathChoice::Auto => match ebpf() {
                Ok(b) => Ok(Box::new(b)),
                Err(e @ BackendError::Unavailable(_)) => {
                    tracing::warn!("{e}; falling back to {fallback}");
                    *fell_back.borrow_mut() = Some(e.to_string());
                    kernel()
                }
                Err(e) => Err(e.into()),
            },
        }
    };
    config.check_supported()?;
    let (backend, kind) = match &config.backend {
        BackendConfig::Unsupported(_) => unreachable!("refused by check_supported"),
        BackendConfig::HostGw => {
            if underlay.public_ip.is_some() {
                iface::check_host_gw(iface, public_ip)?;
            }
            // Our eBPF host-gw is the kernel's routes plus host routing's shortcut: without
            // host routing it would be the kernel's host-gw with nothing added.
            let kernel = || -> anyhow::Result<Box<dyn Backend>> {
                Ok(Box::new(HostGw::new(iface, public_ip, underlay.public_ipv6)?))
            };
            let ebpf = || EbpfHostGw::new(iface, public_ip, underlay.public_ipv6, args.host_routing);
            let backend: Box<dyn Backend> = match (args.datapath, args.host_routing) {
                // Host routing is IPv4 only: in an IPv6-only network our host-gw would be the
                // kernel's routes with nothing added.
                (DatapathChoice::Auto | DatapathChoice::Ebpf, _) if underlay.public_ip.is_none() => {
                    let why = "host-gw in an IPv6-only network: the kernel's routes (host routing, which the \
                               eBPF host-gw adds to them, is IPv4 only)";
                    tracing::info!("{why}");
                    *fell_back.borrow_mut() = Some(why.into());
                    kernel()?
                }
                (DatapathChoice::Kernel, _) | (DatapathChoice::Auto, HostRouting::Kernel) => kernel()?,
                (DatapathChoice::Ebpf, _) => Box::new(ebpf()?),
                (DatapathChoice::Auto, HostRouting::Bpf) => match ebpf() {
                    Ok(b) => Box::new(b),
                    Err(e @ BackendError::Unavailable(_)) => {
                        tracing::warn!("{e}; falling back to the kernel's host-gw routes");
                        *fell_back.borrow_mut() = Some(e.to_string());
                        kernel()?
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            (backend, BackendKind::HostGw)
        }
        BackendConfig::Vxlan {
            vni,
            port,
            mtu,
            direct_routing,
            ..
        } => {
            // 0: from the interface.
            let mtu = &BackendConfig::vxlan_container_mtu(*mtu).unwrap_or(0);
            let kernel_port = if *port == 0 {
                Format::Vxlan.default_port()
            } else {
                *port
            };
            // The shortcut would encapsulate to every peer; with DirectRouting the kernel's
            // per-peer routes decide which peers go unencapsulated, so packets keep its path.
            let vxlan_host_routing = if *direct_routing {
                if args.host_routing == HostRouting::Bpf {
                    tracing::info!("DirectRouting: host routing off, the kernel's routes choose per peer");
                }
                HostRouting::Kernel
            } else {
                args.host_routing
            };
            let backend = choose(
                &|| ebpf(Format::Vxlan, *port, *vni, *mtu, vxlan_host_routing),
                &|| {
                    Ok(Box::new(KernelVxlan::new(
                        KERNEL_VXLAN_DEVICE, iface, underlay.public_ip, underlay.public_ipv6, *vni, kernel_port, *mtu,
                    )?))
                },
                "the kernel vxlan device",
            )?;
            if *direct_routing {
                (
                    Box::new(DirectRouting::new(backend, iface)) as Box<dyn Backend>,
                    BackendKind::Vxlan,
                )
            } else {
                (backend, BackendKind::Vxlan)
            }
        }
        BackendConfig::Udp { port } => {
            let kernel_port = if *port == 0 { Format::Udp.default_port() } else { *port };
            let backend = choose(
                &|| ebpf(Format::Udp, *port, 0, 0, args.host_routing),
                &|| udp_fallback(iface, public_ip, kernel_port),
                "the userspace udp forwarder",
            )?;
            (backend, BackendKind::Udp)
        }
    };
    Ok((backend, kind, fell_back.into_inner()))
}

/// Where the eBPF datapath pins, so that a restart adopts it without a gap. With `auto`, a
/// host where no bpffs can be had there (read-only /sys, mounting refused) runs it unpinned,
/// which loses only that; with `--datapath ebpf` it is an error.
fn pin_dir_for(args: &AgentArgs) -> Result<Option<std::path::PathBuf>, BackendError> {
    match netdev::ensure_bpffs(&args.pin_dir) {
        Ok(()) => Ok(Some(args.pin_dir.clone())),
        Err(e) if args.datapath == DatapathChoice::Auto => {
            tracing::warn!(
                pin_dir = %args.pin_dir.display(),
                "cannot pin the eBPF datapath ({e}): running it unpinned, so hitless restart is lost: \
                 stopping or restarting the agent removes the datapath and interrupts traffic"
            );
            Ok(None)
        }
        Err(e) => Err(BackendError::Other(format!(
            "--pin-dir {}: {e}. The eBPF datapath pins its maps and links there so that a restart keeps \
             traffic flowing: pass a --pin-dir on a bpffs, or --datapath auto to run unpinned",
            args.pin_dir.display()
        ))),
    }
}

fn udp_fallback(iface: &str, public_ip: Ipv4Addr, port: u16) -> anyhow::Result<Box<dyn Backend>> {
    let bind_ip = interface_addresses()?
        .into_iter()
        .find(|(n, _)| n == iface)
        .map(|(_, a)| a)
        .unwrap_or(public_ip);
    Ok(Box::new(UserspaceUdp::new(iface, public_ip, bind_ip, port)?))
}

/// Remove what the agent installed: the pinned eBPF datapath and its device, flannel's vxlan
/// device, routes with our protocol number, iptables chains, the subnet file.
fn cleanup(args: &AgentArgs) -> anyhow::Result<()> {
    if args.pin_dir.exists() {
        Datapath::cleanup(&args.pin_dir, &args.overlay_device)?;
    } else if netdev::link_exists(&args.overlay_device) {
        netdev::delete_link(&args.overlay_device)?;
    }
    for device in [KERNEL_VXLAN_DEVICE, crate::backend::userspace_udp::DEVICE] {
        if netdev::link_exists(device) {
            netdev::delete_link(device)?;
        }
    }
    for device in netdev::link_names()?.iter().filter(|n| n.starts_with("flannel-v6.")) {
        netdev::delete_link(device)?;
    }
    let _ = netdev::ip(&["route", "flush", "proto", crate::backend::ROUTE_PROTO]);
    let _ = netdev::ip(&["-6", "route", "flush", "proto", crate::backend::ROUTE_PROTO]);
    // A blackhole route added without our protocol number (by flanneld, or before we had one).
    if let (Some(subnet), _) = subnet::file::read_previous_subnets(&args.subnet_file) {
        iptables::remove_blackhole(subnet);
    }
    iptables::remove_all();
    if args.subnet_file.exists() {
        std::fs::remove_file(&args.subnet_file).with_context(|| format!("removing {}", args.subnet_file.display()))?;
    }
    tracing::info!("removed everything the agent installed");
    Ok(())
}
