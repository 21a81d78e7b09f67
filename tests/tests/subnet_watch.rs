//! Peer events from a real etcd: add/change/remove, malformed values, our own lease deleted,
//! and no event missed or repeated across a compaction, a cut connection or an etcd restart.

use std::{net::Ipv4Addr, time::Duration};

use overlay::subnet::{
    Lease, LeaseAttrs, LeaseBackend, LeaseEvent, LeaseManager, ManagerError, ManagerOptions, NetworkConfig, Registry,
    VxlanData,
    etcd::EtcdRegistry,
    registry::{LeaseWatch, WatchError},
};
use overlay_tests::etcd::{Etcd, Relay, registry};
use tokio::{sync::mpsc, task::JoinHandle};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

/// A peer's lease value, literally as flannel's reservations.md shows one.
fn flannel_value(ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

fn opts() -> ManagerOptions {
    ManagerOptions {
        resync_backoff_min: Duration::from_millis(100),
        resync_backoff_max: Duration::from_millis(400),
        // Our own subnet must not be one the tests write as another host's.
        previous_subnet: Some("10.244.1.0/24".parse().unwrap()),
        ..Default::default()
    }
}

struct Agent {
    rx: mpsc::Receiver<LeaseEvent>,
    run: JoinHandle<Result<(), ManagerError>>,
    own: Lease,
}

async fn start_agent(reg: EtcdRegistry, opts: ManagerOptions) -> Agent {
    reg.put_config(CONFIG).await.unwrap();
    let cfg = NetworkConfig::parse(CONFIG).unwrap();
    let m = LeaseManager::new(reg, opts).unwrap();
    let attrs = LeaseAttrs::new(
        Ipv4Addr::new(192, 168, 9, 1),
        LeaseBackend::Vxlan(VxlanData {
            vni: 1,
            vtep_mac: "aa:00:00:00:00:01".parse().expect("test MAC"),
        }),
    );
    let own = m.acquire(&cfg, &attrs).await.unwrap();
    let (tx, rx) = mpsc::channel(256);
    let run = tokio::spawn({
        let own = own.clone();
        async move { m.run(&cfg, own, tx).await }
    });
    Agent { rx, run, own }
}

async fn put(reg: &EtcdRegistry, segment: &str, value: &str) {
    let mut c = reg.client().clone();
    c.put(format!("{PREFIX}/subnets/{segment}"), value, None).await.unwrap();
}

async fn delete(reg: &EtcdRegistry, segment: &str) {
    let mut c = reg.client().clone();
    c.delete(format!("{PREFIX}/subnets/{segment}"), None).await.unwrap();
}

impl Agent {
    async fn next(&mut self) -> LeaseEvent {
        tokio::time::timeout(Duration::from_secs(15), self.rx.recv())
            .await
            .expect("an event in time")
            .expect("agent running")
    }

    async fn next_n(&mut self, n: usize) -> Vec<String> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(describe(&self.next().await));
        }
        v.sort();
        v
    }

    /// Nothing more arrives within `d`.
    async fn quiet(&mut self, d: Duration) {
        if let Ok(Some(e)) = tokio::time::timeout(d, self.rx.recv()).await {
            panic!("unexpected extra event {}", describe(&e));
        }
    }
}

fn describe(e: &LeaseEvent) -> String {
    let (kind, l) = match e {
        LeaseEvent::Added(l) => ("added", l),
        LeaseEvent::Changed(l) => ("changed", l),
        LeaseEvent::Removed(l) => ("removed", l),
        LeaseEvent::Reacquired(l) => ("reacquired", l),
    };
    format!("{kind} {} {}", l.key, l.attrs.public_ip)
}

#[tokio::test]
async fn watch_reports_added_changed_removed() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    put(
        &reg,
        "10.244.50.0-24",
        &flannel_value("192.168.9.50", "c6:d2:32:6f:8f:50"),
    )
    .await;
    let mut a = start_agent(reg.clone(), opts()).await;
    assert_eq!(a.next().await.clone(), a_added(&reg, "10.244.50.0-24").await);
    put(
        &reg,
        "10.244.51.0-24",
        &flannel_value("192.168.9.51", "c6:d2:32:6f:8f:51"),
    )
    .await;
    let e = a.next().await;
    assert_eq!(describe(&e), "added 10.244.51.0-24 192.168.9.51");
    let LeaseEvent::Added(l) = e else { unreachable!() };
    assert_eq!(
        l.attrs.backend.data(),
        Some(serde_json::json!({"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:51"}))
    );
    put(
        &reg,
        "10.244.51.0-24",
        &flannel_value("192.168.9.51", "c6:d2:32:6f:8f:ff"),
    )
    .await;
    assert_eq!(describe(&a.next().await), "changed 10.244.51.0-24 192.168.9.51");
    // The same value again (a flannel host renewing by re-putting): no event.
    put(
        &reg,
        "10.244.51.0-24",
        &flannel_value("192.168.9.51", "c6:d2:32:6f:8f:ff"),
    )
    .await;
    delete(&reg, "10.244.50.0-24").await;
    assert_eq!(describe(&a.next().await), "removed 10.244.50.0-24 192.168.9.50");
    a.quiet(Duration::from_millis(500)).await;
    assert!(!a.run.is_finished());
}

async fn a_added(reg: &EtcdRegistry, segment: &str) -> LeaseEvent {
    let listing = reg.list().await.unwrap();
    LeaseEvent::Added(
        listing
            .leases
            .into_iter()
            .find(|l| l.key.to_string() == segment)
            .unwrap(),
    )
}

#[tokio::test]
async fn malformed_values_are_skipped_and_named() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let mut a = start_agent(reg.clone(), opts()).await;
    put(&reg, "10.244.60.0-24", "{not json").await;
    put(
        &reg,
        "not-a-subnet",
        &flannel_value("192.168.9.60", "aa:aa:aa:aa:aa:60"),
    )
    .await;
    put(
        &reg,
        "10.99.60.0-24",
        &flannel_value("192.168.9.61", "aa:aa:aa:aa:aa:61"),
    )
    .await;
    put(
        &reg,
        "10.244.61.0-24",
        &flannel_value("192.168.9.62", "aa:aa:aa:aa:aa:62"),
    )
    .await;
    assert_eq!(
        describe(&a.next().await),
        "added 10.244.61.0-24 192.168.9.62",
        "the bad ones never became events"
    );
    a.quiet(Duration::from_millis(300)).await;
    assert!(!a.run.is_finished(), "bad values never stop the agent");
    let listing = reg.list().await.unwrap();
    let skipped: Vec<String> = listing.skipped.iter().map(|e| e.to_string()).collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped
            .iter()
            .any(|s| s.contains("/subnets/10.244.60.0-24") && s.contains("not flannel lease JSON")),
        "{skipped:?}"
    );
    assert!(
        skipped.iter().any(|s| s.contains("/subnets/not-a-subnet")),
        "{skipped:?}"
    );
}

#[tokio::test]
async fn watch_from_a_compacted_revision_reports_compaction() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let start = reg.list().await.unwrap().revision;
    put(
        &reg,
        "10.244.70.0-24",
        &flannel_value("192.168.9.70", "aa:aa:aa:aa:aa:70"),
    )
    .await;
    put(
        &reg,
        "10.244.71.0-24",
        &flannel_value("192.168.9.71", "aa:aa:aa:aa:aa:71"),
    )
    .await;
    let now = reg.list().await.unwrap().revision;
    reg.client().clone().compact(now, None).await.unwrap();
    let mut w = reg.watch(start + 1).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, WatchError::Compacted { compacted, .. } if compacted == now),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_after_cut_connection_and_compaction_emits_only_the_difference() {
    let etcd = Etcd::start();
    let direct = registry(&etcd.endpoint(), PREFIX).await;
    let relay = Relay::start(etcd.port()).await;
    put(
        &direct,
        "10.244.80.0-24",
        &flannel_value("192.168.9.80", "aa:aa:aa:aa:aa:80"),
    )
    .await;
    put(
        &direct,
        "10.244.81.0-24",
        &flannel_value("192.168.9.81", "aa:aa:aa:aa:aa:81"),
    )
    .await;
    let mut a = start_agent(registry(&relay.endpoint(), PREFIX).await, opts()).await;
    assert_eq!(
        a.next_n(2).await,
        ["added 10.244.80.0-24 192.168.9.80", "added 10.244.81.0-24 192.168.9.81"]
    );

    relay.cut();
    // While the agent cannot see etcd: one peer leaves, one changes, one arrives, and the
    // history is compacted so the watch cannot simply resume.
    delete(&direct, "10.244.80.0-24").await;
    put(
        &direct,
        "10.244.81.0-24",
        &flannel_value("192.168.9.81", "aa:aa:aa:aa:aa:ff"),
    )
    .await;
    put(
        &direct,
        "10.244.82.0-24",
        &flannel_value("192.168.9.82", "aa:aa:aa:aa:aa:82"),
    )
    .await;
    let rev = direct.list().await.unwrap().revision;
    direct.client().clone().compact(rev, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    relay.heal();

    assert_eq!(
        a.next_n(3).await,
        [
            "added 10.244.82.0-24 192.168.9.82", "changed 10.244.81.0-24 192.168.9.81",
            "removed 10.244.80.0-24 192.168.9.80",
        ]
    );
    a.quiet(Duration::from_millis(800)).await;
    // And the watch works again afterwards.
    put(
        &direct,
        "10.244.83.0-24",
        &flannel_value("192.168.9.83", "aa:aa:aa:aa:aa:83"),
    )
    .await;
    assert_eq!(describe(&a.next().await), "added 10.244.83.0-24 192.168.9.83");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_mid_watch_misses_and_repeats_nothing() {
    let mut etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    put(
        &reg,
        "10.244.90.0-24",
        &flannel_value("192.168.9.90", "aa:aa:aa:aa:aa:90"),
    )
    .await;
    let mut a = start_agent(reg.clone(), opts()).await;
    assert_eq!(describe(&a.next().await), "added 10.244.90.0-24 192.168.9.90");
    tokio::task::block_in_place(|| {
        etcd.stop();
        std::thread::sleep(Duration::from_millis(500));
        etcd.restart();
    });
    put(
        &reg,
        "10.244.91.0-24",
        &flannel_value("192.168.9.91", "aa:aa:aa:aa:aa:91"),
    )
    .await;
    delete(&reg, "10.244.90.0-24").await;
    assert_eq!(
        a.next_n(2).await,
        [
            "added 10.244.91.0-24 192.168.9.91", "removed 10.244.90.0-24 192.168.9.90"
        ]
    );
    a.quiet(Duration::from_secs(1)).await;
    assert!(!a.run.is_finished());
}

#[tokio::test]
async fn own_lease_deleted_from_outside_stops_or_reacquires() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let a = start_agent(reg.clone(), opts()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    delete(&reg, &a.own.key.to_string()).await;
    let err = tokio::time::timeout(Duration::from_secs(5), a.run)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, ManagerError::LeaseLost { key, .. } if key == a.own.key),
        "{err}"
    );
    assert!(
        err.to_string().contains(&a.own.key.to_string()) && err.to_string().contains("deleted"),
        "{err}"
    );

    let mut b = start_agent(
        reg.clone(),
        ManagerOptions {
            reacquire_on_loss: true,
            ..opts()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old_id = b.own.lease_id;
    reg.client().clone().lease_revoke(old_id).await.unwrap();
    let e = b.next().await;
    let LeaseEvent::Reacquired(new) = e else {
        panic!("expected reacquired, got {}", describe(&e))
    };
    assert_ne!(new.lease_id, old_id);
    assert!(
        reg.list()
            .await
            .unwrap()
            .leases
            .iter()
            .any(|l| l.key == new.key && l.lease_id == new.lease_id)
    );
    assert!(!b.run.is_finished());
}
