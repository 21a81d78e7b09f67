//! The kernel matrix and the demo in QEMU VMs (`cargo xtask test --kernels`, `cargo xtask run
//! --vms`), and the two ends of the VMs' TCP transfer, which run inside the VMs.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use overlay_tests::vms::{
    Accel, Fnv, Kernel, fill_stream,
    scenario::{self, CASES, Options},
};

#[derive(Parser)]
#[command(name = "overlay-vms")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Each kernel in two VMs: agents, containers, traffic, restarts; a table of the results.
    Matrix {
        /// Kernel series to run, comma-separated, as fetched by `cargo xtask setup`.
        #[arg(long, default_value = "6.1,6.12,5.10", value_delimiter = ',')]
        kernels: Vec<String>,
        /// Where `cargo xtask setup` unpacked the kernels.
        #[arg(long, default_value = "/root/.cache/overlay-vms")]
        cache: PathBuf,
        #[arg(long, value_enum, default_value_t = Accel::Tcg)]
        accel: Accel,
        /// Only the cases whose name contains this, e.g. `vxlan ebpf/tc` or `auto`.
        #[arg(long)]
        case: Option<String>,
        /// Size of each TCP transfer in bytes.
        #[arg(long, default_value_t = 16_000_000)]
        bytes: u64,
    },
    /// Two VMs on one Debian kernel running agents with containers, narrated.
    Demo {
        #[arg(long, default_value = "6.1")]
        kernel: String,
        #[arg(long, default_value = "/root/.cache/overlay-vms")]
        cache: PathBuf,
        #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "udp"])]
        backend: String,
        #[arg(long, default_value = "auto", value_parser = ["auto", "ebpf", "kernel"])]
        datapath: String,
        #[arg(long, value_enum, default_value_t = Accel::Tcg)]
        accel: Accel,
    },
    /// (In a VM) accept one connection, checksum what arrives, answer with length and checksum.
    TcpServe {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// (In a VM) send `bytes` of the test stream and compare the receiver's checksum with ours.
    TcpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Matrix {
            kernels,
            cache,
            accel,
            case,
            bytes,
        } => {
            let cases: Vec<_> = CASES
                .iter()
                .copied()
                .filter(|c| case.as_deref().is_none_or(|f| c.name().contains(f)))
                .collect();
            if cases.is_empty() {
                let names: Vec<String> = CASES.iter().map(|c| c.name()).collect();
                bail!("no case matches {case:?}: the cases are {}", names.join(", "));
            }
            let kernels: Vec<Kernel> = kernels
                .iter()
                .map(|k| Kernel::load(&cache, k))
                .collect::<anyhow::Result<_>>()?;
            let opts = Options {
                accel,
                cases,
                transfer_bytes: bytes,
                narrate: false,
            };
            let start = Instant::now();
            let mut all = Vec::new();
            for k in &kernels {
                let logs = scenario::logs_dir(&k.series)?;
                let outcomes = scenario::run_kernel(k, &opts, &logs);
                let failed = outcomes.iter().any(|o| o.failed());
                if failed {
                    eprintln!("overlay-vms: {}: logs kept in {}", k.release, logs.display());
                } else {
                    let _ = std::fs::remove_dir_all(&logs);
                }
                all.extend(outcomes);
            }
            println!(
                "\nkernel matrix ({:?}, {:.0} s; TCG figures are functional checks, not performance):\n",
                accel,
                start.elapsed().as_secs_f64()
            );
            print!("{}", scenario::table(&all));
            let failed = all.iter().filter(|o| o.failed()).count();
            println!("{} passed, {} failed", all.len() - failed, failed);
            if failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Demo {
            kernel,
            cache,
            backend,
            datapath,
            accel,
        } => {
            let k = Kernel::load(&cache, &kernel)?;
            let backend: &'static str = if backend == "udp" { "udp" } else { "vxlan" };
            let datapath: &'static str = match datapath.as_str() {
                "ebpf" => "ebpf",
                "kernel" => "kernel",
                _ => "auto",
            };
            println!(
                "demo: two QEMU VMs ({accel:?}) on Debian's {}, etcd on their bridge, `overlay agent` on each with a container",
                k.release
            );
            let opts = Options {
                accel,
                cases: vec![scenario::Case {
                    backend,
                    datapath,
                    decap: "auto",
                }],
                transfer_bytes: 4_000_000,
                narrate: true,
            };
            let logs = scenario::logs_dir(&k.series)?;
            let outcomes = scenario::run_kernel(&k, &opts, &logs);
            println!();
            print!("{}", scenario::table(&outcomes));
            println!("agents' logs and /status: {}", logs.display());
            if outcomes.iter().any(|o| o.failed()) {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::TcpServe { port, timeout_secs } => tcp_serve(port, Duration::from_secs(timeout_secs)),
        Cmd::TcpSend { to, bytes } => tcp_send(to, bytes),
    }
}

fn tcp_serve(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).with_context(|| format!("binding port {port}"))?;
    listener.set_nonblocking(true)?;
    let start = Instant::now();
    let (mut s, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > timeout {
                    bail!("no connection on port {port} in {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    };
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut sum = Fnv::default();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("reading from {peer} after {total} bytes"))?;
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        total += n as u64;
    }
    s.write_all(&total.to_be_bytes())?;
    s.write_all(&sum.value().to_be_bytes())?;
    println!("received {total} bytes from {peer}, fnv64 {:016x}", sum.value());
    Ok(())
}

fn tcp_send(to: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    // The receiver starts at about the same time in the other VM: retry for a while.
    let mut s = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {to}")),
        }
    };
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut sum = Fnv::default();
    let mut buf = vec![0u8; 1 << 16];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        fill_stream(sent, &mut buf[..n]);
        sum.update(&buf[..n]);
        s.write_all(&buf[..n])
            .with_context(|| format!("sending to {to} after {sent} bytes"))?;
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = [0u8; 16];
    s.read_exact(&mut answer).context("reading the receiver's checksum")?;
    let got_len = u64::from_be_bytes(answer[..8].try_into().expect("8 bytes"));
    let got_sum = u64::from_be_bytes(answer[8..].try_into().expect("8 bytes"));
    if got_len != bytes || got_sum != sum.value() {
        bail!(
            "sent {bytes} bytes with fnv64 {:016x}; the receiver got {got_len} bytes with fnv64 {got_sum:016x}",
            sum.value()
        );
    }
    println!(
        "sent {bytes} bytes to {to}, checksums match ({:016x}), {:.1} s",
        sum.value(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
