//! Compiles `overlay-ebpf` for the BPF target and embeds it. The route that works on Debian
//! machines is recorded in the README: Debian's rustc 1.96 with prebuilt `core` for bpfel, and
//! bpf-linker built against LLVM 22. Missing pieces fail here with the command that installs them.
//!
//! Quiet unless something is wrong: aya-build echoes every line of the inner cargo, progress
//! included, as `cargo:warning`, so each build would print a dozen "warnings" that are not. We
//! run aya-build in a child of this script and forward its output, keeping its diagnostics and
//! dropping the progress lines; on failure the child's whole output is shown.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

const SETUP_HINT: &str = "run `cargo xtask setup` (installs Debian's rustc-web, \
libstd-rust-web-dev-bpf, llvm-22-dev and bpf-linker)";

fn tools_dir() -> Option<PathBuf> {
    env::var_os("OVERLAY_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/overlay-tools")))
}

/// Set in the child that runs aya-build.
const CHILD_MARK: &str = "OVERLAY_EBPF_BUILD_CHILD";

fn main() -> anyhow::Result<()> {
    if env::var_os(CHILD_MARK).is_some() {
        return build_ebpf();
    }
    let me = env::current_exe().context("locating the build script")?;
    let out = Command::new(&me)
        .env(CHILD_MARK, "1")
        .output()
        .with_context(|| format!("running {}", me.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Everything, as the inner cargo printed it.
        for line in stdout.lines() {
            eprintln!("{}", line.strip_prefix("cargo:warning=").unwrap_or(line));
        }
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("building overlay-ebpf failed (output above)");
    }
    for line in stdout.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(text) if is_progress(text) => {}
            _ => println!("{line}"),
        }
    }
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The inner cargo's progress lines ("   Compiling overlay-common v0.1.0", "    Finished ...").
fn is_progress(line: &str) -> bool {
    const PROGRESS: [&str; 9] = [
        "Compiling ", "Finished ", "Fresh ", "Blocking ", "Locking ", "Updating ", "Downloading ", "Downloaded ",
        "Adding ",
    ];
    let line = line.trim_start();
    line.is_empty() || PROGRESS.iter().any(|p| line.starts_with(p))
}

fn build_ebpf() -> anyhow::Result<()> {
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
