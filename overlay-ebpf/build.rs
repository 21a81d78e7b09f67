//! Rebuild the programs when bpf-linker changes: cargo does not see that dependency.
use std::path::PathBuf;

fn main() {
    let linker = which::which("bpf-linker").ok().or_else(|| {
        let dir = std::env::var_os("OVERLAY_TOOLS_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/overlay-tools")))?;
        let p = dir.join("bin/bpf-linker");
        p.exists().then_some(p)
    });
    if let Some(linker) = linker {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
