//! Stock Debian kernels for the VM matrix, fetched with apt and unpacked into a cache:
//! `~/.cache/overlay-vms/<series>/` holds `root/` (the package's /boot and /lib/modules, with
//! modules.dep made by depmod) and `release` (the kernel's `uname -r`).
//!
//! apt runs with a private source list and state under the cache, so the machine's own sources
//! stay as they are (bookworm-backports and bullseye are not in them).
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The kernels the matrix knows: series, the Debian suite that ships it, and why it is there.
pub const KERNELS: &[(&str, &str, &str)] = &[
    ("6.1", "bookworm", "Debian 12's kernel, what most Debian hosts run"),
    ("6.12", "bookworm-backports", "Debian 12 backports, the current LTS"),
    ("5.10", "bullseye", "Debian 11's kernel, the LTS before"),
];

const ARCHIVE: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub fn cache_dir() -> PathBuf {
    env::var_os("OVERLAY_VMS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/overlay-vms")
    })
}

/// `6.1,6.12` → the known series, in the given order; `all` → every one.
pub fn parse_list(list: &str) -> anyhow::Result<Vec<&'static str>> {
    if list == "all" {
        return Ok(KERNELS.iter().map(|k| k.0).collect());
    }
    list.split(',')
        .map(|s| {
            KERNELS.iter().find(|k| k.0 == s.trim()).map(|k| k.0).with_context(|| {
                let known: Vec<&str> = KERNELS.iter().map(|k| k.0).collect();
                format!("unknown kernel series {s:?}: known are {} (or `all`)", known.join(", "))
            })
        })
        .collect()
}

/// Fetch and unpack every series in `series` that is not in the cache yet.
pub fn fetch(series: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = series
        .iter()
        .copied()
        .filter(|s| !cache_dir().join(s).join("release").exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = Apt::new()?;
    apt.update()?;
    for s in missing {
        let (_, suite, _) = KERNELS.iter().find(|k| k.0 == s).expect("parsed series");
        fetch_one(&apt, s, suite).with_context(|| format!("fetching the {s} kernel from {suite}"))?;
    }
    Ok(())
}

fn fetch_one(apt: &Apt, series: &str, suite: &str) -> anyhow::Result<()> {
    // The meta package's newest version of this series names the image package.
    let madison = apt.output("apt-cache", &["madison", "linux-image-amd64"])?;
    let version = madison
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            (cols.len() >= 3 && cols[1].starts_with(&format!("{series}."))).then(|| cols[1].to_string())
        })
        .next()
        .with_context(|| format!("no linux-image-amd64 {series}.* in {suite}: {madison}"))?;
    let depends = apt.output("apt-cache", &["depends", &format!("linux-image-amd64={version}")])?;
    let image = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .with_context(|| format!("linux-image-amd64={version} names no image package: {depends}"))?
        .to_string();
    eprintln!("setup: fetching {image} (linux-image-amd64 {version}, {suite})");
    let dir = cache_dir().join(series);
    let _ = fs::remove_dir_all(&dir);
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    apt.run_in(&debs, "apt-get", &["download", &image])?;
    let deb = fs::read_dir(&debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {image} left no .deb in {}", debs.display()))?;
    let root = dir.join("root");
    crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let release = fs::read_dir(root.join("lib/modules"))
        .context("the package has no lib/modules")?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the package's lib/modules is empty")?;
    if !root.join(format!("boot/vmlinuz-{release}")).exists() {
        bail!("{image} has no boot/vmlinuz-{release}");
    }
    crate::run(Command::new("/usr/sbin/depmod").arg("-b").arg(&root).arg(&release))?;
    fs::remove_dir_all(&debs)?;
    fs::write(dir.join("release"), format!("{release}\n"))?;
    eprintln!("setup: kernel {release} ready in {}", dir.display());
    Ok(())
}

/// apt with its own source list, lists and archive cache under the cache directory.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new() -> anyhow::Result<Self> {
        let dir = cache_dir().join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let sources = format!(
            "deb [signed-by={KEYRING}] {ARCHIVE} bookworm main\n\
             deb [signed-by={KEYRING}] {SECURITY} bookworm-security main\n\
             deb [signed-by={KEYRING}] {ARCHIVE} bookworm-backports main\n\
             deb [signed-by={KEYRING}] {ARCHIVE} bullseye main\n\
             deb [signed-by={KEYRING}] {SECURITY} bullseye-security main\n"
        );
        fs::write(dir.join("sources.list"), sources)?;
        Ok(Apt { dir })
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/sources.list"),
            "-oDir::Etc::SourceParts=/nonexistent".into(),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::Cache={d}/cache"),
            "-oDir::State::status=/dev/null".into(),
            "-oAPT::Architecture=amd64".into(),
            // Our cache is root's; apt's sandbox user could not write there.
            "-oAPT::Sandbox::User=root".into(),
        ]
    }

    fn update(&self) -> anyhow::Result<()> {
        self.run_in(Path::new("."), "apt-get", &["update", "-qq"])
    }

    fn run_in(&self, dir: &Path, program: &str, args: &[&str]) -> anyhow::Result<()> {
        crate::run(Command::new(program).current_dir(dir).args(self.options()).args(args))
    }

    fn output(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(program)
            .args(self.options())
            .args(args)
            .output()
            .with_context(|| format!("starting {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
