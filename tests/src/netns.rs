//! Network namespaces owned by one test run: uniquely named, removed on drop (every path,
//! panics included), and leftovers of runs that were killed are swept at the next start.
use std::{
    fs::File,
    process::{Command, Output},
    sync::Once,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

/// Every namespace we create starts with this, followed by the creating pid.
pub const PREFIX: &str = "ovlt";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace named `ovlt<pid>-<n><tag>` (at most 15 characters are not required
    /// for namespace names, but keep them short for readable `ip netns` listings).
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        SWEEP.call_once(sweep_stale);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <ns> <program>`: a command run inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Run `ip <args>` inside this namespace.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        run(&mut c)
    }

    /// Run a command inside the namespace and return its stdout; fail with its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        run(self.command(program).args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]).map(|_| ())
    }

    /// Run `f` on a fresh thread that has entered this namespace: sockets it opens live here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<anyhow::Result<T>> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
            Ok(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its interfaces; veth peers elsewhere go with them.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let Output { status, stdout, stderr } = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status}): {}", String::from_utf8_lossy(&stderr).trim());
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Remove namespaces left by runs whose process is gone (killed before their drops ran).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// Unblock every signal in the calling thread. For `pre_exec`: a blocked mask is inherited
/// across exec, and a daemon started with SIGTERM blocked never hears it.
pub fn unblock_signals() {
    // SAFETY: async-signal-safe libc calls on a local, initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}
