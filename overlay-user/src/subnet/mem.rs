//! An in-memory [`Registry`] with etcd's semantics where the manager relies on them
//! (revisions, create-if-absent, compare-and-swap, watch history, compaction), for fast tests.
//! Leases expire only when a test says so ([`MemRegistry::expire`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::Notify;

use super::{
    lease::{Lease, LeaseAttrs, RegistryEvent, SubnetKey},
    registry::{LeaseWatch, Listing, Registry, RegistryError, WatchBatch, WatchError},
};

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    lease_id: i64,
    mod_revision: i64,
}

#[derive(Debug, Clone)]
enum Change {
    Put(String, Entry),
    Delete(String),
}

#[derive(Debug, Default)]
struct State {
    config: Option<String>,
    kvs: BTreeMap<String, Entry>,
    leases: HashMap<i64, Duration>,
    revision: i64,
    history: Vec<(i64, Change)>,
    compacted: i64,
    next_lease: i64,
    /// Bumped to break every open watch, as a lost connection would.
    generation: u64,
    unavailable: bool,
}

#[derive(Debug, Clone, Default)]
pub struct MemRegistry {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

const TARGET: &str = "memory";

impl MemRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("mem registry lock poisoned")
    }

    fn check(&self, op: &'static str, key: &str) -> Result<(), RegistryError> {
        if self.lock().unavailable {
            return Err(RegistryError::Request {
                op,
                key: key.to_string(),
                target: TARGET.into(),
                reason: "unavailable".into(),
            });
        }
        Ok(())
    }

    /// Write any bytes under `subnets/<segment>`, as another (possibly broken) writer would.
    pub fn put_raw(&self, segment: &str, value: &[u8], lease_id: i64) {
        let mut s = self.lock();
        s.revision += 1;
        let e = Entry {
            value: value.to_vec(),
            lease_id,
            mod_revision: s.revision,
        };
        let rev = s.revision;
        s.kvs.insert(segment.to_string(), e.clone());
        s.history.push((rev, Change::Put(segment.to_string(), e)));
        drop(s);
        self.changed.notify_waiters();
    }

    pub fn delete_raw(&self, segment: &str) {
        let mut s = self.lock();
        if s.kvs.remove(segment).is_some() {
            s.revision += 1;
            let rev = s.revision;
            s.history.push((rev, Change::Delete(segment.to_string())));
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Let an etcd lease run out: its keys disappear.
    pub fn expire(&self, lease_id: i64) {
        let keys: Vec<String> = {
            let mut s = self.lock();
            s.leases.remove(&lease_id);
            s.kvs
                .iter()
                .filter(|(_, e)| e.lease_id == lease_id)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for k in keys {
            self.delete_raw(&k);
        }
    }

    pub fn compact(&self) {
        let mut s = self.lock();
        s.compacted = s.revision;
        let keep = s.compacted;
        s.history.retain(|(r, _)| *r > keep);
    }

    pub fn break_watches(&self) {
        self.lock().generation += 1;
        self.changed.notify_waiters();
    }

    /// While set, every request fails, as with etcd down.
    pub fn set_unavailable(&self, down: bool) {
        self.lock().unavailable = down;
        if down {
            self.break_watches();
        }
    }

    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    fn to_lease(segment: &str, e: &Entry) -> Result<Lease, super::lease::LeaseError> {
        Lease::from_kv(
            &format!("subnets/{segment}"),
            segment,
            &e.value,
            e.lease_id,
            e.mod_revision,
        )
    }

    fn grant(s: &mut State, ttl: Option<Duration>) -> i64 {
        match ttl {
            None => 0,
            Some(ttl) => {
                s.next_lease += 1;
                let id = s.next_lease;
                s.leases.insert(id, ttl);
                id
            }
        }
    }

    fn write(&self, segment: String, attrs: &LeaseAttrs, lease_id: i64, ttl: Option<Duration>) -> Lease {
        let mut s = self.lock();
        s.revision += 1;
        let e = Entry {
            value: attrs.to_json().into_bytes(),
            lease_id,
            mod_revision: s.revision,
        };
        let rev = s.revision;
        s.kvs.insert(segment.clone(), e.clone());
        s.history.push((rev, Change::Put(segment.clone(), e.clone())));
        drop(s);
        self.changed.notify_waiters();
        let mut l = Self::to_lease(&segment, &e).expect("we wrote a valid lease");
        l.expires = ttl.map(|t| SystemTime::now() + t);
        l
    }
}

impl Registry for MemRegistry {
    type Watch = MemWatch;

    fn config_key(&self) -> String {
        "memory/config".into()
    }

    async fn get_config(&self) -> Result<Option<String>, RegistryError> {
        self.check("get", "config")?;
        Ok(self.lock().config.clone())
    }

    async fn put_config(&self, json: &str) -> Result<(), RegistryError> {
        self.check("put", "config")?;
        self.lock().config = Some(json.to_string());
        Ok(())
    }

    async fn list(&self) -> Result<Listing, RegistryError> {
        self.check("list", "subnets/")?;
        let s = self.lock();
        let mut listing = Listing {
            revision: s.revision,
            ..Default::default()
        };
        for (k, e) in &s.kvs {
            match Self::to_lease(k, e) {
                Ok(l) => listing.leases.push(l),
                Err(err) => listing.skipped.push(err),
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
        let segment = key.to_string();
        self.check("create", &segment)?;
        let id = {
            let mut s = self.lock();
            if s.kvs.contains_key(&segment) {
                return Ok(None);
            }
            Self::grant(&mut s, ttl)
        };
        Ok(Some(self.write(segment, attrs, id, ttl)))
    }

    async fn update(
        &self,
        existing: &Lease,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> Result<Option<Lease>, RegistryError> {
        let segment = existing.key.to_string();
        self.check("update", &segment)?;
        let id = {
            let mut s = self.lock();
            match s.kvs.get(&segment) {
                Some(e) if e.mod_revision == existing.mod_revision => {}
                _ => return Ok(None),
            }
            Self::grant(&mut s, ttl)
        };
        Ok(Some(self.write(segment, attrs, id, ttl)))
    }

    async fn delete(&self, existing: &Lease) -> Result<bool, RegistryError> {
        let segment = existing.key.to_string();
        self.check("delete", &segment)?;
        let same = matches!(self.lock().kvs.get(&segment), Some(e) if e.mod_revision == existing.mod_revision);
        if same {
            self.delete_raw(&segment);
        }
        Ok(same)
    }

    async fn keep_alive(&self, lease_id: i64) -> Result<Option<SystemTime>, RegistryError> {
        self.check("keepalive", &lease_id.to_string())?;
        Ok(self.lock().leases.get(&lease_id).map(|ttl| SystemTime::now() + *ttl))
    }

    async fn time_to_live(&self, lease_id: i64) -> Result<Option<Duration>, RegistryError> {
        self.check("timetolive", &lease_id.to_string())?;
        Ok(self.lock().leases.get(&lease_id).copied())
    }

    async fn watch(&self, from_revision: i64) -> Result<MemWatch, RegistryError> {
        self.check("watch", "subnets/")?;
        let generation = self.lock().generation;
        Ok(MemWatch {
            reg: self.clone(),
            next: from_revision,
            generation,
        })
    }
}

pub struct MemWatch {
    reg: MemRegistry,
    next: i64,
    generation: u64,
}

impl LeaseWatch for MemWatch {
    async fn next(&mut self) -> Result<WatchBatch, WatchError> {
        loop {
            let notified = self.reg.changed.notified();
            {
                let s = self.reg.lock();
                if s.generation != self.generation {
                    return Err(WatchError::Broken {
                        target: TARGET.into(),
                        reason: "connection lost".into(),
                    });
                }
                if self.next <= s.compacted {
                    return Err(WatchError::Compacted {
                        requested: self.next,
                        compacted: s.compacted,
                    });
                }
                let mut batch = WatchBatch::default();
                for (rev, change) in s.history.iter().filter(|(r, _)| *r >= self.next) {
                    batch.revision = *rev;
                    match change {
                        Change::Put(k, e) => match MemRegistry::to_lease(k, e) {
                            Ok(l) => batch.events.push(RegistryEvent::Put(l)),
                            Err(err) => batch.skipped.push(err),
                        },
                        Change::Delete(k) => match SubnetKey::parse(k) {
                            Ok(key) => batch.events.push(RegistryEvent::Deleted(key)),
                            Err(err) => batch.skipped.push(err),
                        },
                    }
                }
                if batch.revision != 0 {
                    self.next = batch.revision + 1;
                    return Ok(batch);
                }
            }
            notified.await;
        }
    }
}
