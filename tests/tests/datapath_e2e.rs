//! The datapath end to end: two hosts in network namespaces joined by an underlay link, a
//! container behind a bridge on each, our programs in the kernel, real traffic. Every two-host
//! test runs with each decap hook (XDP, TC ingress).
use std::time::{Duration, Instant};

use overlay_tests::{
    lab::{self, Backend, OverlayProcess},
    traffic::{ping, tcp_transfer_verified},
};

const TRANSFER: u64 = 50 * 1024 * 1024;

fn counter(v: &serde_json::Value, name: &str) -> (u64, u64) {
    let c = &v["counters"][name];
    (c["packets"].as_u64().unwrap_or(0), c["bytes"].as_u64().unwrap_or(0))
}

/// `overlay datapath` on host `index` with `--decap <decap>`.
fn start_datapath(lab: &lab::Lab, index: usize, backend: Backend, decap: &str) -> anyhow::Result<OverlayProcess> {
    let mut args = lab::static_datapath_args(lab, index, backend);
    args.extend(["--decap".to_string(), decap.to_string()]);
    let p = OverlayProcess::start(&lab.host(index).ns, &args, Duration::from_secs(20))?;
    assert_eq!(p.ready["decap"], decap, "ready line: {}", p.ready);
    Ok(p)
}

fn two_hosts_both_ways(backend: Backend, hook: &str) -> anyhow::Result<()> {
    let lab = lab::static_lab(2, 1, backend)?;
    let procs = vec![
        start_datapath(&lab, 1, backend, hook)?,
        start_datapath(&lab, 2, backend, hook)?,
    ];
    let mtu = 1500 - backend.overhead();
    for p in &procs {
        assert_eq!(
            p.ready["mtu"],
            mtu,
            "overlay MTU = underlay MTU - {}",
            backend.overhead()
        );
    }
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let (c1, c2) = (&h1.containers[0], &h2.containers[0]);

    // Container to container, both ways.
    for (from, to) in [(c1, c2), (c2, c1)] {
        let r = ping(&from.ns, to.ip, 5, 56, false, "0.05")?;
        assert_eq!(r.received, 5, "{backend:?}: ping {} -> {}: {r:?}", from.ip, to.ip);
    }
    // Host-originated traffic to a remote container takes the overlay too.
    let r = ping(&h1.ns, c2.ip, 3, 56, false, "0.05")?;
    assert_eq!(r.received, 3, "{backend:?}: host1 -> {}: {r:?}", c2.ip);

    // Largest packet that fits the overlay MTU, DF set: must arrive whole.
    let max_payload = mtu - 28;
    let r = ping(&c1.ns, c2.ip, 3, max_payload, true, "0.05")?;
    assert_eq!(r.received, 3, "{backend:?}: {max_payload}-byte DF ping: {r:?}");

    // A container with a too-large MTU sends a DF packet bigger than the overlay MTU: the host
    // must answer "fragmentation needed" (ping sees it as an error, not silence).
    c1.ns.ip(&["link", "set", "eth0", "mtu", "1500"])?;
    let out = c1
        .ns
        .command("ping")
        .args([
            "-n",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            "-M",
            "do",
            "-s",
            &(max_payload + 1).to_string(),
        ])
        .arg(c2.ip.to_string())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&format!("mtu = {mtu}")) || text.contains(&format!("mtu={mtu}")),
        "{backend:?}: oversize DF ping should get fragmentation-needed with mtu {mtu}, got: {text}"
    );
    c1.ns.ip(&["link", "set", "eth0", "mtu", &mtu.to_string()])?;

    // Bulk TCP with every byte checked at the receiver, both directions.
    assert_eq!(tcp_transfer_verified(&c1.ns, &c2.ns, c2.ip, 5201, TRANSFER)?, TRANSFER);
    assert_eq!(
        tcp_transfer_verified(&c2.ns, &c1.ns, c1.ip, 5202, TRANSFER / 5)?,
        TRANSFER / 5
    );

    // No peer owns 10.244.99.0/24: dropped on host1 and counted.
    let r = ping(
        &c1.ns,
        "10.244.99.2".parse::<std::net::Ipv4Addr>()?,
        2,
        56,
        false,
        "0.05",
    )?;
    assert_eq!(r.received, 0);

    if hook == "tc" {
        let tc = tc_programs(&h1.ns, "eth0", aya::programs::tc::TcAttachType::Ingress)?;
        assert!(
            tc.iter().any(|n| n.starts_with("overlay_decap")),
            "TC decap on eth0: {tc:?}"
        );
    }

    let mut procs = procs.into_iter();
    let s1 = procs.next().unwrap().stop()?;
    let s2 = procs.next().unwrap().stop()?;
    let (encap, decap) = (format!("encap_{}", backend.name()), format!("decap_{}", backend.name()));
    let (p, b) = counter(&s1, &encap);
    assert!(
        p > 0 && b >= TRANSFER,
        "{backend:?}: host1 {encap} = {p} packets, {b} bytes"
    );
    let (p, b) = counter(&s2, &decap);
    assert!(
        p > 0 && b >= TRANSFER,
        "{backend:?}: host2 {decap} = {p} packets, {b} bytes"
    );
    // On TC the veth keeps GSO: the bulk arrives as tunnel skbs of many segments, which come
    // out of decapsulation whole (and the verified transfer above shows they come out right).
    // Native XDP makes the sender segment everything to MTU-sized frames.
    if hook == "tc" {
        assert!(
            b / p > 2 * 1500,
            "{backend:?}: {decap} averaged {} bytes per packet",
            b / p
        );
    } else {
        assert!(
            b / p <= 1500,
            "{backend:?}: {decap} averaged {} bytes per packet",
            b / p
        );
    }
    let (p, b) = counter(&s1, &decap);
    assert!(
        p > 0 && b >= TRANSFER / 5,
        "{backend:?}: host1 {decap} = {p} packets, {b} bytes"
    );
    assert_eq!(counter(&s1, "drop_no_peer").0, 2, "{backend:?}: {s1}");
    for s in [&s1, &s2] {
        for reason in [
            "drop_unknown_peer", "drop_spoofed_source", "drop_malformed", "drop_wrong_vni",
        ] {
            assert_eq!(counter(s, reason).0, 0, "{backend:?}: unexpected {reason}: {s}");
        }
    }
    // Both programs are gone with the processes: nothing left attached.
    for h in &lab.hosts {
        assert!(
            h.ns.ip(&["link", "show", "ovl0"]).is_err(),
            "overlay device left on {}",
            h.name()
        );
        let link = h.ns.ip(&["-d", "link", "show", "eth0"])?;
        assert!(!link.contains("xdp"), "XDP left attached on {}: {link}", h.name());
        let tc = tc_programs(&h.ns, "eth0", aya::programs::tc::TcAttachType::Ingress)?;
        assert!(
            !tc.iter().any(|n| n.starts_with("overlay_")),
            "TC program left attached on {}: {tc:?}",
            h.name()
        );
    }
    Ok(())
}

#[test]
fn udp_format_two_hosts_xdp_decap() -> anyhow::Result<()> {
    two_hosts_both_ways(Backend::Udp, "xdp")
}

#[test]
fn udp_format_two_hosts_tc_decap() -> anyhow::Result<()> {
    two_hosts_both_ways(Backend::Udp, "tc")
}

#[test]
fn vxlan_format_two_hosts_xdp_decap() -> anyhow::Result<()> {
    two_hosts_both_ways(Backend::Vxlan, "xdp")
}

#[test]
fn vxlan_format_two_hosts_tc_decap() -> anyhow::Result<()> {
    two_hosts_both_ways(Backend::Vxlan, "tc")
}

/// Generic XDP on a bare veth would never see the peer's tunnel packets: refused, with the
/// reason, before anything is attached.
#[test]
fn generic_xdp_on_a_veth_underlay_is_refused() -> anyhow::Result<()> {
    let lab = lab::static_lab(2, 0, Backend::Vxlan)?;
    let mut args = lab::static_datapath_args(&lab, 1, Backend::Vxlan);
    args.extend(["--xdp-mode".to_string(), "generic".to_string()]);
    let err = match OverlayProcess::start(&lab.host(1).ns, &args, Duration::from_secs(20)) {
        Ok(p) => panic!("started: {}", p.ready),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("exited before ready"), "{err}");
    let link = lab.host(1).ns.ip(&["-d", "link", "show", "eth0"])?;
    assert!(!link.contains("xdp"), "XDP attached anyway: {link}");
    Ok(())
}

/// Our vxlan datapath on host1, the kernel vxlan device as flannel's vxlan backend programs it on
/// host2: containers reach each other both ways.
fn vxlan_interop_with_flannel(decap: &str) -> anyhow::Result<()> {
    let lab = lab::static_lab(2, 1, Backend::Vxlan)?;
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let (s1, s2) = (lab::static_subnet(1), lab::static_subnet(2));
    let (mac1, mac2) = (lab::static_vtep_mac(1), lab::static_vtep_mac(2));

    lab::flannel_vxlan_host(&h2.ns, &h2.iface, h2.public_ip, s2, &mac2, 1500)?;
    lab::flannel_vxlan_add_peer(&h2.ns, s1, h1.public_ip, &mac1)?;
    let ours = start_datapath(&lab, 1, Backend::Vxlan, decap)?;

    let (c1, c2) = (&h1.containers[0], &h2.containers[0]);
    for (from, to) in [(c1, c2), (c2, c1)] {
        let r = ping(&from.ns, to.ip, 5, 56, false, "0.05")?;
        assert_eq!(r.received, 5, "ping {} -> {}: {r:?}", from.ip, to.ip);
        let r = ping(&from.ns, to.ip, 2, 1450 - 28, true, "0.05")?;
        assert_eq!(r.received, 2, "MTU-sized DF ping {} -> {}: {r:?}", from.ip, to.ip);
    }
    assert_eq!(tcp_transfer_verified(&c1.ns, &c2.ns, c2.ip, 5301, 20 << 20)?, 20 << 20);
    assert_eq!(tcp_transfer_verified(&c2.ns, &c1.ns, c1.ip, 5302, 20 << 20)?, 20 << 20);

    let s = ours.stop()?;
    assert!(counter(&s, "encap_vxlan").1 >= 20 << 20, "{s}");
    assert!(counter(&s, "decap_vxlan").1 >= 20 << 20, "{s}");
    Ok(())
}

#[test]
fn vxlan_interoperates_with_flannel_kernel_device_xdp_decap() -> anyhow::Result<()> {
    vxlan_interop_with_flannel("xdp")
}

#[test]
fn vxlan_interoperates_with_flannel_kernel_device_tc_decap() -> anyhow::Result<()> {
    vxlan_interop_with_flannel("tc")
}

/// A pinned datapath restarted with the other decap hook: the new hook is attached before the
/// old one is unpinned, and traffic flows after each switch (xdp -> tc -> tc -> xdp); a restart
/// with the same hook adopts its link.
#[test]
fn pinned_datapath_switches_decap_hook_on_restart() -> anyhow::Result<()> {
    use overlay::backend::{
        Peer,
        ebpf::{Datapath, DatapathSpec, DecapAttach, DecapHook, Format, HostRouting, Programs, XdpAttach},
    };

    let lab = lab::static_lab(2, 1, Backend::Vxlan)?;
    let peer2 = start_datapath(&lab, 2, Backend::Vxlan, "tc")?;
    let pin_dir = std::env::temp_dir().join(format!("overlay-pin-test-{}", std::process::id()));
    let h1 = lab.host(1);
    let spec = DatapathSpec {
        underlay: h1.iface.clone(),
        public_ip: h1.public_ip,
        format: Format::Vxlan,
        port: 8472,
        vni: 1,
        overlay_device: "ovl0".into(),
        mtu: None,
        vtep_mac: Some(lab::static_vtep_mac(1).parse().map_err(anyhow::Error::msg)?),
        xdp: XdpAttach::Auto,
        decap: DecapAttach::Xdp,
        pin_dir: Some(pin_dir.clone()),
        bridge_redirect: true,
        host_routing: HostRouting::Bpf,
    };
    let peer = Peer {
        subnet: lab::static_subnet(2),
        public_ip: lab.host(2).public_ip,
        vtep_mac: Some(lab::static_vtep_mac(2).parse().map_err(anyhow::Error::msg)?),
        ipv6: None,
    };
    let (c1, c2) = (&h1.containers[0], &lab.host(2).containers[0]);
    let result = (|| -> anyhow::Result<()> {
        let mut previous = None;
        for decap in [DecapAttach::Xdp, DecapAttach::Tc, DecapAttach::Tc, DecapAttach::Xdp] {
            let spec = DatapathSpec { decap, ..spec.clone() };
            let (hook, adopted) = h1
                .ns
                .spawn(move || -> anyhow::Result<(DecapHook, bool)> {
                    let programs = Programs::load_pinned(spec.pin_dir.as_deref())?;
                    let mut dp = Datapath::attach(programs, spec, lab::static_subnet(1), "10.244.0.0/16".parse()?)?;
                    dp.upsert_peer(peer)?;
                    Ok((dp.decap_hook(), dp.decap_adopted()))
                    // Dropped here: a pinned datapath stays attached.
                })
                .join()
                .expect("attach thread")??;
            assert_eq!(adopted, previous == Some(hook), "{decap:?} after {previous:?}: adopted");
            previous = Some(hook);
            let xdp = h1.ns.ip(&["-d", "link", "show", "eth0"])?.contains("xdp");
            assert_eq!(xdp, hook == DecapHook::Xdp, "{decap:?}: XDP attached = {xdp}");
            assert_eq!(pin_dir.join("link_decap").exists(), hook == DecapHook::Xdp);
            assert_eq!(pin_dir.join("link_decap_tc").exists(), hook == DecapHook::Tc);
            for (from, to) in [(c1, c2), (c2, c1)] {
                let r = ping(&from.ns, to.ip, 3, 56, false, "0.05")?;
                assert_eq!(r.received, 3, "{decap:?}: ping {} -> {}: {r:?}", from.ip, to.ip);
            }
        }
        Ok(())
    })();
    let dir = pin_dir.clone();
    h1.ns
        .spawn(move || Datapath::cleanup(&dir, "ovl0"))
        .join()
        .expect("cleanup thread")??;
    let _ = nix::mount::umount(&pin_dir);
    let _ = std::fs::remove_dir(&pin_dir);
    drop(peer2);
    result
}

// ---- bridge redirect -------------------------------------------------------------------------
//
// With TC decapsulation, `overlay_bridge_out` on docker0's egress hands frames for a container
// straight to its port, looking the MAC up in the datapath's copy of the bridge's FDB (synced
// once a second). Counters are read live from the running process.

const BRIDGE_TRANSFER: u64 = 20 << 20;

/// Poll `check` every 50 ms until it gives Some, for up to `timeout`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ping `to` from `from` until the datapath `p` has redirected a frame more than `since`:
/// its FDB copy holds the container's MAC on a live port. Returns the counter then.
fn wait_redirected(
    p: &OverlayProcess,
    from: &lab::Container,
    to: &lab::Container,
    since: u64,
    timeout: Duration,
) -> anyhow::Result<(u64, u64)> {
    wait_for("frames for the container redirected to its port", timeout, || {
        ping(&from.ns, to.ip, 1, 56, false, "0.2")?;
        let c = counter(&p.counters()?, "bridge_redirect");
        Ok((c.0 > since).then_some(c))
    })
}

/// Names of the TCX programs on `dev`'s `hook` in `ns`, as the kernel keeps them (15
/// characters). Asked with BPF_PROG_QUERY: the bpftool at hand does not list TCX links.
fn tc_programs(
    ns: &overlay_tests::netns::Netns,
    dev: &str,
    hook: aya::programs::tc::TcAttachType,
) -> anyhow::Result<Vec<String>> {
    let dev = dev.to_string();
    ns.spawn(move || -> anyhow::Result<Vec<String>> {
        let (_, programs) = aya::programs::SchedClassifier::query_tcx(&dev, hook)?;
        Ok(programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or_default().to_string())
            .collect())
    })
    .join()
    .expect("query thread")?
}

/// Whether `overlay_bridge_out` is on the TC egress of `dev` in `ns`.
fn bridge_program_on(ns: &overlay_tests::netns::Netns, dev: &str) -> anyhow::Result<bool> {
    let names = tc_programs(ns, dev, aya::programs::tc::TcAttachType::Egress)?;
    Ok(names
        .iter()
        .any(|n| !n.is_empty() && overlay_common::PROG_BRIDGE_OUT.starts_with(n.as_str())))
}

fn assert_delivers(from: &lab::Container, to: &lab::Container, port: u16) -> anyhow::Result<()> {
    let r = ping(&from.ns, to.ip, 5, 56, false, "0.05")?;
    assert_eq!(r.received, 5, "ping {} -> {}: {r:?}", from.ip, to.ip);
    assert_eq!(
        tcp_transfer_verified(&from.ns, &to.ns, to.ip, port, BRIDGE_TRANSFER)?,
        BRIDGE_TRANSFER,
        "TCP {} -> {}",
        from.ip,
        to.ip
    );
    Ok(())
}

/// Bulk TCP into a container on another host: the receiving host redirects it from the bridge
/// to the container's port, as whole GSO packets, and every byte arrives.
/// The bridge program's own tests: host routing (on by default) would deliver to the
/// containers before the bridge, so it is off here.
fn start_bridge_datapaths(lab: &lab::Lab) -> anyhow::Result<Vec<OverlayProcess>> {
    lab.hosts
        .iter()
        .map(|h| {
            let mut args = lab::static_datapath_args(lab, h.index, Backend::Vxlan);
            args.push("--host-routing=kernel".into());
            OverlayProcess::start(&h.ns, &args, Duration::from_secs(20))
        })
        .collect()
}

#[test]
fn bridge_redirect_carries_bulk_tcp_to_the_container() -> anyhow::Result<()> {
    let lab = lab::static_lab(2, 1, Backend::Vxlan)?;
    let procs = start_bridge_datapaths(&lab)?;
    for p in &procs {
        assert_eq!(p.ready["decap"], "tc", "ready line: {}", p.ready);
    }
    let (h2, c1, c2) = (lab.host(2), &lab.host(1).containers[0], &lab.host(2).containers[0]);
    assert!(bridge_program_on(&h2.ns, "docker0")?, "not on docker0 of host2");

    let r = ping(&c1.ns, c2.ip, 5, 56, false, "0.05")?;
    assert_eq!(r.received, 5, "ping {} -> {}: {r:?}", c1.ip, c2.ip);
    let before = wait_redirected(&procs[1], c1, c2, 0, Duration::from_secs(5))?;
    assert_eq!(tcp_transfer_verified(&c1.ns, &c2.ns, c2.ip, 5401, TRANSFER)?, TRANSFER);
    let after = counter(&procs[1].counters()?, "bridge_redirect");
    let (packets, bytes) = (after.0 - before.0, after.1 - before.1);
    assert!(
        packets > 0 && bytes >= TRANSFER,
        "host2 bridge_redirect moved by {packets} packets, {bytes} bytes for {TRANSFER} bytes sent"
    );
    // The point of the redirect: decapsulated GSO packets reach the port whole, where the
    // bridge would have segmented them.
    assert!(
        bytes / packets > 2 * 1500,
        "host2 redirected {} bytes per packet",
        bytes / packets
    );
    // Host1 redirects too: the ACKs, then a transfer the other way.
    assert_eq!(
        tcp_transfer_verified(&c2.ns, &c1.ns, c1.ip, 5402, BRIDGE_TRANSFER)?,
        BRIDGE_TRANSFER
    );

    let mut procs = procs.into_iter();
    let s1 = procs.next().unwrap().stop()?;
    let s2 = procs.next().unwrap().stop()?;
    assert!(counter(&s1, "bridge_redirect").1 >= BRIDGE_TRANSFER, "host1: {s1}");
    assert!(counter(&s2, "bridge_redirect").1 >= TRANSFER, "host2: {s2}");
    for h in &lab.hosts {
        assert!(!bridge_program_on(&h.ns, "docker0")?, "left on docker0 of {}", h.name());
    }
    Ok(())
}

/// `--bridge-redirect=false`: nothing on docker0, the bridge forwards, traffic still flows.
#[test]
fn bridge_redirect_off_leaves_the_bridge_alone() -> anyhow::Result<()> {
    let lab = lab::static_lab(2, 1, Backend::Vxlan)?;
    let procs = lab
        .hosts
        .iter()
        .map(|h| {
            let mut args = lab::static_datapath_args(&lab, h.index, Backend::Vxlan);
            args.push("--bridge-redirect=false".into());
            OverlayProcess::start(&h.ns, &args, Duration::from_secs(20))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (p, h) in procs.iter().zip(&lab.hosts) {
        assert_eq!(p.ready["decap"], "tc", "ready line: {}", p.ready);
        assert!(!bridge_program_on(&h.ns, "docker0")?, "on docker0 of {}", h.name());
    }
    let (c1, c2) = (&lab.host(1).containers[0], &lab.host(2).containers[0]);
    assert_delivers(c1, c2, 5411)?;
    assert_delivers(c2, c1, 5412)?;
    // Give the sync loop time to run at least twice: it must not attach anyway.
    std::thread::sleep(Duration::from_millis(2100));
    assert!(!bridge_program_on(&lab.host(2).ns, "docker0")?, "on docker0 of host2");

    for (p, h) in procs.into_iter().zip(&lab.hosts) {
        let s = p.stop()?;
        assert!(counter(&s, "decap_vxlan").1 >= BRIDGE_TRANSFER, "{}: {s}", h.name());
        for name in ["bridge_redirect", "bridge_unknown_port"] {
            assert_eq!(counter(&s, name), (0, 0), "{}: {name}: {s}", h.name());
        }
    }
    Ok(())
}

/// Stops a process (SIGSTOP) until dropped: its maps and programs stay as they are, nobody
/// updates them.
struct Frozen(nix::unistd::Pid);

impl Frozen {
    fn new(p: &OverlayProcess) -> anyhow::Result<Self> {
        let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
        Ok(Frozen(pid))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// A container restarted with the same IP and MAC on a new veth: traffic reaches it at once
/// through the bridge even while the datapath's FDB copy still names the dead port (the
/// kernel dropped that port from the devmap), and is redirected again once the copy caught up.
#[test]
fn bridge_redirect_follows_a_recreated_container() -> anyhow::Result<()> {
    let mut lab = lab::static_lab(2, 1, Backend::Vxlan)?;
    let procs = start_bridge_datapaths(&lab)?;
    let p2 = &procs[1];
    {
        let (c1, c2) = (&lab.host(1).containers[0], &lab.host(2).containers[0]);
        wait_redirected(p2, c1, c2, 0, Duration::from_secs(5))?;
    }
    let veth = |lab: &lab::Lab| -> anyhow::Result<u64> {
        let v: serde_json::Value = serde_json::from_str(&lab.host(2).ns.ip(&["-j", "link", "show", "veth0"])?)?;
        Ok(v[0]["ifindex"].as_u64().unwrap_or(0))
    };
    let old_port = veth(&lab)?;

    // Freeze host2's datapath so its copy certainly still maps the MAC to the old port.
    let frozen = Frozen::new(p2)?;
    lab.hosts[1].recreate_container(0)?;
    assert_ne!(veth(&lab)?, old_port, "the new port has a new ifindex");
    let (c1, c2) = (&lab.host(1).containers[0], &lab.host(2).containers[0]);
    let before = p2.counters()?;
    let r = ping(&c1.ns, c2.ip, 5, 56, false, "0.2")?;
    assert_eq!(r.received, 5, "ping {} -> recreated {}: {r:?}", c1.ip, c2.ip);
    assert!(r.rtts_ms.iter().all(|&ms| ms < 1000.0), "replies within 1 s: {r:?}");
    assert_eq!(
        tcp_transfer_verified(&c1.ns, &c2.ns, c2.ip, 5421, BRIDGE_TRANSFER)?,
        BRIDGE_TRANSFER
    );
    let during = p2.counters()?;
    assert_eq!(
        counter(&during, "bridge_redirect"),
        counter(&before, "bridge_redirect"),
        "nothing redirected through the stale copy"
    );
    assert!(
        counter(&during, "bridge_unknown_port").0 > counter(&before, "bridge_unknown_port").0,
        "frames for the dead port went to the bridge: {during}"
    );

    // Thawed, the next sync copies the new port.
    drop(frozen);
    let since = counter(&during, "bridge_redirect");
    let after = wait_redirected(p2, c1, c2, since.0, Duration::from_secs(5))?;
    assert_eq!(
        tcp_transfer_verified(&c1.ns, &c2.ns, c2.ip, 5422, BRIDGE_TRANSFER)?,
        BRIDGE_TRANSFER
    );
    let last = counter(&p2.counters()?, "bridge_redirect");
    assert!(
        last.1 - after.1 >= BRIDGE_TRANSFER,
        "redirected to the new port: {} bytes for {BRIDGE_TRANSFER} sent",
        last.1 - after.1
    );
    drop(procs);
    Ok(())
}

/// docker starts after flanneld: the datapath starts on a host without docker0, then the
/// bridge and a container appear; within a few seconds frames are redirected to the port.
#[test]
fn bridge_redirect_attaches_to_a_bridge_created_later() -> anyhow::Result<()> {
    let mtu = 1500 - Backend::Vxlan.overhead();
    let mut lab = lab::Lab::new(2, 1500)?;
    lab.hosts[0].add_containers(lab::static_subnet(1), mtu, 1)?;
    let procs = start_bridge_datapaths(&lab)?;
    assert!(lab.host(2).ns.ip(&["link", "show", "docker0"]).is_err());
    // A sync without a bridge passes.
    std::thread::sleep(Duration::from_millis(1100));

    lab.hosts[1].add_containers(lab::static_subnet(2), mtu, 1)?;
    let (c1, c2) = (&lab.host(1).containers[0], &lab.host(2).containers[0]);
    let start = Instant::now();
    let before = wait_redirected(&procs[1], c1, c2, 0, Duration::from_secs(5))?;
    eprintln!("redirecting {:?} after docker0 appeared", start.elapsed());
    assert!(
        bridge_program_on(&lab.host(2).ns, "docker0")?,
        "not on docker0 of host2"
    );
    assert_delivers(c1, c2, 5431)?;
    let after = counter(&procs[1].counters()?, "bridge_redirect");
    assert!(
        after.1 - before.1 >= BRIDGE_TRANSFER,
        "host2 redirected {} bytes for {BRIDGE_TRANSFER} sent",
        after.1 - before.1
    );

    // docker0 deleted and made again (the docker daemon restarted): the program follows the new
    // bridge, and traffic never depended on it.
    // Same MAC, as the container's neighbour cache holds it for its gateway.
    let ns = &lab.host(2).ns;
    let link: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", "docker0"])?)?;
    let mac = link[0]["address"].as_str().expect("docker0 has a MAC").to_string();
    ns.ip(&["link", "del", "docker0"])?;
    let bip = format!("{}/{}", lab::static_subnet(2).nth(1).expect("a /24"), 24);
    ns.ip(&["link", "add", "docker0", "address", &mac, "type", "bridge"])?;
    ns.ip(&["addr", "add", &bip, "dev", "docker0"])?;
    ns.ip(&["link", "set", "docker0", "mtu", &mtu.to_string(), "up"])?;
    ns.ip(&["link", "set", "veth0", "master", "docker0", "up"])?;
    let start = Instant::now();
    wait_redirected(&procs[1], c1, c2, after.0, Duration::from_secs(5))?;
    eprintln!("redirecting {:?} after docker0 was recreated", start.elapsed());
    assert!(bridge_program_on(ns, "docker0")?, "not on the new docker0 of host2");
    assert_delivers(c1, c2, 5432)?;
    drop(procs);
    Ok(())
}
