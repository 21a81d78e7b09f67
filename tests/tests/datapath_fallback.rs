//! `--datapath auto` where the eBPF datapath loads but cannot attach, and what the agent
//! reports about this kernel's capabilities.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    cluster::Cluster,
    lab::{OverlayProcess, workspace_bin},
    traffic::ping,
};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;

/// Run `cmd` until it exits (at most `timeout`): exit code and stderr.
fn run_to_exit(mut cmd: Command, timeout: Duration) -> anyhow::Result<(Option<i32>, String)> {
    let mut child = cmd
        .stdout(Stdio::null())
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
    Ok((out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// Host 1's underlay address moves to a bridge `br0` with its `eth0` as a port, as on a
/// hypervisor host. A bridge has no native XDP: with `--decap xdp --xdp-mode native` the
/// programs load but the decap program cannot attach. `--datapath ebpf` exits naming the
/// failure; `auto` runs flannel's kernel vxlan device instead, says why in /status, leaves no
/// eBPF datapath behind and carries traffic both ways with a host on our eBPF datapath.
#[test]
fn auto_falls_back_when_attaching_fails() -> anyhow::Result<()> {
    let mut c = Cluster::new(2, VXLAN)?;
    let h1 = &c.lab.host(1).ns;
    let addr = format!("{}/24", c.lab.host(1).public_ip);
    h1.ip(&["link", "add", "br0", "type", "bridge"])?;
    h1.ip(&["addr", "del", &addr, "dev", "eth0"])?;
    h1.ip(&["link", "set", "eth0", "master", "br0"])?;
    h1.ip(&["addr", "add", &addr, "dev", "br0"])?;
    h1.ip(&["link", "set", "br0", "up"])?;
    let on_bridge = |c: &mut Cluster, datapath: &str| -> anyhow::Result<Vec<String>> {
        let mut args = c.agent_args(1, &[datapath, "--decap=xdp", "--xdp-mode=native"])?;
        for a in &mut args {
            if a == "--iface=eth0" {
                *a = "--iface=br0".into();
            }
        }
        Ok(args)
    };

    let args = on_bridge(&mut c, "--datapath=ebpf")?;
    let mut cmd = c
        .lab
        .host(1)
        .ns
        .command(workspace_bin("overlay").to_str().expect("utf-8"));
    cmd.args(&args).env("RUST_LOG", "warn");
    let (code, stderr) = run_to_exit(cmd, Duration::from_secs(60))?;
    assert_ne!(
        code,
        Some(0),
        "--datapath ebpf started on a bridge with native XDP: {stderr}"
    );
    assert!(
        stderr.contains("overlay_decap") && stderr.contains("br0"),
        "the error names neither the program nor the interface: {stderr}"
    );

    let args = on_bridge(&mut c, "--datapath=auto")?;
    let a1 = OverlayProcess::start(&c.lab.host(1).ns, &args, Duration::from_secs(30))?;
    let backend = a1.ready["backend"].as_str().unwrap_or_default();
    assert!(backend.contains("flannel.1"), "auto did not fall back: {backend}");
    let status = c.status(1)?;
    let why = status["fallback"].as_str().unwrap_or_default();
    assert!(
        why.contains("does not attach") && why.contains("overlay_decap"),
        "/status does not say why: {status}"
    );
    let pin_dir = c.pin_dir(1)?;
    let h1 = &c.lab.host(1).ns;
    assert!(
        h1.ip(&["link", "show", "ovl0"]).is_err(),
        "the eBPF overlay device stayed"
    );
    // (bpffs shows its own maps.debug and progs.debug.)
    let pins: Vec<String> = std::fs::read_dir(pin_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".debug"))
        .collect();
    assert!(pins.is_empty(), "pins left by the eBPF attempt: {pins:?}");
    // The lease now carries flannel.1's MAC, which the eBPF peer must use.
    let lease: serde_json::Value = serde_json::from_str(a1.ready["lease"].as_str().context("lease")?)?;
    let mac = h1.ip(&["-j", "link", "show", "flannel.1"])?;
    let mac: serde_json::Value = serde_json::from_str(&mac)?;
    assert_eq!(lease["BackendData"]["VtepMAC"], mac[0]["address"], "{lease}");

    c.add_containers(1, &a1, 1)?;
    let a2 = c.start_agent(2, &[])?;
    assert!(
        a2.ready["backend"]
            .as_str()
            .unwrap_or_default()
            .starts_with("ebpf-vxlan")
    );
    c.add_containers(2, &a2, 1)?;
    c.wait_full_mesh(2, Duration::from_secs(10))?;
    let (h1, h2) = (c.lab.host(1), c.lab.host(2));
    let r = ping(&h1.containers[0].ns, h2.containers[0].ip, 3, 56, false, "0.05")?;
    assert_eq!(r.received, 3, "host1 -> host2: {r:?}");
    let r = ping(&h2.containers[0].ns, h1.containers[0].ip, 3, 56, false, "0.05")?;
    assert_eq!(r.received, 3, "host2 -> host1: {r:?}");
    drop((a1, a2));
    Ok(())
}

/// (major, minor) of the running kernel.
fn kernel_version() -> anyhow::Result<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let mut next = || -> anyhow::Result<u32> { Ok(parts.next().context("kernel release")?.parse()?) };
    Ok((next()?, next()?))
}

/// `/status` reports what the kernel offers, as the kernel's history says this version has
/// it: TCX from 6.6, vxlan's encap flag from 5.13, the decap flags from 6.3 and after 6.18,
/// memlock accounting before 5.11; native XDP on a veth underlay (`--decap xdp`), not tried
/// with TC decap.
#[test]
fn status_reports_the_kernels_capabilities() -> anyhow::Result<()> {
    let version = kernel_version()?;
    let mut c = Cluster::new(2, VXLAN)?;
    let a1 = c.start_agent(1, &["--decap=tc"])?;
    let a2 = c.start_agent(2, &["--decap=xdp"])?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    for (i, native_xdp) in [(1, serde_json::Value::Null), (2, serde_json::Value::Bool(true))] {
        let status = c.status(i)?;
        let caps = &status["capabilities"];
        assert_eq!(caps["kernel"], release.trim(), "host{i}: {caps}");
        let tc = if version >= (6, 6) { "tcx" } else { "clsact" };
        assert_eq!(caps["tc_attach"], tc, "host{i}: {caps}");
        assert_eq!(caps["native_xdp"], native_xdp, "host{i}: {caps}");
        let room = &caps["adjust_room"];
        assert_eq!(room["encap_udp"], true, "{caps}");
        assert_eq!(room["encap_vxlan"], version >= (5, 13), "{caps}");
        assert_eq!(room["decap_l3_ipv4"], version >= (6, 3), "{caps}");
        assert_eq!(room["decap_l4_udp"], version >= (6, 19), "{caps}");
        for helper in ["redirect_neigh", "redirect_peer", "fib_lookup"] {
            assert_eq!(caps["helpers"][helper], true, "{helper}: {caps}");
        }
        assert_eq!(caps["memlock_charged"], version < (5, 11), "{caps}");
    }
    drop((a1, a2));
    Ok(())
}
