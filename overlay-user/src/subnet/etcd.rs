//! The lease registry over etcd's v3 API, with the keys and values flannel uses:
//! `<prefix>/config` and `<prefix>/subnets/<key>` with leases attached for the TTL.

use std::{
    future::Future,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    Txn, TxnOp, WatchOptions, WatchStream,
};
use tracing::{debug, warn};

use super::{
    lease::{Lease, LeaseAttrs, LeaseError, RegistryEvent, SubnetKey},
    registry::{LeaseWatch, Listing, Registry, RegistryError, WatchBatch, WatchError},
};

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// etcd connection flags, named as flanneld names them, each also read from `FLANNELD_*`.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated; requests fail over between them.
    #[arg(long = "etcd-endpoints", env = "FLANNELD_ETCD_ENDPOINTS", value_delimiter = ',', default_value = DEFAULT_ENDPOINT)]
    pub endpoints: Vec<String>,
    /// Key prefix of the network's config and leases.
    #[arg(long = "etcd-prefix", env = "FLANNELD_ETCD_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long = "etcd-cafile", env = "FLANNELD_ETCD_CAFILE")]
    pub cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long = "etcd-certfile", env = "FLANNELD_ETCD_CERTFILE")]
    pub certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long = "etcd-keyfile", env = "FLANNELD_ETCD_KEYFILE")]
    pub keyfile: Option<PathBuf>,
    /// Username for etcd authentication.
    #[arg(long = "etcd-username", env = "FLANNELD_ETCD_USERNAME")]
    pub username: Option<String>,
    /// Password for etcd authentication.
    #[arg(long = "etcd-password", env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

impl EtcdArgs {
    /// Defaults for a plain local etcd at `endpoints` (handy in tests and tools).
    pub fn new(endpoints: Vec<String>, prefix: &str) -> Self {
        EtcdArgs {
            endpoints,
            prefix: prefix.to_string(),
            cafile: None,
            certfile: None,
            keyfile: None,
            username: None,
            password: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint given (--etcd-endpoints)")]
    NoEndpoints,
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("etcd prefix {0:?} must start with '/'")]
    BadPrefix(String),
    #[error("{flag} {path}: {source}")]
    TlsFile {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--etcd-certfile and --etcd-keyfile go together; only {given} was given")]
    HalfIdentity { given: &'static str },
    #[error("--etcd-username and --etcd-password go together; only {given} was given")]
    HalfCredentials { given: &'static str },
    #[error("TLS options are set but endpoint {0} is not https://")]
    TlsNeedsHttps(String),
    #[error("connecting to etcd at {endpoints}: {source}")]
    Connect {
        endpoints: String,
        source: etcd_client::Error,
    },
}

/// flannel's lease registry over etcd. Cheap to clone (one shared connection).
#[derive(Clone)]
pub struct EtcdRegistry {
    /// One client per endpoint: tonic's balancer keeps sending to a dead endpoint, so
    /// failover is done here, moving to the next endpoint when one cannot serve.
    clients: Arc<Vec<(String, Client)>>,
    current: Arc<AtomicUsize>,
    /// What each endpoint did last, with its last failure: a host that does not answer costs
    /// the connect timeout, so it is tried only after every endpoint that answered.
    health: Arc<Mutex<Vec<EndpointState>>>,
    prefix: String,
    target: String,
}

/// An endpoint's health with its last failure, reported for an endpoint not asked again.
type EndpointState = (Health, Option<Answer>);

/// An endpoint's last known state, in the order endpoints are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Health {
    Served,
    NotTried,
    /// Up, but could not serve (no leader: an election may be on): worth asking again soon.
    Answered(Instant),
    /// Asked, no answer yet: a live member answers within milliseconds, a dead host never.
    Asking,
    /// Refused or silent, since then.
    Silent(Instant),
}

impl Health {
    fn answers(self) -> bool {
        matches!(self, Health::Served | Health::NotTried | Health::Answered(_))
    }
}

/// How long a request keeps asking members that answer "no leader" (an election takes a
/// second or two) before it tries endpoints that did not answer at all.
const ELECTION_PATIENCE: Duration = Duration::from_secs(3);
const ASK_AGAIN_AFTER: Duration = Duration::from_millis(200);
/// An endpoint found silent this recently is not asked again when every other one failed:
/// its answer would again be nothing, after a connect timeout.
const RECENTLY_SILENT: Duration = Duration::from_secs(10);

/// What an endpoint answered when it could not serve a request, as an operator needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Up, but its cluster has no leader (quorum lost): the member answered.
    NoLeader,
    Refused,
    /// Nothing came back: host down, address gone, packets dropped.
    TimedOut(String),
    Tls(String),
    Auth(String),
    Other(String),
}

impl Answer {
    fn of(e: &etcd_client::Error) -> Self {
        // tonic wraps the cause (hyper, io, rustls) several levels deep: read the whole chain.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            let t = s.to_string();
            if !text.contains(&t) {
                text = format!("{text}: {t}");
            }
            source = s.source();
        }
        if let etcd_client::Error::GRpcStatus(s) = e {
            let code = format!("{:?}", s.code());
            if s.message().contains("no leader") {
                return Answer::NoLeader;
            }
            if matches!(code.as_str(), "Unauthenticated" | "PermissionDenied") {
                return Answer::Auth(s.message().to_string());
            }
        }
        let lower = text.to_lowercase();
        if lower.contains("no leader") {
            Answer::NoLeader
        } else if lower.contains("connection refused") {
            Answer::Refused
        } else if ["timed out", "timedout", "timeout", "elapsed", "deadline"]
            .iter()
            .any(|t| lower.contains(t))
        {
            Answer::TimedOut("no reply to the connection attempt".into())
        } else if lower.contains("no route to host") || lower.contains("unreachable") {
            Answer::TimedOut("no route to the host".into())
        } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
            Answer::Tls(text)
        } else if lower.contains("authenticat") || lower.contains("permission denied") || lower.contains("password") {
            Answer::Auth(text)
        } else {
            Answer::Other(text)
        }
    }

    fn answered(&self) -> bool {
        !matches!(self, Answer::Refused | Answer::TimedOut(_))
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::NoLeader => write!(
                f,
                "answered \"no leader\" (this member is up; its cluster has lost quorum)"
            ),
            Answer::Refused => write!(f, "connection refused (host up, no etcd listening)"),
            Answer::TimedOut(t) => write!(f, "did not answer (host down or unreachable: {t})"),
            Answer::Tls(t) => write!(f, "TLS failed: {t}"),
            Answer::Auth(t) => write!(f, "refused our credentials: {t}"),
            Answer::Other(t) => write!(f, "failed: {t}"),
        }
    }
}

/// The one-line meaning of every endpoint's answer: a member saying "no leader" is the cause to
/// report, not a dead member's connect error.
fn summary(answers: &[(String, Answer)]) -> String {
    let no_leader: Vec<&str> = answers
        .iter()
        .filter(|(_, a)| *a == Answer::NoLeader)
        .map(|(e, _)| e.as_str())
        .collect();
    let answered = answers.iter().filter(|(_, a)| a.answered()).count();
    if !no_leader.is_empty() {
        format!(
            "etcd has no leader: {} reachable but cannot serve until quorum is back",
            no_leader.join(", ")
        )
    } else if answered == 0 {
        format!("none of the {} etcd endpoints answered", answers.len())
    } else {
        format!(
            "no etcd endpoint could serve it ({answered} of {} answered)",
            answers.len()
        )
    }
}

fn read_pem(flag: &'static str, path: &PathBuf) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::TlsFile {
        flag,
        path: path.clone(),
        source,
    })
}

impl EtcdRegistry {
    pub async fn connect(args: &EtcdArgs) -> Result<Self, EtcdError> {
        let endpoints = checked_endpoints(args)?;
        let opts = connect_options(args)?;
        let target = endpoints.join(",");
        // Without credentials this connects lazily; with them it logs in, which needs the
        // endpoint up: endpoints down at start are skipped. In parallel, so a dead host listed
        // first does not hold up the live ones.
        let mut connects = tokio::task::JoinSet::new();
        for (idx, e) in endpoints.iter().enumerate() {
            let (e, opts) = (e.clone(), opts.clone());
            connects.spawn(async move { (idx, Client::connect([&e], Some(opts)).await, e) });
        }
        let mut clients = Vec::new();
        let mut last_err = None;
        while let Some(joined) = connects.join_next().await {
            let (idx, result, e) = joined.expect("etcd connect task panicked");
            match result {
                Ok(c) => clients.push((idx, e, c)),
                Err(source) => {
                    warn!("etcd endpoint {e} {}", Answer::of(&source));
                    last_err = Some(source);
                }
            }
        }
        // In the order given: the first listed is the first choice among equals.
        clients.sort_by_key(|(idx, _, _)| *idx);
        let clients: Vec<(String, Client)> = clients.into_iter().map(|(_, e, c)| (e, c)).collect();
        let Some(source) = last_err.filter(|_| clients.is_empty()) else {
            let registry = EtcdRegistry {
                health: Arc::new(Mutex::new(vec![(Health::NotTried, None); clients.len()])),
                clients: Arc::new(clients),
                current: Default::default(),
                prefix: args.prefix.trim_end_matches('/').to_string(),
                target,
            };
            registry.probe().await;
            return Ok(registry);
        };
        Err(EtcdError::Connect {
            endpoints: target,
            source,
        })
    }

    /// Ask every endpoint at once and start with the first that serves; a member answering "no
    /// leader" is asked again while an election may be on, a silent one is marked as such when
    /// its connect times out, in the background, so no request waits on it first. Returns once
    /// one endpoint served, or none can (the requests then report what each answered).
    async fn probe(&self) {
        if self.clients.len() < 2 {
            return;
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(self.clients.len());
        for (idx, (_, client)) in self.clients.iter().enumerate() {
            let (registry, mut client, tx) = (self.clone(), client.clone(), tx.clone());
            let key = self.config_key();
            self.set_health(idx, Health::Asking);
            tokio::spawn(async move {
                let give_up = Instant::now() + ELECTION_PATIENCE;
                let served = loop {
                    let asked = client.get(key.clone(), Some(GetOptions::new().with_count_only()));
                    let answer = match tokio::time::timeout(REQUEST_TIMEOUT, asked).await {
                        Ok(Ok(_)) => break true,
                        Ok(Err(e)) => Answer::of(&e),
                        Err(_) => Answer::TimedOut(format!("no reply within {REQUEST_TIMEOUT:?}")),
                    };
                    debug!("etcd endpoint {} {answer}", registry.clients[idx].0);
                    registry.mark(idx, Some(&answer));
                    if !answer.answered() || Instant::now() >= give_up {
                        break false;
                    }
                    tokio::time::sleep(ASK_AGAIN_AFTER).await;
                };
                if served {
                    registry.mark(idx, None);
                }
                let _ = tx.send((idx, served)).await;
            });
        }
        drop(tx);
        while let Some((idx, served)) = rx.recv().await {
            if served {
                self.current.store(idx, Ordering::Relaxed);
                return;
            }
        }
    }

    fn set_health(&self, idx: usize, health: Health) {
        self.health.lock().unwrap_or_else(|p| p.into_inner())[idx].0 = health;
    }

    /// Record a request's outcome: `None` served, else what the endpoint answered.
    fn mark(&self, idx: usize, failure: Option<&Answer>) {
        let health = match failure {
            None => Health::Served,
            Some(a) if a.answered() => Health::Answered(Instant::now()),
            Some(_) => Health::Silent(Instant::now()),
        };
        self.health.lock().unwrap_or_else(|p| p.into_inner())[idx] = (health, failure.cloned());
    }

    /// Endpoints in the order to try them: the one in use, then those that served or were not
    /// tried, then those that answered but could not serve, then those not answering, the
    /// longest-silent first (the likeliest to be back).
    fn order(&self) -> Vec<(usize, Health)> {
        let health: Vec<Health> = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|h| h.0)
            .collect();
        let n = self.clients.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut order: Vec<(usize, Health)> = (0..n).map(|i| (start + i) % n).map(|i| (i, health[i])).collect();
        // Stable: the rotation from the current endpoint is kept within each group.
        order.sort_by_key(|&(_, h)| match h {
            Health::NotTried => Health::Served,
            h => h,
        });
        order
    }

    /// The client of the endpoint in use, for tools and tests that need etcd itself.
    pub fn client(&self) -> &Client {
        let i = self.current.load(Ordering::Relaxed);
        &self.clients[i % self.clients.len()].1
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn subnet_key(&self, key: &SubnetKey) -> String {
        format!("{}{key}", self.subnets_prefix())
    }

    /// Run one request, on the endpoint in use and then on each other one while the endpoint
    /// cannot serve. Members answering "no leader" are asked again for a while (an election
    /// ends soon) before endpoints that did not answer, each of which costs a connect timeout.
    /// Errors name the endpoint and key, and what each endpoint answered.
    async fn call<T, F, Fut>(&self, op: &'static str, key: &str, mut request: F) -> Result<T, RegistryError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let patience = Instant::now() + ELECTION_PATIENCE;
        // The last answer of each endpoint asked, in the order first asked.
        let mut answers: Vec<(usize, Answer)> = Vec::new();
        let mut ask = async |idx: usize, answers: &mut Vec<(usize, Answer)>| -> Result<Option<T>, RegistryError> {
            let (endpoint, client) = &self.clients[idx];
            let answer = match tokio::time::timeout(REQUEST_TIMEOUT, request(client.clone())).await {
                Ok(Ok(v)) => {
                    self.mark(idx, None);
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(Some(v));
                }
                Ok(Err(e)) if cannot_serve(&e) => Answer::of(&e),
                Ok(Err(e)) => {
                    return Err(RegistryError::Request {
                        op,
                        key: key.to_string(),
                        target: endpoint.clone(),
                        reason: e.to_string(),
                    });
                }
                Err(_) => Answer::TimedOut(format!("no reply within {REQUEST_TIMEOUT:?}")),
            };
            self.mark(idx, Some(&answer));
            if self.clients.len() > 1 {
                warn!("etcd endpoint {endpoint} {answer}; trying another");
            }
            match answers.iter_mut().find(|(i, _)| *i == idx) {
                Some(last) => last.1 = answer,
                None => answers.push((idx, answer)),
            }
            Ok(None)
        };
        // The members that answer, again and again while one says "no leader".
        loop {
            let answering: Vec<usize> = self
                .order()
                .into_iter()
                .filter(|(_, h)| h.answers())
                .map(|(i, _)| i)
                .collect();
            if answering.is_empty() {
                break;
            }
            for &idx in &answering {
                if let Some(v) = ask(idx, &mut answers).await? {
                    return Ok(v);
                }
            }
            let some_answered = answering
                .iter()
                .any(|i| answers.iter().any(|(j, a)| i == j && a.answered()));
            if Instant::now() >= patience {
                break;
            }
            if some_answered {
                tokio::time::sleep(ASK_AGAIN_AFTER).await;
            }
        }
        // Then those that did not answer, each once (if not already asked).
        let silent: Vec<usize> = self
            .order()
            .into_iter()
            .filter(|(i, h)| !h.answers() && !answers.iter().any(|(j, _)| i == j))
            .map(|(i, _)| i)
            .collect();
        // Skipped only when another endpoint was asked: a lone endpoint is always asked.
        let others_asked = !answers.is_empty();
        for idx in silent {
            let recent = self.health.lock().unwrap_or_else(|p| p.into_inner())[idx].clone();
            if let (Health::Silent(since), Some(answer)) = recent
                && others_asked
                && since.elapsed() < RECENTLY_SILENT
            {
                answers.push((idx, answer));
                continue;
            }
            if let Some(v) = ask(idx, &mut answers).await? {
                return Ok(v);
            }
        }
        let answers: Vec<(String, Answer)> = answers
            .into_iter()
            .map(|(i, a)| (self.clients[i].0.clone(), a))
            .collect();
        if let [(endpoint, answer)] = answers.as_slice() {
            return Err(RegistryError::Request {
                op,
                key: key.to_string(),
                target: endpoint.clone(),
                reason: answer.to_string(),
            });
        }
        Err(RegistryError::NoEndpointServed {
            op,
            key: key.to_string(),
            summary: summary(&answers),
            answers: answers
                .iter()
                .map(|(e, a)| format!("{e} {a}"))
                .collect::<Vec<_>>()
                .join("; "),
        })
    }

    fn parse_kv(&self, kv: &etcd_client::KeyValue) -> Result<Lease, LeaseError> {
        let full = String::from_utf8_lossy(kv.key()).into_owned();
        let segment = full.strip_prefix(&self.subnets_prefix()).unwrap_or(&full);
        if segment.contains('/') {
            return Err(LeaseError::BadKey { key: full.clone() });
        }
        Lease::from_kv(&full, segment, kv.value(), kv.lease(), kv.mod_revision())
    }

    async fn grant(&self, key: &str, ttl: Option<Duration>) -> Result<i64, RegistryError> {
        let Some(ttl) = ttl else { return Ok(0) };
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .call("grant lease for", key, |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        Ok(resp.id())
    }

    async fn revoke_quietly(&self, id: i64) {
        if id == 0 {
            return;
        }
        let revoke = |mut c: Client| async move { c.lease_revoke(id).await };
        if let Err(e) = self.call("revoke", &format!("lease {id:x}"), revoke).await {
            warn!("revoking unused etcd lease {id:x}: {e}");
        }
    }

    /// Put `attrs` at `key` with `lease_id` if `guard` holds; `None` if it did not.
    async fn put_if(
        &self,
        op: &'static str,
        key: SubnetKey,
        guard: Compare,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> Result<Option<Lease>, RegistryError> {
        let full = self.subnet_key(&key);
        let id = self.grant(&full, ttl).await?;
        let put_opts = (id != 0).then(|| PutOptions::new().with_lease(id));
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::put(full.clone(), attrs.to_json(), put_opts)]);
        let resp = match self
            .call(op, &full, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.revoke_quietly(id).await;
                return Err(e);
            }
        };
        if !resp.succeeded() {
            self.revoke_quietly(id).await;
            return Ok(None);
        }
        let rev = resp.header().map_or(0, |h| h.revision());
        Ok(Some(Lease {
            key,
            attrs: attrs.clone(),
            lease_id: id,
            expires: ttl.map(|t| SystemTime::now() + Duration::from_secs(t.as_secs().max(1))),
            mod_revision: rev,
        }))
    }
}

impl Registry for EtcdRegistry {
    type Watch = EtcdWatch;

    fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    async fn get_config(&self) -> Result<Option<String>, RegistryError> {
        let key = self.config_key();
        let resp = self
            .call("get", &key, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn put_config(&self, json: &str) -> Result<(), RegistryError> {
        let key = self.config_key();
        self.call("put", &key, |mut c| {
            let (key, json) = (key.clone(), json.to_string());
            async move { c.put(key, json, None).await }
        })
        .await?;
        Ok(())
    }

    async fn list(&self) -> Result<Listing, RegistryError> {
        let prefix = self.subnets_prefix();
        let resp = self
            .call("list", &prefix, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut listing = Listing {
            revision: resp.header().map_or(0, |h| h.revision()),
            ..Default::default()
        };
        for kv in resp.kvs() {
            match self.parse_kv(kv) {
                Ok(l) => listing.leases.push(l),
                Err(e) => listing.skipped.push(e),
            }
        }
        Ok(listing)
    }

    async fn create(
        &self,
        key: SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> Result<Option<Lease>, RegistryError> {
        let guard = Compare::version(self.subnet_key(&key), CompareOp::Equal, 0);
        self.put_if("create", key, guard, attrs, ttl).await
    }

    async fn update(
        &self,
        existing: &Lease,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> Result<Option<Lease>, RegistryError> {
        let guard = Compare::mod_revision(self.subnet_key(&existing.key), CompareOp::Equal, existing.mod_revision);
        let out = self.put_if("update", existing.key, guard, attrs, ttl).await?;
        if out.is_some() && existing.lease_id != 0 {
            // The key moved to the new lease; the old one would only linger until it expires.
            self.revoke_quietly(existing.lease_id).await;
        }
        Ok(out)
    }

    async fn delete(&self, existing: &Lease) -> Result<bool, RegistryError> {
        let full = self.subnet_key(&existing.key);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                full.clone(),
                CompareOp::Equal,
                existing.mod_revision,
            )])
            .and_then([TxnOp::delete(full.clone(), None)]);
        let resp = self
            .call("delete", &full, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    async fn keep_alive(&self, lease_id: i64) -> Result<Option<SystemTime>, RegistryError> {
        // etcd-client reports an unknown (expired) lease as a keep-alive error.
        let alive = self
            .call("keepalive", &format!("lease {lease_id:x}"), |mut c| async move {
                match c.lease_keep_alive(lease_id).await {
                    Ok(_) => Ok(true),
                    Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if !alive {
            return Ok(None);
        }
        Ok(self.time_to_live(lease_id).await?.map(|left| SystemTime::now() + left))
    }

    async fn time_to_live(&self, lease_id: i64) -> Result<Option<Duration>, RegistryError> {
        let resp = self
            .call("timetolive", &format!("lease {lease_id:x}"), |mut c| async move {
                c.lease_time_to_live(lease_id, None).await
            })
            .await?;
        Ok((resp.ttl() > 0).then(|| Duration::from_secs(resp.ttl() as u64)))
    }

    async fn watch(&self, from_revision: i64) -> Result<EtcdWatch, RegistryError> {
        let prefix = self.subnets_prefix();
        let stream = self
            .call("watch", &prefix, |mut c| {
                let prefix = prefix.clone();
                let opts = WatchOptions::new().with_prefix().with_start_revision(from_revision);
                async move { c.watch(prefix, Some(opts)).await }
            })
            .await?;
        Ok(EtcdWatch {
            registry: self.clone(),
            stream,
            from: from_revision,
        })
    }
}

/// Errors after which another endpoint may do better: no connection, or a member that cannot
/// serve (no leader). tonic's `Code` is matched by name since tonic is not a direct dependency.
fn cannot_serve(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            matches!(format!("{:?}", s.code()).as_str(), "Unavailable" | "DeadlineExceeded")
        }
        _ => false,
    }
}

pub struct EtcdWatch {
    registry: EtcdRegistry,
    stream: WatchStream,
    from: i64,
}

impl LeaseWatch for EtcdWatch {
    async fn next(&mut self) -> Result<WatchBatch, WatchError> {
        let broken = |reason: String| WatchError::Broken {
            target: self.registry.target.clone(),
            reason,
        };
        loop {
            let resp = match self.stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(broken("stream closed".into())),
                Err(e) => return Err(broken(e.to_string())),
            };
            if resp.compact_revision() > 0 {
                return Err(WatchError::Compacted {
                    requested: self.from,
                    compacted: resp.compact_revision(),
                });
            }
            if resp.canceled() {
                return Err(broken(format!("canceled by etcd: {}", resp.cancel_reason())));
            }
            if resp.events().is_empty() {
                continue; // created notice or progress report
            }
            // Resume after the last event itself: every event up to it has been delivered.
            let mut batch = WatchBatch::default();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                batch.revision = batch.revision.max(kv.mod_revision());
                match ev.event_type() {
                    EventType::Put => match self.registry.parse_kv(kv) {
                        Ok(l) => batch.events.push(RegistryEvent::Put(l)),
                        Err(e) => batch.skipped.push(e),
                    },
                    EventType::Delete => {
                        let full = String::from_utf8_lossy(kv.key()).into_owned();
                        let segment = full.strip_prefix(&self.registry.subnets_prefix()).unwrap_or(&full);
                        match SubnetKey::parse(segment) {
                            Ok(k) => batch.events.push(RegistryEvent::Deleted(k)),
                            Err(_) => batch.skipped.push(LeaseError::BadKey { key: full.clone() }),
                        }
                    }
                }
            }
            self.from = batch.revision + 1;
            return Ok(batch);
        }
    }
}
/// `--etcd-endpoints` as given, each checked: scheme, host, https when TLS files are given;
/// and the prefix.
fn checked_endpoints(args: &EtcdArgs) -> Result<Vec<String>, EtcdError> {
    let endpoints: Vec<String> = args
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(EtcdError::NoEndpoints);
    }
    let tls = uses_tls(args);
    for e in &endpoints {
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .ok_or_else(|| EtcdError::BadEndpoint {
                endpoint: e.clone(),
                reason: "must start with http:// or https://".into(),
            })?;
        let host = rest.split('/').next().unwrap_or("");
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(EtcdError::BadEndpoint {
                endpoint: e.clone(),
                reason: "expected scheme://host:port".into(),
            });
        }
        if tls && e.starts_with("http://") {
            return Err(EtcdError::TlsNeedsHttps(e.clone()));
        }
    }
    if !args.prefix.starts_with('/') {
        return Err(EtcdError::BadPrefix(args.prefix.clone()));
    }
    Ok(endpoints)
}

fn uses_tls(args: &EtcdArgs) -> bool {
    args.cafile.is_some() || args.certfile.is_some() || args.keyfile.is_some()
}

/// Timeouts, keepalives, TLS and credentials for every endpoint's client.
fn connect_options(args: &EtcdArgs) -> Result<ConnectOptions, EtcdError> {
    let tls = uses_tls(args);
    // Keepalive pings find a dead connection (etcd restarted, host gone) for watches too.
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if tls {
        let mut t = TlsOptions::new();
        if let Some(ca) = &args.cafile {
            t = t.ca_certificate(Certificate::from_pem(read_pem("--etcd-cafile", ca)?));
        }
        match (&args.certfile, &args.keyfile) {
            (Some(c), Some(k)) => {
                t = t.identity(Identity::from_pem(
                    read_pem("--etcd-certfile", c)?,
                    read_pem("--etcd-keyfile", k)?,
                ));
            }
            (Some(_), None) => {
                return Err(EtcdError::HalfIdentity {
                    given: "--etcd-certfile",
                });
            }
            (None, Some(_)) => {
                return Err(EtcdError::HalfIdentity {
                    given: "--etcd-keyfile",
                });
            }
            (None, None) => {}
        }
        opts = opts.with_tls(t);
    }
    match (&args.username, &args.password) {
        (Some(u), Some(p)) => opts = opts.with_user(u, p),
        (Some(_), None) => {
            return Err(EtcdError::HalfCredentials {
                given: "--etcd-username",
            });
        }
        (None, Some(_)) => {
            return Err(EtcdError::HalfCredentials {
                given: "--etcd-password",
            });
        }
        (None, None) => {}
    }
    Ok(opts)
}
