//! The small interface the lease manager needs from a store (flannel's `Registry`), with the
//! etcd implementation in [`super::etcd`]; an in-memory one (`mem`, in test builds only) serves
//! the manager's unit tests.

use std::{future::Future, time::Duration, time::SystemTime};

use super::lease::{Lease, LeaseAttrs, LeaseError, RegistryEvent, SubnetKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A request failed; `target` names the endpoint(s) and key so the user knows where to look.
    #[error("{op} {key} on {target} failed: {reason}")]
    Request {
        op: &'static str,
        key: String,
        target: String,
        reason: String,
    },
    /// Every endpoint was tried and none could serve; `summary` says what that means (no
    /// leader, nothing answering) and `answers` what each endpoint answered, in the order tried.
    #[error("{op} {key}: {summary}; {answers}")]
    NoEndpointServed {
        op: &'static str,
        key: String,
        summary: String,
        answers: String,
    },
    #[error("{op} {key} on {target} timed out after {after:?}")]
    Timeout {
        op: &'static str,
        key: String,
        target: String,
        after: Duration,
    },
}

/// Why a watch stopped; either way the caller re-lists and resumes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("watch from revision {requested} is behind the compaction at revision {compacted}")]
    Compacted { requested: i64, compacted: i64 },
    #[error("watch on {target} broke: {reason}")]
    Broken { target: String, reason: String },
}

/// All leases under the subnets prefix at one revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub leases: Vec<Lease>,
    /// Keys that were skipped because someone wrote something that is not a lease.
    pub skipped: Vec<LeaseError>,
    pub revision: i64,
}

/// Changes seen by a watch, up to and including `revision`.
#[derive(Debug, Clone, Default)]
pub struct WatchBatch {
    pub events: Vec<RegistryEvent>,
    pub skipped: Vec<LeaseError>,
    pub revision: i64,
}

pub trait LeaseWatch: Send {
    fn next(&mut self) -> impl Future<Output = Result<WatchBatch, WatchError>> + Send;
}

pub trait Registry: Send + Sync {
    type Watch: LeaseWatch;

    /// Where the config lives, for messages (`/coreos.com/network/config`).
    fn config_key(&self) -> String;

    /// The raw config JSON, or `None` while the key does not exist.
    fn get_config(&self) -> impl Future<Output = Result<Option<String>, RegistryError>> + Send;

    fn put_config(&self, json: &str) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Every lease; malformed entries are in `skipped`, never an error.
    fn list(&self) -> impl Future<Output = Result<Listing, RegistryError>> + Send;

    /// Create the key only if it does not exist (`None` if it does). `ttl: None` makes a
    /// reservation (no etcd lease).
    fn create(
        &self,
        key: SubnetKey,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Option<Lease>, RegistryError>> + Send;

    /// Rewrite a lease we listed, only if nobody changed it since (`None` if someone did).
    fn update(
        &self,
        existing: &Lease,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Option<Lease>, RegistryError>> + Send;

    /// Delete a lease we listed, only if unchanged since; `false` if it changed.
    fn delete(&self, existing: &Lease) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// Renew an etcd lease; `None` if it no longer exists (expired or revoked).
    fn keep_alive(&self, lease_id: i64) -> impl Future<Output = Result<Option<SystemTime>, RegistryError>> + Send;

    /// Remaining time of an etcd lease; `None` if it no longer exists.
    fn time_to_live(&self, lease_id: i64) -> impl Future<Output = Result<Option<Duration>, RegistryError>> + Send;

    /// Watch every lease key from `from_revision` on (inclusive).
    fn watch(&self, from_revision: i64) -> impl Future<Output = Result<Self::Watch, RegistryError>> + Send;
}
