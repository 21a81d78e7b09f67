//! A real etcd for tests: Debian's `/usr/bin/etcd` on free loopback ports with a temporary data
//! directory (on tmpfs when there is one, for speed), stopped and cleaned up on drop, panics
//! included. `stop`/`restart` keep the data and ports, for the reconnect tests.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// Certificates for a TLS etcd, generated per test: a CA, a server cert for 127.0.0.1 and a
/// client cert, all PEM files in `dir`.
pub struct TlsFiles {
    pub dir: TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    pub fn generate() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "overlay test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            p.subject_alt_names.push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
            p.distinguished_name.push(DnType::CommonName, name);
            (p.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf("etcd server");
        let (client_cert, client_key) = leaf("overlay client");
        let write = |name: &str, pem: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        TlsFiles {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
            dir,
        }
    }
}

pub struct Etcd {
    child: Option<Child>,
    /// Network namespace etcd runs in (None: ours) and the address it listens on there.
    netns: Option<String>,
    host: IpAddr,
    data: TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    starts: u32,
    /// Member name and `--initial-cluster` when this is one member of a cluster.
    member: Option<(String, String)>,
    /// Killed when the thread that started it ends (false only for the demo's `--keep`).
    die_with_parent: bool,
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn temp_dir() -> TempDir {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("overlay-etcd-")
        .tempdir_in(base)
        .expect("temporary etcd data dir")
}

impl Etcd {
    /// Start a plain-HTTP etcd; panics with etcd's log if it does not come up.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Start an etcd that requires client certificates signed by `tls.ca`.
    pub fn start_tls(tls: &TlsFiles) -> Self {
        Self::start_with(Some((tls.ca.clone(), tls.server_cert.clone(), tls.server_key.clone())))
    }

    fn start_with(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Self {
        assert!(
            Path::new(ETCD_BIN).exists(),
            "{ETCD_BIN} missing: apt-get install etcd-server"
        );
        let mut last = String::new();
        // Free ports can be taken by a parallel test between probing and binding: retry.
        for _ in 0..5 {
            let mut e = Etcd {
                child: None,
                netns: None,
                host: Ipv4Addr::LOCALHOST.into(),
                data: temp_dir(),
                client_port: free_port(),
                peer_port: free_port(),
                tls: tls.clone(),
                starts: 0,
                member: None,
                die_with_parent: true,
            };
            match e.spawn() {
                Ok(()) => return e,
                Err(log) => last = log,
            }
        }
        panic!("etcd did not start:\n{last}");
    }

    /// Start a plain-HTTP etcd inside network namespace `netns`, listening on `host` there
    /// (the lab's agents reach it over the underlay; the ports are the standard ones, as the
    /// namespace is ours alone).
    pub fn start_in_netns(netns: &str, host: impl Into<IpAddr>) -> Self {
        Self::start_in_netns_opts(netns, host, true)
    }

    /// As [`Self::start_in_netns`]; with `die_with_parent` false etcd outlives this process.
    pub fn start_in_netns_opts(netns: &str, host: impl Into<IpAddr>, die_with_parent: bool) -> Self {
        Self::spawn_in_netns(netns, host.into(), die_with_parent)
            .unwrap_or_else(|log| panic!("etcd did not start in {netns}:\n{log}"))
    }

    /// As [`Self::start_in_netns`], but a failed start is an error carrying the end of etcd's
    /// log rather than a panic: for the benchmark, which reports a failed setup and goes on.
    pub fn try_start_in_netns(netns: &str, host: impl Into<IpAddr>) -> anyhow::Result<Self> {
        Self::spawn_in_netns(netns, host.into(), true).map_err(|log| {
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            anyhow::anyhow!("etcd did not start in {netns}:\n{tail}")
        })
    }

    /// A failed start gives etcd's log; its data directory goes with the dropped value.
    fn spawn_in_netns(netns: &str, host: IpAddr, die_with_parent: bool) -> Result<Self, String> {
        let mut e = Etcd {
            die_with_parent,
            child: None,
            netns: Some(netns.to_string()),
            host,
            data: temp_dir(),
            client_port: 2379,
            peer_port: 2380,
            tls: None,
            starts: 0,
            member: None,
        };
        e.spawn()?;
        Ok(e)
    }

    /// A cluster of one member per `(netns, host)`, each listening on `host` in its namespace
    /// on the standard ports; launched together, as a member serves only once quorum forms.
    pub fn start_cluster_in_netns(members: &[(&str, Ipv4Addr)]) -> Vec<Etcd> {
        let initial = members
            .iter()
            .enumerate()
            .map(|(i, (_, host))| format!("m{i}=http://{host}:2380"))
            .collect::<Vec<_>>()
            .join(",");
        let launched: Vec<(Etcd, Child, PathBuf)> = members
            .iter()
            .enumerate()
            .map(|(i, (netns, host))| {
                let mut e = Etcd {
                    die_with_parent: true,
                    child: None,
                    netns: Some(netns.to_string()),
                    host: std::net::IpAddr::V4(*host),
                    data: temp_dir(),
                    client_port: 2379,
                    peer_port: 2380,
                    tls: None,
                    starts: 0,
                    member: Some((format!("m{i}"), initial.clone())),
                };
                let (child, log) = e.launch().unwrap_or_else(|e| panic!("{e}"));
                (e, child, log)
            })
            .collect();
        launched
            .into_iter()
            .map(|(mut e, child, log)| {
                if let Err(text) = e.wait_serving(child, &log) {
                    panic!("etcd member in {:?} did not start:\n{text}", e.netns);
                }
                e
            })
            .collect()
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", SocketAddr::new(self.host, self.client_port))
    }

    pub fn port(&self) -> u16 {
        self.client_port
    }

    fn spawn(&mut self) -> Result<(), String> {
        let (child, log_path) = self.launch()?;
        self.wait_serving(child, &log_path)
    }

    fn launch(&mut self) -> Result<(Child, PathBuf), String> {
        self.starts += 1;
        let log_path = self.data.path().join(format!("etcd-{}.log", self.starts));
        let log = std::fs::File::create(&log_path).unwrap();
        let client = self.endpoint();
        let peer = format!("http://{}", SocketAddr::new(self.host, self.peer_port));
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCD_BIN]);
                c
            }
            None => Command::new(ETCD_BIN),
        };
        let (name, initial) = self
            .member
            .clone()
            .unwrap_or_else(|| ("test".to_string(), format!("test={peer}")));
        cmd.arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", self.data.path().join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((ca, cert, key)) = &self.tls {
            cmd.arg(format!("--trusted-ca-file={}", ca.display()))
                .arg(format!("--cert-file={}", cert.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg("--client-cert-auth");
        }
        // If the test process dies without running Drop, take etcd with it.
        let die_with_parent = self.die_with_parent;
        unsafe {
            cmd.pre_exec(move || {
                crate::netns::unblock_signals();
                if die_with_parent {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("spawning {ETCD_BIN}: {e}"))?;
        Ok((child, log_path))
    }

    fn wait_serving(&mut self, mut child: Child, log_path: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(log_path).unwrap_or_default();
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("etcd exited with {status}:\n{text}"));
            }
            // From another namespace we cannot connect; etcd's own word must do there.
            if text.contains("serving client traffic")
                && (self.netns.is_some() || TcpStream::connect((Ipv4Addr::LOCALHOST, self.client_port)).is_ok())
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("etcd not ready after 15 s:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill etcd (as a crash would); data and ports are kept.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        let mut last = String::new();
        for _ in 0..3 {
            match self.spawn() {
                Ok(()) => return,
                Err(log) => last = log,
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("etcd did not restart:\n{last}");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP relay in front of etcd that a test can cut (every connection reset, new ones
/// refused) and heal, to break an agent's connection while etcd itself stays reachable.
pub struct Relay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Start relaying 127.0.0.1:<new port> to `target_port`. Needs a tokio runtime.
    pub async fn start(target_port: u16) -> Self {
        use std::sync::{Arc, atomic::AtomicBool, atomic::Ordering};
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let (gen_tx, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(gen_tx);
        let (cut2, gen2) = (cut.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if cut2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees a reset
                }
                let mut stop = gen2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        });
        Relay {
            port,
            cut,
            generation,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Reset every relayed connection and refuse new ones until [`Relay::heal`].
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// A registry on `endpoint` under a prefix of its own.
pub async fn registry(endpoint: &str, prefix: &str) -> overlay::subnet::etcd::EtcdRegistry {
    let args = overlay::subnet::etcd::EtcdArgs::new(vec![endpoint.to_string()], prefix);
    overlay::subnet::etcd::EtcdRegistry::connect(&args)
        .await
        .expect("connect to test etcd")
}
