//! Developer workflows. Every command first installs what is missing (Debian packages, the
//! BPF toolchain, bpf-linker), so each works on a fresh machine. This crate depends on nothing
//! that needs those tools: it must build before they exist.
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod vms;

/// Debian packages the build, the tests, the demo and the benchmarks use.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "Rust 1.96 with LLVM 22, builds the eBPF programs"),
    ("cargo-web", "its cargo"),
    ("libstd-rust-web-dev-bpf", "prebuilt core library for the BPF targets"),
    ("llvm-22-dev", "LLVM that bpf-linker links against"),
    ("protobuf-compiler", "protoc, for etcd-client's generated code"),
    ("libprotobuf-dev", "protobuf's well-known types, for etcd-client"),
    ("iproute2", "ip and bridge: namespaces, links, routes"),
    ("iputils-ping", "ping, in tests and the demo"),
    ("procps", "sysctl, in the test lab"),
    ("iptables", "masquerading and FORWARD rules of the agent"),
    ("nftables", "nft: the agent's rules with EnableNFTables"),
    ("ethtool", "offload settings in the test lab"),
    ("iperf3", "traffic for the benchmarks"),
    ("etcd-server", "etcd, started by the tests and the demo"),
    ("etcd-client", "etcdctl, for poking at the demo's etcd"),
    (
        "qemu-system-x86",
        "the VMs of the kernel matrix (`test --kernels`, `run --vms`)",
    ),
    ("busybox-static", "the VMs' initramfs"),
    ("kmod", "depmod for the VMs' kernels, modprobe inside the VMs"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian packages, bpf-linker and the VM matrix's kernels.
    Setup,
    /// Set up and build everything (release).
    Build,
    /// Set up, build and run all tests (needs root: they load programs and create namespaces).
    Test {
        /// Instead of `cargo test`: the kernel matrix, each listed Debian kernel (`6.1,6.12,5.10`,
        /// default all) in QEMU VMs running agents, containers and traffic.
        #[arg(long, value_name = "LIST", num_args = 0..=1, default_missing_value = "all")]
        kernels: Option<String>,
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The demo: hosts in network namespaces, containers pinging across them.
    Run {
        /// The demo in QEMU VMs on Debian's 6.1 kernel (see `overlay-vms demo --help`).
        #[arg(long)]
        vms: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: our datapath against flannel's backends, side by side; with
    /// `--control-plane`, the agent against 10,000 leases in etcd (see BENCHMARKS.md).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => {
            setup()?;
            vms::fetch(&vms::parse_list("all")?)
        }
        Cmd::Build => {
            setup()?;
            build()
        }
        Cmd::Test {
            kernels: Some(list),
            args,
        } => {
            require_root("the kernel matrix")?;
            let series = vms::parse_list(&list)?;
            setup()?;
            vms::fetch(&series)?;
            build()?;
            run(Command::new(target_bin("overlay-vms"))
                .arg("matrix")
                .arg("--kernels")
                .arg(series.join(","))
                .arg("--cache")
                .arg(vms::cache_dir())
                .args(&args))
        }
        Cmd::Test { kernels: None, args } => {
            require_root("the tests")?;
            setup()?;
            build()?;
            let mut cmd = cargo();
            cmd.args(["test", "--release"]).args(&args);
            run(&mut cmd)
        }
        Cmd::Run { vms: true, args } => {
            require_root("the demo")?;
            setup()?;
            vms::fetch(&["6.1"])?;
            build()?;
            run(Command::new(target_bin("overlay-vms"))
                .args(["demo", "--cache"])
                .arg(vms::cache_dir())
                .args(&args))
        }
        Cmd::Run { vms: false, args } => {
            require_root("the demo")?;
            setup()?;
            build()?;
            run(Command::new(target_bin("overlay-demo")).args(&args))
        }
        Cmd::Bench { args } => {
            require_root("the benchmarks")?;
            setup()?;
            build()?;
            run(Command::new(target_bin("overlay-bench")).args(&args))
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_bin(name: &str) -> PathBuf {
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("release").join(name)
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).env("PATH", path_with_tools());
    cmd
}

fn build() -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "--bins", "--tests"]))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("{what} need root (BPF programs, network namespaces): run as root, e.g. `sudo -E cargo xtask ...`");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Where bpf-linker is installed: `$OVERLAY_TOOLS_DIR` or `~/.cache/overlay-tools`
/// (overlay-user's build.rs looks in the same place).
fn tools_dir() -> PathBuf {
    env::var_os("OVERLAY_TOOLS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/overlay-tools")
    })
}

fn path_with_tools() -> std::ffi::OsString {
    let mut paths = vec![tools_dir().join("bin")];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).expect("PATH entries without ':'")
}

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&(&str, &str)> = APT_PACKAGES.iter().filter(|(p, _)| !dpkg_installed(p)).collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
        eprintln!("setup: installing Debian packages: {}", names.join(" "));
        if !nix_is_root() {
            bail!(
                "installing Debian packages needs root: run `sudo apt-get install -y {}`",
                names.join(" ")
            );
        }
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&names)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let linker = tools_dir().join("bin/bpf-linker");
    let have_linker = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !have_linker {
        eprintln!(
            "setup: installing bpf-linker {BPF_LINKER_VERSION} (built against LLVM 22) into {}",
            tools_dir().display()
        );
        run(Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
                "--root",
            ])
            .arg(tools_dir())
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
        .context("building bpf-linker")?;
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status: ExitStatus = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
