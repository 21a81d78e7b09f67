//! Compiles `overlay-ebpf` for the BPF target and embeds it. The route that works on Debian
//! machines is recorded in the README: Debian's rustc 1.96 with prebuilt `core` for bpfel, and
//! bpf-linker built against LLVM 22. Missing pieces fail here with the command that installs them.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

const SETUP_HINT: &str = "run `cargo xtask setup` (installs Debian's rustc-web, \
libstd-rust-web-dev-bpf, llvm-22-dev and bpf-linker)";

fn tools_dir() -> Option<PathBuf> {
    env::var_os("OVERLAY_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/overlay-tools")))
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=OVERLAY_TOOLS_DIR");
    let toolchain = env::var("OVERLAY_BPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".into());
    println!("cargo:rerun-if-env-changed=OVERLAY_BPF_TOOLCHAIN");

    let rustc = PathBuf::from(&toolchain).join("bin/rustc");
    if !rustc.exists() {
        bail!(
            "{} not found: the BPF toolchain is missing; {SETUP_HINT}",
            rustc.display()
        );
    }
    let core = PathBuf::from(&toolchain).join("lib/rustlib/bpfel-unknown-none/lib");
    if !core.exists() {
        bail!(
            "{} not found: prebuilt core for BPF is missing; {SETUP_HINT}",
            core.display()
        );
    }

    // bpf-linker: on PATH, or in the tools cache where `cargo xtask setup` puts it.
    let on_path = Command::new("bpf-linker").arg("--version").output().is_ok();
    if !on_path {
        let dir = tools_dir().context("neither HOME nor OVERLAY_TOOLS_DIR is set")?;
        let bin = dir.join("bin");
        if !bin.join("bpf-linker").exists() {
            bail!("bpf-linker not found on PATH nor in {}; {SETUP_HINT}", bin.display());
        }
        let path = env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin];
        paths.extend(env::split_paths(&path));
        // SAFETY: build scripts are single-threaded; the child cargo inherits this PATH.
        unsafe { env::set_var("PATH", env::join_paths(paths)?) };
    }

    let package = aya_build::Package {
        name: "overlay-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../overlay-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
        .with_context(|| format!("building overlay-ebpf failed; if a tool is missing, {SETUP_HINT}"))
}
