//! QEMU VMs running stock Debian kernels, for the kernel matrix and the VM demo.
//!
//! Each VM boots the kernel from `cargo xtask setup`'s cache with a small initramfs (busybox
//! and the modules needed to reach the host: virtio, 9p, overlayfs). Its root is an overlayfs
//! of this machine's root, shared read-only over 9p, under a tmpfs, so the `overlay` binary
//! built here runs unchanged and every write stays in the VM. The kernel's own modules are a
//! second 9p share on `/usr/lib/modules`, so the kernel loads what it needs on demand, as on a
//! real host. A third, writable share per VM is its mailbox: the harness drops shell scripts
//! there and the VM runs them in order, leaving their output and exit code beside them.
//!
//! All VMs sit on one bridge inside a network namespace the harness creates (QEMU runs in it
//! and opens its tap device there), with etcd on the bridge address: no traffic leaves it.
pub mod scenario;

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{etcd::Etcd, netns::Netns};

/// The bridge in the harness's namespace; VM `i` is `VM_NET.i+10`.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

pub fn vm_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + index as u8)
}

/// Modules the initramfs loads itself; everything else the kernel loads from the 9p share.
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay"];

const BUSYBOX: &str = "/bin/busybox";
const QEMU: &str = "qemu-system-x86_64";

/// A kernel unpacked by `cargo xtask setup` under `<cache>/<series>/`.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub series: String,
    pub release: String,
    root: PathBuf,
}

impl Kernel {
    pub fn load(cache: &Path, series: &str) -> anyhow::Result<Self> {
        let dir = cache.join(series);
        let release = fs::read_to_string(dir.join("release"))
            .with_context(|| {
                format!(
                    "kernel {series} is not in {}: run `cargo xtask setup` (or `cargo xtask test --kernels {series}`)",
                    cache.display()
                )
            })?
            .trim()
            .to_string();
        Ok(Kernel {
            series: series.to_string(),
            release,
            root: dir.join("root"),
        })
    }

    fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }

    fn modules(&self) -> PathBuf {
        self.root.join("lib/modules")
    }

    /// The kernel's config option `name` (`CONFIG_` prefix included), as built: "y", "m" or None.
    pub fn config(&self, name: &str) -> Option<String> {
        let text = fs::read_to_string(self.root.join(format!("boot/config-{}", self.release))).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')).map(String::from))
    }

    /// Write the initramfs (an uncompressed newc cpio, which every kernel accepts) to `out`.
    pub fn build_initramfs(&self, out: &Path) -> anyhow::Result<()> {
        let stage = tempfile::Builder::new().prefix("overlay-vms-initramfs-").tempdir()?;
        let s = stage.path();
        for d in ["bin", "modules", "proc", "sys", "dev", "lower", "upper", "newroot"] {
            fs::create_dir_all(s.join(d))?;
        }
        fs::copy(BUSYBOX, s.join("bin/busybox"))
            .with_context(|| format!("copying {BUSYBOX}: apt-get install busybox-static"))?;
        let base = self.modules().join(&self.release);
        let order = module_load_order(&base, INITRAMFS_MODULES)?;
        let mut names = Vec::new();
        for rel in &order {
            let name = uncompressed_name(rel);
            let src = base.join(rel);
            let bytes = match Path::new(rel).extension().and_then(|e| e.to_str()) {
                Some("xz") => run_output(Command::new("xz").arg("-dc").arg(&src))?,
                Some("zst") => run_output(Command::new("zstd").arg("-dcq").arg(&src))?,
                _ => fs::read(&src).with_context(|| format!("reading {}", src.display()))?,
            };
            fs::write(s.join("modules").join(&name), bytes)?;
            names.push(name);
        }
        fs::write(s.join("modules/order"), names.join("\n") + "\n")?;
        write_executable(&s.join("init"), INIT)?;
        let list = run_output(Command::new("find").arg(".").current_dir(s))?;
        let mut cpio = Command::new(BUSYBOX)
            .args(["cpio", "-o", "-H", "newc"])
            .current_dir(s)
            .stdin(Stdio::piped())
            .stdout(fs::File::create(out).with_context(|| format!("creating {}", out.display()))?)
            .stderr(Stdio::null())
            .spawn()
            .context("starting busybox cpio")?;
        cpio.stdin.take().expect("piped").write_all(&list)?;
        let status = cpio.wait()?;
        if !status.success() {
            bail!("busybox cpio failed building {}: {status}", out.display());
        }
        Ok(())
    }
}

/// The initramfs's /init: load the modules, mount the host root (read-only) under a tmpfs
/// overlay, the kernel's modules and the mailbox, and hand over to the mailbox's script.
const INIT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
fail() { echo "vm-init: $*"; $bb poweroff -f; }
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
for m in $($bb cat /modules/order); do $bb insmod /modules/$m || echo "vm-init: insmod $m failed"; done
nine="trans=virtio,version=9p2000.L,msize=512000"
$bb mount -t 9p -o $nine,ro hostroot /lower || fail "cannot mount the host root over 9p"
$bb mount -t tmpfs -o mode=755 upper /upper
$bb mkdir -p /upper/u /upper/w
$bb mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w root /newroot || fail "overlayfs failed"
$bb mount -t tmpfs -o mode=755 run /newroot/run
$bb mkdir -p /newroot/usr/lib/modules /newroot/run/mailbox
$bb mount -t 9p -o $nine,ro kmods /newroot/usr/lib/modules || fail "cannot mount the kernel modules"
$bb mount -t 9p -o $nine mailbox /newroot/run/mailbox || fail "cannot mount the mailbox"
$bb mount --move /proc /newroot/proc
$bb mount --move /sys /newroot/sys
$bb mount --move /dev /newroot/dev
exec $bb switch_root /newroot /bin/sh /run/mailbox/vm-init.sh
"#;

/// After switch_root, in the VM's full root: network up, then run the mailbox's scripts.
fn vm_init_script(ip: Ipv4Addr) -> String {
    format!(
        r#"export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
ip link set lo up
ip link set eth0 up
ip addr add {ip}/24 dev eth0
sysctl -qw net.ipv4.ip_forward=1
uname -r > /run/mailbox/booted
cd /run/mailbox/cmd || exit 1
while :; do
    for f in *.sh; do
        [ -e "$f" ] || continue
        b=${{f%.sh}}
        [ -e "$b.rc" ] && continue
        sh "$f" > "$b.out" 2>&1 < /dev/null
        echo $? > "$b.rc.tmp"
        mv "$b.rc.tmp" "$b.rc"
    done
    sleep 0.2
done
"#
    )
}

/// Modules.dep's paths of `wanted` and their dependencies, dependencies first; modules that
/// are built in (absent from modules.dep) are skipped.
fn module_load_order(base: &Path, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let dep_file = base.join("modules.dep");
    let text = fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            module_name(module),
            (module.to_string(), rest.split_whitespace().map(String::from).collect()),
        );
    }
    fn visit(name: &str, deps: &HashMap<String, (String, Vec<String>)>, order: &mut Vec<String>) {
        let Some((path, needs)) = deps.get(name) else {
            return;
        };
        for d in needs {
            visit(&module_name(d), deps, order);
        }
        if !order.contains(path) {
            order.push(path.clone());
        }
    }
    let mut order = Vec::new();
    for w in wanted {
        visit(&w.replace('-', "_"), &deps, &mut order);
    }
    Ok(order)
}

/// `kernel/fs/9p/9p.ko.xz` → `9p`, with dashes as underscores as the kernel names modules.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn uncompressed_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.trim_end_matches(".xz").trim_end_matches(".zst").to_string()
}

fn write_executable(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn run_output(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

/// The namespace the VMs live in: a bridge, a tap per VM, etcd on the bridge address.
/// Dropped last: VMs must be stopped before (they hold the taps).
pub struct Switch {
    pub etcd: Etcd,
    pub ns: Netns,
    taps: usize,
}

impl Switch {
    pub fn new() -> anyhow::Result<Self> {
        let ns = Netns::new("vm")?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", "br0"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        let etcd = Etcd::try_start_in_netns(ns.name(), BRIDGE_IP)?;
        Ok(Switch { etcd, ns, taps: 0 })
    }

    fn add_tap(&mut self) -> anyhow::Result<String> {
        self.taps += 1;
        let tap = format!("tap{}", self.taps);
        self.ns.ip(&["tuntap", "add", &tap, "mode", "tap"])?;
        self.ns.ip(&["link", "set", &tap, "master", "br0", "up"])?;
        Ok(tap)
    }

    /// `overlay <args>` on the switch (etcd's side), e.g. `config set`.
    pub fn overlay(&self, args: &[&str]) -> anyhow::Result<String> {
        let bin = crate::lab::workspace_bin("overlay");
        crate::netns::run(self.ns.command(bin.to_str().expect("utf-8 path")).args(args))
    }
}

/// How QEMU runs the guest: `tcg` everywhere, `kvm` where /dev/kvm boots a stock kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Tcg,
    Kvm,
}

/// One VM: QEMU in the switch's namespace, killed on drop.
pub struct Vm {
    pub index: usize,
    pub ip: Ipv4Addr,
    pub mailbox: PathBuf,
    child: Child,
    seq: u32,
}

impl Vm {
    /// Start QEMU; the VM is usable once [`Self::wait_booted`] returns.
    pub fn start(
        switch: &mut Switch,
        kernel: &Kernel,
        initramfs: &Path,
        dir: &Path,
        index: usize,
        accel: Accel,
    ) -> anyhow::Result<Self> {
        let ip = vm_ip(index);
        let mailbox = dir.join(format!("vm{index}"));
        fs::create_dir_all(mailbox.join("cmd"))?;
        fs::write(mailbox.join("vm-init.sh"), vm_init_script(ip))?;
        let tap = switch.add_tap()?;
        let console = mailbox.join("console.log");
        let mut cmd = switch.ns.command(QEMU);
        cmd.args([
            "-machine",
            &format!("q35,accel={}", format!("{accel:?}").to_lowercase()),
        ])
        .args(["-cpu", "max", "-smp", "1", "-m", "1024"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=kmods,security_model=none,readonly=on",
            kernel.modules().display()
        ))
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=mailbox,security_model=none",
            mailbox.display()
        ))
        .arg("-netdev")
        .arg(format!("tap,id=net0,ifname={tap},script=no,downscript=no"))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=net0,mac=52:54:00:77:00:{:02x}",
            10 + index
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(mailbox.join("qemu.log"))?);
        // SAFETY: prctl is async-signal-safe; QEMU dies with us even if we are killed.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {QEMU}: apt-get install qemu-system-x86"))?;
        Ok(Vm {
            index,
            ip,
            mailbox,
            child,
            seq: 0,
        })
    }

    pub fn name(&self) -> String {
        format!("vm{}", self.index)
    }

    pub fn wait_booted(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let booted = self.mailbox.join("booted");
        while !booted.exists() {
            self.check_alive()?;
            if start.elapsed() > timeout {
                bail!(
                    "{} did not boot in {timeout:?}; console:\n{}",
                    self.name(),
                    self.console_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(start.elapsed())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let qemu = fs::read_to_string(self.mailbox.join("qemu.log")).unwrap_or_default();
            bail!(
                "{}: QEMU exited ({status}): {}\nconsole:\n{}",
                self.name(),
                qemu.trim(),
                self.console_tail(30)
            );
        }
        Ok(())
    }

    pub fn console_tail(&self, lines: usize) -> String {
        tail(
            &fs::read_to_string(self.mailbox.join("console.log")).unwrap_or_default(),
            lines,
        )
    }

    /// Hand `script` to the VM; [`Pending::wait`] gives its exit code and output.
    pub fn submit(&mut self, script: &str) -> anyhow::Result<Pending> {
        self.seq += 1;
        let base = self.mailbox.join("cmd").join(format!("{:04}", self.seq));
        let tmp = base.with_extension("tmp");
        fs::write(&tmp, script)?;
        fs::rename(&tmp, base.with_extension("sh"))?;
        Ok(Pending {
            base,
            first_line: script.lines().next().unwrap_or_default().to_string(),
        })
    }

    /// Run `script` in the VM and wait for it.
    pub fn sh(&mut self, script: &str, timeout: Duration) -> anyhow::Result<Ran> {
        let p = self.submit(script)?;
        p.wait(self, timeout)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A script handed to a VM.
pub struct Pending {
    base: PathBuf,
    first_line: String,
}

/// A script's exit code and output (stdout and stderr together).
pub struct Ran {
    pub code: i32,
    pub output: String,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

impl Pending {
    pub fn wait(self, vm: &mut Vm, timeout: Duration) -> anyhow::Result<Ran> {
        let start = Instant::now();
        let rc = self.base.with_extension("rc");
        let out = self.base.with_extension("out");
        loop {
            if let Ok(code) = fs::read_to_string(&rc) {
                let code = code.trim().parse().with_context(|| format!("exit code {code:?}"))?;
                let output = strip_ansi(&fs::read_to_string(&out).unwrap_or_default());
                return Ok(Ran { code, output });
            }
            vm.check_alive()?;
            if start.elapsed() > timeout {
                bail!(
                    "{}: `{}` did not finish in {timeout:?}; its output so far:\n{}",
                    vm.name(),
                    self.first_line,
                    tail(&fs::read_to_string(&out).unwrap_or_default(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Text without terminal colour sequences (ESC `[` ... letter), for tables and reports.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// FNV-1a over a byte stream: the checksum both ends of a VM transfer compute.
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn value(&self) -> u64 {
        self.0
    }
}

/// The bytes a transfer sends: a pseudo-random stream, so a lost, repeated or reordered block
/// changes the checksum.
pub fn fill_stream(offset: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        let i = offset + k as u64;
        *b = ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8) ^ (i as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz"), "9p");
        assert_eq!(module_name("kernel/net/ipv6/ip6_udp_tunnel.ko"), "ip6_udp_tunnel");
        assert_eq!(module_name("kernel/net/sched/sch-ingress.ko"), "sch_ingress");
        assert_eq!(uncompressed_name("kernel/fs/9p/9p.ko.zst"), "9p.ko");
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/9p/9p.ko.xz: kernel/fs/netfs/netfs.ko.xz kernel/net/9p/9pnet.ko.xz\n\
             kernel/net/9p/9pnet.ko.xz:\n\
             kernel/fs/netfs/netfs.ko.xz:\n\
             kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz\n",
        )
        .unwrap();
        let order = module_load_order(dir.path(), &["9pnet_virtio", "9p", "virtio_pci"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/9p/9pnet.ko.xz", "kernel/net/9p/9pnet_virtio.ko.xz", "kernel/fs/netfs/netfs.ko.xz",
                "kernel/fs/9p/9p.ko.xz"
            ]
        );
    }

    #[test]
    fn colours_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2mtime\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "time  INFO x"
        );
    }

    #[test]
    fn checksum_sees_order() {
        let mut a = Fnv::default();
        a.update(b"ab");
        let mut b = Fnv::default();
        b.update(b"ba");
        assert_ne!(a.value(), b.value());
    }
}
