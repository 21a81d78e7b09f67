//! The lease manager: get the config, acquire this host's subnet the way flannel's
//! `LocalManager` does, keep it renewed, and turn the registry's changes into peer events.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use ipnetwork::{Ipv4Network, Ipv6Network};
use rand::Rng;
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, error, info, warn};

use super::{
    config::{ConfigError, NetworkConfig},
    lease::{Lease, LeaseAttrs, LeaseError, LeaseEvent, LeaseSet, RegistryEvent, SubnetKey},
    registry::{LeaseWatch, Registry, RegistryError, WatchError},
};

/// flannel's `subnetTTL`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// flannel's `--subnet-lease-renew-margin` default (60 minutes).
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(3600);
/// flannel's `raceRetries`.
pub const DEFAULT_RACE_RETRIES: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("network config at {key} is invalid: {source}")]
    Config { key: String, source: ConfigError },
    #[error("network config {key} does not exist; create it with `overlay config set`")]
    ConfigMissing { key: String },
    #[error("no free /{subnet_len} subnet left between {min} and {max} ({taken} leases exist)")]
    NetworkFull {
        subnet_len: u8,
        min: String,
        max: String,
        taken: usize,
    },
    #[error("gave up acquiring a subnet after {attempts} attempts lost to other hosts")]
    TooManyRaces { attempts: u32 },
    #[error("our lease {key} was lost: {reason}")]
    LeaseLost { key: SubnetKey, reason: String },
    #[error("our lease {key} changed in etcd while we rewrote it")]
    ChangedWhileWriting { key: SubnetKey },
    #[error("invalid lease manager option: {0}")]
    Options(String),
    #[error("lease event receiver was dropped")]
    ReceiverGone,
}

/// Knobs with flannel's defaults; tests shorten the times.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    pub lease_ttl: Duration,
    pub renew_margin: Duration,
    /// Wait before retrying a failed renewal (flannel: one minute).
    pub renew_retry: Duration,
    pub race_retries: u32,
    /// From the subnet file of a previous run: reused if free and still fitting the config.
    pub previous_subnet: Option<Ipv4Network>,
    pub previous_ipv6_subnet: Option<Ipv6Network>,
    /// If our lease is deleted from outside, acquire a new one instead of stopping.
    pub reacquire_on_loss: bool,
    /// Wait between config polls while the config key is missing (flanneld: 1 s).
    pub config_retry: Duration,
    /// First and longest wait before re-listing after a broken watch.
    pub resync_backoff_min: Duration,
    pub resync_backoff_max: Duration,
    /// Counts watches re-established after one broke (etcd restarted, connection lost,
    /// compaction): the agent's `overlay_etcd_reconnects_total`.
    pub reconnects: Arc<AtomicU64>,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            lease_ttl: DEFAULT_LEASE_TTL,
            renew_margin: DEFAULT_RENEW_MARGIN,
            renew_retry: Duration::from_secs(60),
            race_retries: DEFAULT_RACE_RETRIES,
            previous_subnet: None,
            previous_ipv6_subnet: None,
            reacquire_on_loss: false,
            config_retry: Duration::from_secs(1),
            resync_backoff_min: Duration::from_millis(100),
            resync_backoff_max: Duration::from_secs(5),
            reconnects: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl ManagerOptions {
    fn validate(&self) -> Result<(), ManagerError> {
        if self.lease_ttl < Duration::from_secs(2) {
            return Err(ManagerError::Options(format!(
                "lease TTL {:?} is below etcd's minimum of 2 s",
                self.lease_ttl
            )));
        }
        if self.renew_margin.is_zero() || self.renew_margin >= self.lease_ttl {
            return Err(ManagerError::Options(format!(
                "renew margin {:?} must be above zero and below the lease TTL {:?}",
                self.renew_margin, self.lease_ttl
            )));
        }
        if self.race_retries == 0 {
            return Err(ManagerError::Options("race retries must be at least 1".into()));
        }
        Ok(())
    }
}

pub struct LeaseManager<R> {
    registry: R,
    opts: ManagerOptions,
}

enum Attempt {
    Got(Lease),
    Raced,
}

impl<R: Registry> LeaseManager<R> {
    pub fn new(registry: R, opts: ManagerOptions) -> Result<Self, ManagerError> {
        opts.validate()?;
        Ok(LeaseManager { registry, opts })
    }

    pub fn registry(&self) -> &R {
        &self.registry
    }

    /// Read and validate the config once.
    pub async fn get_config(&self) -> Result<NetworkConfig, ManagerError> {
        let key = self.registry.config_key();
        let raw = self
            .registry
            .get_config()
            .await?
            .ok_or(ManagerError::ConfigMissing { key: key.clone() })?;
        NetworkConfig::parse(&raw).map_err(|source| ManagerError::Config { key, source })
    }

    /// Poll until a valid config exists, as flanneld does at start: a missing key, an
    /// unreachable etcd or an invalid config is logged and retried.
    pub async fn wait_for_config(&self) -> NetworkConfig {
        loop {
            match self.get_config().await {
                Ok(c) => return c,
                Err(e @ ManagerError::ConfigMissing { .. }) => info!("{e}; waiting"),
                Err(e) => error!("{e}; retrying"),
            }
            tokio::time::sleep(self.opts.config_retry).await;
        }
    }

    /// Get a subnet lease for `attrs.public_ip`: reuse ours, else the previous subnet, else a
    /// random free one; a lost creation race is retried up to `race_retries` times.
    pub async fn acquire(&self, config: &NetworkConfig, attrs: &LeaseAttrs) -> Result<Lease, ManagerError> {
        for attempt in 1..=self.opts.race_retries {
            match self.try_acquire(config, attrs).await? {
                Attempt::Got(l) => return Ok(l),
                Attempt::Raced => {
                    debug!(attempt, "lost a race for a subnet; trying again");
                    // Jitter so hosts that collided do not collide again in lockstep.
                    let ms = rand::rng().random_range(0..20 * u64::from(attempt));
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
        }
        Err(ManagerError::TooManyRaces {
            attempts: self.opts.race_retries,
        })
    }

    async fn try_acquire(&self, config: &NetworkConfig, attrs: &LeaseAttrs) -> Result<Attempt, ManagerError> {
        let listing = self.registry.list().await?;
        warn_skipped(&listing.skipped);
        let leases = listing.leases;

        // Ours is the lease of our PublicIP; in an IPv6-only network, where every lease's
        // PublicIP is 0.0.0.0, of our PublicIPv6 (flannel matches on PublicIP alone and so
        // takes another host's lease there).
        let ours = |l: &&Lease| match config.ipv4 {
            Some(_) => l.attrs.public_ip == attrs.public_ip,
            None => attrs.public_ipv6.is_some() && l.attrs.public_ipv6 == attrs.public_ipv6,
        };
        for l in leases.iter().filter(ours) {
            if fits(config, &l.key) {
                // A reservation stays one: no TTL (flannel gives it one on etcd v3, issue #1329).
                let ttl = (!l.is_reservation()).then_some(self.opts.lease_ttl);
                info!(subnet = %l.key, reservation = l.is_reservation(), "reusing the lease of our public IP");
                return Ok(match self.registry.update(l, attrs, ttl).await? {
                    Some(l) => Attempt::Got(l),
                    None => Attempt::Raced,
                });
            } else if l.is_reservation() {
                warn!(subnet = %l.key, "reservation for our public IP does not fit the network config; leaving it alone");
            } else {
                info!(subnet = %l.key, "lease of our public IP does not fit the network config; deleting it");
                self.registry.delete(l).await?;
            }
        }

        let taken: Vec<&Lease> = leases.iter().collect();
        let previous = match (config.ipv4, self.opts.previous_subnet, self.opts.previous_ipv6_subnet) {
            (Some(_), Some(v4), v6) => Some(SubnetKey::new(v4, v6)),
            (None, _, Some(v6)) => Some(SubnetKey::ipv6_only(v6)),
            _ => None,
        };
        let key = match previous {
            Some(prev) if fits(config, &prev) && !taken.iter().any(|l| overlaps(&l.key, &prev)) => {
                info!(subnet = %prev, "reusing the previous subnet from the subnet file");
                prev
            }
            prev => {
                if let Some(prev) = prev {
                    info!(subnet = %prev, "previous subnet is taken or does not fit the config; picking another");
                }
                allocate(config, &taken)?
            }
        };
        Ok(
            match self.registry.create(key, attrs, Some(self.opts.lease_ttl)).await? {
                Some(l) => {
                    info!(subnet = %l.key, "acquired lease");
                    Attempt::Got(l)
                }
                None => Attempt::Raced,
            },
        )
    }

    /// Renew our lease once; reservations need nothing. Errors if the etcd lease is gone.
    pub async fn renew(&self, lease: &mut Lease) -> Result<(), ManagerError> {
        if lease.is_reservation() {
            return Ok(());
        }
        match self.registry.keep_alive(lease.lease_id).await? {
            Some(exp) => {
                lease.expires = Some(exp);
                Ok(())
            }
            None => Err(ManagerError::LeaseLost {
                key: lease.key,
                reason: "its etcd lease expired".into(),
            }),
        }
    }

    /// Keep `own` renewed and report every other host's lease on `events` (first the current
    /// set as `Added`, then changes). After a compaction or a broken connection it re-lists
    /// and sends only the difference. Returns only on error: our lease lost (unless
    /// `reacquire_on_loss`) or the receiver dropped. Cancel it by dropping the future.
    pub async fn run(
        &self,
        config: &NetworkConfig,
        own: Lease,
        events: mpsc::Sender<LeaseEvent>,
    ) -> Result<(), ManagerError> {
        self.run_republishing(config, own, events, None).await
    }

    /// [`Self::run`], and our lease rewritten with the attributes that come on `republish`
    /// (a new PublicIP when the underlay's address changed), same subnet, same key: we hold
    /// it, and containers keep their addresses. A failed write is retried until it lands or
    /// newer attributes replace it.
    pub async fn run_republishing(
        &self,
        config: &NetworkConfig,
        own: Lease,
        events: mpsc::Sender<LeaseEvent>,
        mut republish: Option<mpsc::Receiver<LeaseAttrs>>,
    ) -> Result<(), ManagerError> {
        let mut peers = LeaseSet::new();
        // Attributes still to be written, and when to try.
        let mut pending: Option<(LeaseAttrs, Instant)> = None;
        let mut publish_backoff = self.opts.resync_backoff_min;
        let mut watch: Option<R::Watch> = None;
        let mut backoff = self.opts.resync_backoff_min;
        let mut resync_at = Instant::now();
        let mut watched_before = false;
        let mut own = Own {
            renew_at: self.renew_deadline(&own),
            lease: own,
        };

        loop {
            enum Step<B> {
                Renew,
                Resync,
                Batch(B),
                NewAttrs(Option<LeaseAttrs>),
                Publish,
            }
            let new_attrs = async {
                match republish.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            };
            let publish_at = async {
                match &pending {
                    Some((_, at)) => tokio::time::sleep_until(*at).await,
                    None => std::future::pending().await,
                }
            };
            let step = match watch.as_mut() {
                Some(w) => tokio::select! {
                    r = w.next() => Step::Batch(r),
                    _ = tokio::time::sleep_until(own.renew_at) => Step::Renew,
                    a = new_attrs => Step::NewAttrs(a),
                    _ = publish_at => Step::Publish,
                },
                None => tokio::select! {
                    _ = tokio::time::sleep_until(resync_at) => Step::Resync,
                    _ = tokio::time::sleep_until(own.renew_at) => Step::Renew,
                    a = new_attrs => Step::NewAttrs(a),
                    _ = publish_at => Step::Publish,
                },
            };
            match step {
                Step::NewAttrs(None) => republish = None,
                Step::NewAttrs(Some(attrs)) => {
                    publish_backoff = self.opts.resync_backoff_min;
                    pending = Some((attrs, Instant::now()));
                }
                Step::Publish => {
                    let Some((attrs, _)) = pending.take() else { continue };
                    match self.republish(&mut own, &attrs).await {
                        Ok(()) => {}
                        Err(e) => {
                            warn!(
                                "publishing PublicIP {} in our lease {} failed (retrying in {publish_backoff:?}): {e}",
                                attrs.public_ip, own.lease.key
                            );
                            pending = Some((attrs, Instant::now() + publish_backoff));
                            publish_backoff = (publish_backoff * 2).min(self.opts.resync_backoff_max);
                        }
                    }
                }
                Step::Renew => match self.renew(&mut own.lease).await {
                    Ok(()) => {
                        debug!(subnet = %own.lease.key, "lease renewed");
                        own.renew_at = self.renew_deadline(&own.lease);
                    }
                    Err(ManagerError::LeaseLost { reason, .. }) => {
                        self.lost(config, &mut own, &reason, &mut peers, &events).await?;
                    }
                    Err(e) => {
                        warn!(
                            "renewing lease {} failed (retrying in {:?}): {e}",
                            own.lease.key, self.opts.renew_retry
                        );
                        own.renew_at = Instant::now() + self.opts.renew_retry;
                    }
                },
                Step::Resync => match self.registry.list().await {
                    Ok(listing) => {
                        warn_skipped(&listing.skipped);
                        let revision = listing.revision;
                        self.resync(config, &mut own, listing.leases, &mut peers, &events)
                            .await?;
                        match self.registry.watch(revision + 1).await {
                            Ok(w) => {
                                if watched_before {
                                    self.opts.reconnects.fetch_add(1, Ordering::Relaxed);
                                }
                                watched_before = true;
                                watch = Some(w);
                                backoff = self.opts.resync_backoff_min;
                            }
                            Err(e) => {
                                warn!("starting the lease watch failed: {e}");
                                resync_at = Instant::now() + backoff;
                                backoff = (backoff * 2).min(self.opts.resync_backoff_max);
                            }
                        }
                    }
                    Err(e) => {
                        warn!("listing leases failed (retrying in {backoff:?}): {e}");
                        resync_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(self.opts.resync_backoff_max);
                    }
                },
                Step::Batch(Err(e)) => {
                    match &e {
                        WatchError::Compacted { .. } => warn!("{e}; re-listing leases"),
                        WatchError::Broken { .. } => warn!("{e}; re-listing leases in {backoff:?}"),
                    }
                    watch = None;
                    resync_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(self.opts.resync_backoff_max);
                }
                Step::Batch(Ok(batch)) => {
                    warn_skipped(&batch.skipped);
                    let revision = batch.revision;
                    // A peer's lease overwritten with a malformed value is no longer a usable
                    // peer: as if deleted (unless the same batch put a valid value there).
                    let unusable: Vec<SubnetKey> = batch
                        .skipped
                        .iter()
                        .filter_map(|e| match e {
                            LeaseError::BadValue { key, .. } => SubnetKey::parse(key.rsplit('/').next()?).ok(),
                            LeaseError::BadKey { .. } => None,
                        })
                        .filter(|k| {
                            *k != own.lease.key
                                && !batch
                                    .events
                                    .iter()
                                    .any(|ev| matches!(ev, RegistryEvent::Put(l) if l.key == *k))
                        })
                        .collect();
                    for ev in batch
                        .events
                        .into_iter()
                        .chain(unusable.into_iter().map(RegistryEvent::Deleted))
                    {
                        self.apply_change(config, &mut own, ev, &mut peers, &events).await?;
                    }
                    debug!(revision, "lease watch batch applied");
                }
            }
        }
    }

    /// Write `attrs` into our lease, guarded by its revision: a lost guard (our key changed
    /// under us) is an error, and the retry uses the revision the watch saw since.
    async fn republish(&self, own: &mut Own, attrs: &LeaseAttrs) -> Result<(), ManagerError> {
        if own.lease.attrs == *attrs {
            return Ok(());
        }
        let ttl = (!own.lease.is_reservation()).then_some(self.opts.lease_ttl);
        let old_ip = own.lease.attrs.public_ip;
        match self.registry.update(&own.lease, attrs, ttl).await? {
            Some(l) => {
                info!(subnet = %l.key, old = %old_ip, new = %attrs.public_ip, "our lease now publishes the new PublicIP");
                own.renew_at = self.renew_deadline(&l);
                own.lease = l;
                Ok(())
            }
            None => Err(ManagerError::ChangedWhileWriting { key: own.lease.key }),
        }
    }

    /// A full listing: our own lease checked, the others' difference to what we knew sent.
    async fn resync(
        &self,
        config: &NetworkConfig,
        own: &mut Own,
        leases: Vec<Lease>,
        peers: &mut LeaseSet,
        events: &mpsc::Sender<LeaseEvent>,
    ) -> Result<(), ManagerError> {
        let mut snapshot = Vec::new();
        let mut own_now = None;
        for l in leases {
            if l.key == own.lease.key {
                own_now = Some(l);
            } else if in_network(config, &l) {
                snapshot.push(l);
            }
        }
        for e in peers.reset(snapshot) {
            events.send(e).await.map_err(|_| ManagerError::ReceiverGone)?;
        }
        self.own_seen(config, own, own_now, peers, events).await
    }

    /// One change from the watch: to our own lease, or another host's.
    async fn apply_change(
        &self,
        config: &NetworkConfig,
        own: &mut Own,
        ev: RegistryEvent,
        peers: &mut LeaseSet,
        events: &mpsc::Sender<LeaseEvent>,
    ) -> Result<(), ManagerError> {
        let key = match &ev {
            RegistryEvent::Put(l) => l.key,
            RegistryEvent::Deleted(k) => *k,
        };
        if key == own.lease.key {
            let seen = match ev {
                RegistryEvent::Put(l) => Some(l),
                RegistryEvent::Deleted(_) => None,
            };
            return self.own_seen(config, own, seen, peers, events).await;
        }
        if let RegistryEvent::Put(l) = &ev
            && !in_network(config, l)
        {
            return Ok(());
        }
        if let Some(e) = peers.apply(ev) {
            events.send(e).await.map_err(|_| ManagerError::ReceiverGone)?;
        }
        Ok(())
    }

    /// What the registry holds under our key now (None: nothing). Our PublicIP's lease is still
    /// ours (held by another etcd lease after a restore: renew at once); anything else means
    /// we lost it.
    async fn own_seen(
        &self,
        config: &NetworkConfig,
        own: &mut Own,
        seen: Option<Lease>,
        peers: &mut LeaseSet,
        events: &mpsc::Sender<LeaseEvent>,
    ) -> Result<(), ManagerError> {
        match seen {
            // Older than what we wrote ourselves (our republished PublicIP): already known.
            Some(l) if l.mod_revision != 0 && l.mod_revision < own.lease.mod_revision => Ok(()),
            Some(l) if l.attrs.public_ip == own.lease.attrs.public_ip => {
                if l.lease_id != own.lease.lease_id {
                    own.renew_at = Instant::now();
                }
                own.lease = Lease {
                    expires: own.lease.expires,
                    ..l
                };
                Ok(())
            }
            Some(_) => {
                self.lost(config, own, "another host's lease now holds the key", peers, events)
                    .await
            }
            None => self.lost(config, own, "the key was deleted", peers, events).await,
        }
    }

    fn renew_deadline(&self, own: &Lease) -> Instant {
        match own.expires {
            _ if own.is_reservation() => Instant::now() + Duration::from_secs(365 * 24 * 3600),
            Some(exp) => {
                let left = exp.duration_since(SystemTime::now()).unwrap_or_default();
                Instant::now() + left.saturating_sub(self.opts.renew_margin)
            }
            None => Instant::now(),
        }
    }

    /// Our lease is gone: stop (as flanneld does) or, if asked, acquire a new one.
    async fn lost(
        &self,
        config: &NetworkConfig,
        own: &mut Own,
        reason: &str,
        peers: &mut LeaseSet,
        events: &mpsc::Sender<LeaseEvent>,
    ) -> Result<(), ManagerError> {
        let own_key = own.lease.key;
        if !self.opts.reacquire_on_loss {
            error!("our lease {own_key} was lost ({reason}); stopping");
            return Err(ManagerError::LeaseLost {
                key: own_key,
                reason: reason.into(),
            });
        }
        warn!("our lease {own_key} was lost ({reason}); acquiring a new one");
        let mut backoff = self.opts.resync_backoff_min;
        let fresh = loop {
            match self.acquire(config, &own.lease.attrs).await {
                Ok(l) => break l,
                Err(e @ (ManagerError::Registry(_) | ManagerError::TooManyRaces { .. })) => {
                    warn!("re-acquiring failed (retrying in {backoff:?}): {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.opts.resync_backoff_max);
                }
                Err(e) => return Err(e),
            }
        };
        // If the new subnet was known as a peer's (it was not: it was free), forget it.
        if let Some(e) = peers.apply(RegistryEvent::Deleted(fresh.key)) {
            events.send(e).await.map_err(|_| ManagerError::ReceiverGone)?;
        }
        events
            .send(LeaseEvent::Reacquired(fresh.clone()))
            .await
            .map_err(|_| ManagerError::ReceiverGone)?;
        own.renew_at = self.renew_deadline(&fresh);
        own.lease = fresh;
        Ok(())
    }
}

fn warn_skipped(skipped: &[LeaseError]) {
    for e in skipped {
        warn!("skipping malformed lease: {e}");
    }
}

/// A lease outside the configured network is someone's mistake: skip it with a warning.
fn in_network(config: &NetworkConfig, l: &Lease) -> bool {
    let (v4_ok, v6_ok) = match (&config.ipv4, l.key.ipv4_subnet()) {
        (Some(pool), Some(sn)) => (
            pool.network.contains(sn.network()) && sn.prefix() >= pool.network.prefix(),
            true,
        ),
        (Some(_), None) => (false, true),
        // IPv6-only: the IPv6 subnet decides.
        (None, _) => (
            true,
            match (&config.ipv6, l.key.ipv6) {
                (Some(pool), Some(sn)) => pool.network.contains(sn.network()) && sn.prefix() >= pool.network.prefix(),
                _ => false,
            },
        ),
    };
    let ok = v4_ok && v6_ok;
    if !ok {
        warn!("skipping lease {} outside the configured network", l.key);
    }
    ok
}

/// flannel's isSubnetConfigCompat and isIPv6SubnetConfigCompat together.
fn fits(config: &NetworkConfig, key: &SubnetKey) -> bool {
    let v4 = match &config.ipv4 {
        Some(p) => p.fits(key.ipv4),
        None => key.ipv4_subnet().is_none(),
    };
    let v6 = match (&config.ipv6, key.ipv6) {
        (None, None) => true,
        (Some(p), Some(sn)) => p.fits(sn),
        _ => false,
    };
    v4 && v6
}

fn v4_range(n: Ipv4Network) -> (u128, u128) {
    let start = u128::from(u32::from(n.network()));
    (start, start + (1u128 << (32 - n.prefix())) - 1)
}

fn v6_range(n: Ipv6Network) -> (u128, u128) {
    let start = u128::from(n.network());
    let host = if n.prefix() == 0 {
        u128::MAX
    } else {
        (1u128 << (128 - n.prefix())) - 1
    };
    (start, start | host)
}

fn overlaps(a: &SubnetKey, b: &SubnetKey) -> bool {
    let hit = |(s1, e1): (u128, u128), (s2, e2): (u128, u128)| s1 <= e2 && s2 <= e1;
    // An IPv6-only key's 0.0.0.0/0 holds no IPv4 addresses.
    matches!((a.ipv4_subnet(), b.ipv4_subnet()), (Some(x), Some(y)) if hit(v4_range(x), v4_range(y)))
        || matches!((a.ipv6, b.ipv6), (Some(x), Some(y)) if hit(v6_range(x), v6_range(y)))
}

/// How many candidates to look at, at most; a /8 cut into /24s is 65 536.
const MAX_SCAN: u128 = 1 << 20;

/// Pick uniformly among free subnets from `min` to `max` (both subnet starts) of size `step`.
/// `taken` is merged into disjoint ranges so each candidate is one binary search.
fn pick_free(min: u128, max: u128, step: u128, mut taken: Vec<(u128, u128)>) -> Option<u128> {
    taken.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(taken.len());
    for (s, e) in taken {
        match merged.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut rng = rand::rng();
    let (mut chosen, mut seen) = (None, 0u64);
    let mut c = min;
    let mut scanned = 0;
    while c <= max && scanned < MAX_SCAN {
        let end = c + step - 1;
        let i = merged.partition_point(|r| r.0 <= end);
        let busy = i > 0 && merged[i - 1].1 >= c;
        if !busy {
            // Reservoir sampling: each free candidate ends up chosen with equal chance.
            seen += 1;
            if rng.random_range(0..seen) == 0 {
                chosen = Some(c);
            }
        }
        scanned += 1;
        match c.checked_add(step) {
            Some(n) => c = n,
            None => break,
        }
    }
    chosen
}

fn allocate(config: &NetworkConfig, taken: &[&Lease]) -> Result<SubnetKey, ManagerError> {
    let ipv4 = match &config.ipv4 {
        None => SubnetKey::NO_IPV4,
        Some(p4) => {
            let v4 = pick_free(
                u128::from(u32::from(p4.subnet_min)),
                u128::from(u32::from(p4.subnet_max)),
                1u128 << (32 - p4.subnet_len),
                taken.iter().filter_map(|l| l.key.ipv4_subnet().map(v4_range)).collect(),
            )
            .ok_or_else(|| ManagerError::NetworkFull {
                subnet_len: p4.subnet_len,
                min: p4.subnet_min.to_string(),
                max: p4.subnet_max.to_string(),
                taken: taken.len(),
            })?;
            Ipv4Network::new(Ipv4Addr::from(v4 as u32), p4.subnet_len).expect("valid prefix")
        }
    };
    let ipv6 = match &config.ipv6 {
        None => None,
        Some(p6) => {
            let v6 = pick_free(
                u128::from(p6.subnet_min),
                u128::from(p6.subnet_max),
                1u128 << (128 - p6.subnet_len),
                taken.iter().filter_map(|l| l.key.ipv6.map(v6_range)).collect(),
            )
            .ok_or_else(|| ManagerError::NetworkFull {
                subnet_len: p6.subnet_len,
                min: p6.subnet_min.to_string(),
                max: p6.subnet_max.to_string(),
                taken: taken.len(),
            })?;
            Some(Ipv6Network::new(v6.into(), p6.subnet_len).expect("valid prefix"))
        }
    };
    Ok(SubnetKey::new(ipv4, ipv6))
}

/// Our own lease as [`LeaseManager::run`] keeps it, with when to renew it next.
struct Own {
    lease: Lease,
    renew_at: Instant,
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, net::Ipv6Addr};

    use super::*;
    use crate::subnet::mem::MemRegistry;

    const CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;

    fn attrs(last: u8) -> LeaseAttrs {
        LeaseAttrs::new(
            Ipv4Addr::new(192, 168, 0, last),
            crate::subnet::LeaseBackend::Vxlan(crate::subnet::VxlanData {
                vni: 1,
                vtep_mac: "aa:bb:cc:dd:ee:ff".parse().unwrap(),
            }),
        )
    }

    fn manager(reg: &MemRegistry, opts: ManagerOptions) -> LeaseManager<MemRegistry> {
        LeaseManager::new(reg.clone(), opts).unwrap()
    }

    async fn setup(config: &str) -> (MemRegistry, NetworkConfig) {
        let reg = MemRegistry::new();
        reg.put_config(config).await.unwrap();
        (reg, NetworkConfig::parse(config).unwrap())
    }

    #[tokio::test]
    async fn acquire_reuses_lease_of_same_public_ip() {
        let (reg, cfg) = setup(CONFIG).await;
        let m = manager(&reg, ManagerOptions::default());
        let first = m.acquire(&cfg, &attrs(1)).await.unwrap();
        assert!(cfg.ipv4.unwrap().fits(first.key.ipv4));
        let again = m.acquire(&cfg, &attrs(1)).await.unwrap();
        assert_eq!(again.key, first.key);
        let other = m.acquire(&cfg, &attrs(2)).await.unwrap();
        assert_ne!(other.key, first.key);
        assert_eq!(reg.list().await.unwrap().leases.len(), 2);
    }

    #[tokio::test]
    async fn previous_subnet_is_used_if_free_and_fitting() {
        let (reg, cfg) = setup(CONFIG).await;
        let opts = ManagerOptions {
            previous_subnet: Some("10.5.77.0/24".parse().unwrap()),
            ..Default::default()
        };
        let l = manager(&reg, opts.clone()).acquire(&cfg, &attrs(1)).await.unwrap();
        assert_eq!(l.key.to_string(), "10.5.77.0-24");
        // Taken by host 1 now: host 2 with the same previous subnet gets another one.
        let l2 = manager(&reg, opts).acquire(&cfg, &attrs(2)).await.unwrap();
        assert_ne!(l2.key, l.key);
        // Outside the config: ignored.
        let opts = ManagerOptions {
            previous_subnet: Some("10.6.1.0/24".parse().unwrap()),
            ..Default::default()
        };
        let l3 = manager(&reg, opts).acquire(&cfg, &attrs(3)).await.unwrap();
        assert!(cfg.ipv4.unwrap().fits(l3.key.ipv4));
    }

    #[tokio::test]
    async fn network_full_is_a_clear_error() {
        // /28 network: subnets /30, min .4, max .12: three subnets.
        let (reg, cfg) = setup(r#"{"Network":"10.9.0.0/28"}"#).await;
        let m = manager(&reg, ManagerOptions::default());
        let mut got = HashSet::new();
        for i in 1..=3 {
            got.insert(m.acquire(&cfg, &attrs(i)).await.unwrap().key);
        }
        assert_eq!(got.len(), 3);
        let err = m.acquire(&cfg, &attrs(4)).await.unwrap_err();
        assert!(matches!(err, ManagerError::NetworkFull { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("no free /30 subnet left between 10.9.0.4 and 10.9.0.12"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn reservation_is_reused_without_ttl_and_never_taken() {
        let (reg, cfg) = setup(r#"{"Network":"10.9.0.0/28"}"#).await;
        // Reserve 10.9.0.4/30 for host .1 (no etcd lease).
        reg.put_raw("10.9.0.4-30", attrs(1).to_json().as_bytes(), 0);
        let m = manager(&reg, ManagerOptions::default());
        for i in 2..=3 {
            let l = m.acquire(&cfg, &attrs(i)).await.unwrap();
            assert_ne!(l.key.to_string(), "10.9.0.4-30");
        }
        assert!(matches!(
            m.acquire(&cfg, &attrs(9)).await,
            Err(ManagerError::NetworkFull { .. })
        ));
        let mine = m.acquire(&cfg, &attrs(1)).await.unwrap();
        assert_eq!(mine.key.to_string(), "10.9.0.4-30");
        assert!(mine.is_reservation(), "reuse must not attach a TTL to a reservation");
        let mut mine2 = mine.clone();
        m.renew(&mut mine2).await.unwrap();
        assert!(
            reg.list()
                .await
                .unwrap()
                .leases
                .iter()
                .any(|l| l.key == mine.key && l.lease_id == 0)
        );
    }

    #[tokio::test]
    async fn incompatible_lease_of_our_ip_is_replaced() {
        let (reg, cfg) = setup(CONFIG).await;
        reg.put_raw("10.5.0.0-24", attrs(1).to_json().as_bytes(), 0);
        reg.put_raw("10.5.8.0-25", attrs(2).to_json().as_bytes(), 7);
        let m = manager(&reg, ManagerOptions::default());
        let l = m.acquire(&cfg, &attrs(2)).await.unwrap();
        assert_ne!(l.key.to_string(), "10.5.8.0-25");
        let keys: Vec<String> = reg
            .list()
            .await
            .unwrap()
            .leases
            .iter()
            .map(|l| l.key.to_string())
            .collect();
        assert!(
            !keys.contains(&"10.5.8.0-25".to_string()),
            "wrong-length lease deleted: {keys:?}"
        );
        assert!(keys.contains(&"10.5.0.0-24".to_string()), "reservation kept: {keys:?}");
    }

    #[tokio::test]
    async fn dual_stack_acquires_both_families() {
        let c = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:5::/48","Backend":{"Type":"vxlan"}}"#;
        let (reg, cfg) = setup(c).await;
        let l = manager(&reg, ManagerOptions::default())
            .acquire(&cfg, &attrs(1))
            .await
            .unwrap();
        let v6 = l.key.ipv6.expect("an IPv6 subnet");
        assert!(cfg.ipv6.unwrap().fits(v6));
        assert!(l.key.to_string().contains('&'));
    }

    #[tokio::test]
    async fn ipv6_only_leases_by_public_ipv6_in_flannels_key_format() {
        let c = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:5::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#;
        let (reg, cfg) = setup(c).await;
        let m = manager(&reg, ManagerOptions::default());
        let v6_attrs = |last: u16| {
            let mut a = attrs(0);
            a.public_ip = Ipv4Addr::UNSPECIFIED;
            a.with_ipv6(Ipv6Addr::new(0xfd00, 0xbeef, 0, 0, 0, 0, 0, last), None)
        };
        let mut keys = HashSet::new();
        for host in 1..=8 {
            let l = m.acquire(&cfg, &v6_attrs(host)).await.unwrap();
            let text = l.key.to_string();
            assert!(text.starts_with("0.0.0.0-0&fd00:5:0:"), "{text}");
            assert_eq!(l.key.ipv4_subnet(), None);
            assert!(keys.insert(text), "every host its own subnet");
        }
        // Restarted host 3: the same lease again, found by its PublicIPv6.
        let again = m.acquire(&cfg, &v6_attrs(3)).await.unwrap();
        assert!(keys.contains(&again.key.to_string()));
        assert_eq!(reg.list().await.unwrap().leases.len(), 8);
    }

    #[tokio::test]
    async fn ipv6_subnet_range_is_honoured() {
        let c = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","IPv6SubnetLen":64,
            "IPv6SubnetMin":"fd00:5:0:10::","IPv6SubnetMax":"fd00:5:0:11::","Backend":{"Type":"vxlan"}}"#;
        let (reg, cfg) = setup(c).await;
        let m = manager(&reg, ManagerOptions::default());
        let mut got = HashSet::new();
        for host in 1..=2 {
            got.insert(
                m.acquire(&cfg, &attrs(host))
                    .await
                    .unwrap()
                    .key
                    .ipv6
                    .unwrap()
                    .to_string(),
            );
        }
        let want: HashSet<String> = ["fd00:5:0:10::/64", "fd00:5:0:11::/64"].map(String::from).into();
        assert_eq!(got, want);
        match m.acquire(&cfg, &attrs(3)).await {
            Err(ManagerError::NetworkFull {
                subnet_len: 64, min, ..
            }) => assert_eq!(min, "fd00:5:0:10::"),
            other => panic!("expected the IPv6 range full, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn options_are_validated() {
        let reg = MemRegistry::new();
        let bad = ManagerOptions {
            renew_margin: DEFAULT_LEASE_TTL,
            ..Default::default()
        };
        assert!(matches!(
            LeaseManager::new(reg.clone(), bad),
            Err(ManagerError::Options(_))
        ));
    }

    #[tokio::test]
    async fn missing_and_invalid_config_are_named() {
        let reg = MemRegistry::new();
        let m = manager(&reg, ManagerOptions::default());
        assert!(matches!(m.get_config().await, Err(ManagerError::ConfigMissing { .. })));
        reg.put_config(r#"{"Network":"10.0.0.0/16","SubnetLen":40}"#)
            .await
            .unwrap();
        let e = m.get_config().await.unwrap_err();
        assert!(e.to_string().contains("SubnetLen"), "{e}");
    }

    async fn next(rx: &mut mpsc::Receiver<LeaseEvent>) -> LeaseEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event in time")
            .expect("channel open")
    }

    #[tokio::test]
    async fn run_reports_peers_and_resyncs_after_compaction() {
        let (reg, cfg) = setup(CONFIG).await;
        reg.put_raw("10.5.3.0-24", attrs(3).to_json().as_bytes(), 0);
        let opts = ManagerOptions {
            resync_backoff_min: Duration::from_millis(10),
            // Our subnet must not be one of the keys this test writes as other hosts'.
            previous_subnet: Some("10.5.1.0/24".parse().unwrap()),
            ..Default::default()
        };
        let m = manager(&reg, opts);
        let own = m.acquire(&cfg, &attrs(1)).await.unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let run = tokio::spawn(async move { m.run(&cfg, own, tx).await });
        assert!(matches!(next(&mut rx).await, LeaseEvent::Added(l) if l.key.to_string() == "10.5.3.0-24"));
        reg.put_raw("10.5.4.0-24", attrs(4).to_json().as_bytes(), 0);
        assert!(matches!(next(&mut rx).await, LeaseEvent::Added(l) if l.key.to_string() == "10.5.4.0-24"));
        reg.put_raw("10.5.4.0-24", attrs(5).to_json().as_bytes(), 0);
        assert!(matches!(next(&mut rx).await, LeaseEvent::Changed(l) if l.attrs.public_ip == attrs(5).public_ip));
        // Malformed and outside-network values are skipped, the loop goes on.
        reg.put_raw("10.5.9.0-24", b"{not json", 0);
        reg.put_raw("garbage", b"{}", 0);
        reg.put_raw("10.99.1.0-24", attrs(6).to_json().as_bytes(), 0);
        // A gap: break the watch, change things, compact; only the difference comes out.
        reg.break_watches();
        reg.delete_raw("10.5.3.0-24");
        reg.put_raw("10.5.6.0-24", attrs(6).to_json().as_bytes(), 0);
        reg.compact();
        let mut got = vec![next(&mut rx).await, next(&mut rx).await];
        got.sort_by_key(|e| format!("{e:?}"));
        assert!(
            matches!(&got[0], LeaseEvent::Added(l) if l.key.to_string() == "10.5.6.0-24"),
            "{got:?}"
        );
        assert!(
            matches!(&got[1], LeaseEvent::Removed(l) if l.key.to_string() == "10.5.3.0-24"),
            "{got:?}"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "nothing repeated"
        );
        run.abort();
    }

    #[tokio::test]
    async fn own_lease_deleted_stops_or_reacquires() {
        let (reg, cfg) = setup(CONFIG).await;
        let m = manager(&reg, ManagerOptions::default());
        let own = m.acquire(&cfg, &attrs(1)).await.unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let key = own.key;
        let run = tokio::spawn({
            let cfg = cfg.clone();
            async move { m.run(&cfg, own, tx).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        reg.delete_raw(&key.to_string());
        let err = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, ManagerError::LeaseLost { key: k, .. } if k == key),
            "{err}"
        );

        let m = manager(
            &reg,
            ManagerOptions {
                reacquire_on_loss: true,
                ..Default::default()
            },
        );
        let own = m.acquire(&cfg, &attrs(1)).await.unwrap();
        let expired_id = own.lease_id;
        let (tx, mut rx) = mpsc::channel(16);
        let run = tokio::spawn(async move { m.run(&cfg, own, tx).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        reg.expire(expired_id);
        assert!(matches!(next(&mut rx).await, LeaseEvent::Reacquired(l) if l.lease_id != expired_id));
        run.abort();
    }

    #[tokio::test]
    async fn republished_attrs_keep_our_subnet_and_reach_the_peers() {
        let (reg, cfg) = setup(CONFIG).await;
        let (ours, peer) = (
            manager(&reg, ManagerOptions::default()),
            manager(&reg, ManagerOptions::default()),
        );
        let own = ours.acquire(&cfg, &attrs(1)).await.unwrap();
        let peer_own = peer.acquire(&cfg, &attrs(2)).await.unwrap();
        let key = own.key;
        let (tx, _rx) = mpsc::channel(16);
        let (publish, republish) = mpsc::channel(4);
        let run = tokio::spawn({
            let cfg = cfg.clone();
            async move { ours.run_republishing(&cfg, own, tx, Some(republish)).await }
        });
        let (peer_tx, mut peer_rx) = mpsc::channel(16);
        let peer_run = tokio::spawn({
            let cfg = cfg.clone();
            async move { peer.run(&cfg, peer_own, peer_tx).await }
        });
        assert!(matches!(next(&mut peer_rx).await, LeaseEvent::Added(l) if l.key == key));

        publish.send(attrs(9)).await.unwrap();
        match next(&mut peer_rx).await {
            LeaseEvent::Changed(l) => assert_eq!((l.key, l.attrs.public_ip), (key, attrs(9).public_ip)),
            e => panic!("the peer saw {e:?}"),
        }
        let listing = reg.list().await.unwrap();
        let stored = listing
            .leases
            .iter()
            .find(|l| l.key == key)
            .expect("our lease is still there");
        assert_eq!(stored.attrs, attrs(9));
        // Our own write is not mistaken for another host taking our key.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!run.is_finished(), "{:?}", run.await);
        run.abort();
        peer_run.abort();
    }

    #[test]
    fn pick_free_skips_taken_and_covers_all_free() {
        // Candidates 0,4,8,12 of size 4; 4..7 and a big range from 12 on are taken.
        let mut seen = HashSet::new();
        for _ in 0..200 {
            seen.insert(pick_free(0, 12, 4, vec![(4, 7), (12, 40)]).unwrap());
        }
        assert_eq!(seen, HashSet::from([0, 8]));
        assert_eq!(pick_free(0, 12, 4, vec![(0, 15)]), None);
        // A range that only partly covers a candidate still makes it busy.
        assert_eq!(pick_free(0, 4, 4, vec![(2, 2), (7, 7)]), None);
    }
}
