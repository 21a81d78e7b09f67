//! The peers the agent wants in the backend, and keeping the backend equal to them.
//!
//! The desired set is held once, in the shared [`Status`](super::health::Status) that the HTTP
//! endpoints read: each lease event updates it and is applied at once; whatever the backend
//! refused stays marked unapplied and is retried every tick until the backend matches (flannel
//! logs a failed update and forgets it).
use std::collections::BTreeSet;

use super::health::SharedStatus;
use crate::{
    backend::{Backend, Peer},
    subnet::{BackendKind, Lease, SubnetKey},
};

pub struct PeerSync {
    kind: BackendKind,
    status: SharedStatus,
    /// Something failed or changed outside the event path: reconcile on the next tick.
    dirty: bool,
}

impl PeerSync {
    /// Peers are leases of `kind`, our backend's. Starts dirty: a datapath adopted from a
    /// previous run may hold peers that are gone.
    pub fn new(kind: BackendKind, status: SharedStatus) -> Self {
        PeerSync {
            kind,
            status,
            dirty: true,
        }
    }

    /// The backend was programmed anew (our lease was taken again): check every peer.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// A lease of another host appeared or changed.
    pub fn lease_put(&mut self, backend: &mut dyn Backend, lease: &Lease) {
        let subnet = lease.key;
        let peer = match Peer::from_lease(lease, self.kind) {
            Ok(peer) => peer,
            Err(why) => {
                tracing::warn!(%subnet, "ignoring lease: {why}");
                let mut s = self.status.lock().expect("status");
                if s.peers.remove(&subnet).is_some() {
                    s.unapplied.remove(&subnet);
                    self.dirty = true;
                }
                return;
            }
        };
        let applied = backend.set_peer(&peer);
        let mut s = self.status.lock().expect("status");
        s.peers.insert(subnet, peer);
        match applied {
            Ok(()) => {
                s.unapplied.remove(&subnet);
            }
            Err(e) => {
                tracing::warn!("adding peer {subnet} failed (will retry): {e}");
                s.unapplied.insert(subnet);
                self.dirty = true;
            }
        }
    }

    /// A lease of another host went.
    pub fn lease_removed(&mut self, backend: &mut dyn Backend, subnet: SubnetKey) {
        {
            let mut s = self.status.lock().expect("status");
            s.peers.remove(&subnet);
            s.unapplied.remove(&subnet);
        }
        if let Err(e) = backend.remove_peer(subnet) {
            tracing::warn!("removing peer {subnet} failed (will retry): {e}");
            self.dirty = true;
        }
    }

    /// If anything is outstanding, make the backend's peers equal to the desired ones.
    pub fn reconcile_if_dirty(&mut self, backend: &mut dyn Backend) {
        if !self.dirty {
            return;
        }
        // A copy, so the HTTP endpoints are not held up while the backend works.
        let desired = self.status.lock().expect("status").peers.clone();
        let mut clean = true;
        for subnet in backend.peers() {
            if !desired.contains_key(&subnet)
                && let Err(e) = backend.remove_peer(subnet)
            {
                tracing::warn!("removing stale peer {subnet} failed: {e}");
                clean = false;
            }
        }
        let mut unapplied = BTreeSet::new();
        for peer in desired.values() {
            if let Err(e) = backend.set_peer(peer) {
                tracing::warn!("adding peer {} failed: {e}", peer.key());
                unapplied.insert(peer.key());
                clean = false;
            }
        }
        if clean {
            tracing::debug!(peers = desired.len(), "backend matches etcd");
        }
        self.status.lock().expect("status").unapplied = unapplied;
        self.dirty = !clean;
    }
}
