//! Acquire, renew, expire, reuse and reservations against a real etcd, with flannel's keys.

use std::{collections::HashSet, net::Ipv4Addr, time::Duration};

use overlay::subnet::{
    LeaseAttrs, LeaseBackend, LeaseManager, ManagerError, ManagerOptions, NetworkConfig, Registry, VxlanData,
    etcd::EtcdRegistry,
    file::{read_previous_subnets, write_subnet_file},
};
use overlay_tests::etcd::{Etcd, registry};
use serde_json::json;
use tokio::sync::mpsc;

const PREFIX: &str = "/coreos.com/network";

fn vxlan_attrs(host: u8, mac: &str) -> LeaseAttrs {
    LeaseAttrs::new(
        Ipv4Addr::new(192, 168, 50, host),
        LeaseBackend::Vxlan(VxlanData {
            vni: 1,
            vtep_mac: mac.parse().expect("test MAC"),
        }),
    )
}

async fn with_config(reg: &EtcdRegistry, json: &str) -> NetworkConfig {
    overlay::cli::config::set(reg, json).await.expect("store config")
}

fn short(ttl: u64, margin: u64) -> ManagerOptions {
    ManagerOptions {
        lease_ttl: Duration::from_secs(ttl),
        renew_margin: Duration::from_secs(margin),
        renew_retry: Duration::from_millis(200),
        resync_backoff_min: Duration::from_millis(100),
        resync_backoff_max: Duration::from_millis(500),
        ..Default::default()
    }
}

async fn raw_get(reg: &EtcdRegistry, key: &str) -> Option<(String, i64)> {
    let mut c = reg.client().clone();
    let r = c.get(key, None).await.unwrap();
    r.kvs()
        .first()
        .map(|kv| (String::from_utf8(kv.value().to_vec()).unwrap(), kv.lease()))
}

#[tokio::test]
async fn acquired_lease_has_flannels_key_json_and_24h_ttl() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let cfg = with_config(
        &reg,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#,
    )
    .await;
    let m = LeaseManager::new(reg.clone(), ManagerOptions::default()).unwrap();
    let lease = m.acquire(&cfg, &vxlan_attrs(1, "c6:d2:32:6f:8f:44")).await.unwrap();

    let key = format!("{PREFIX}/subnets/{}-24", lease.subnet().network());
    let (value, lease_id) = raw_get(&reg, &key).await.expect("lease key as flannel names it");
    assert_eq!(
        value,
        r#"{"PublicIP":"192.168.50.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
    );
    assert_ne!(lease_id, 0);
    let mut c = reg.client().clone();
    let ttl = c.lease_time_to_live(lease_id, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 24 * 3600);
    assert!(ttl.ttl() > 24 * 3600 - 60, "remaining {}", ttl.ttl());
    let octet = lease.subnet().network().octets()[2];
    assert!(
        (1..=255).contains(&octet),
        "SubnetMin skips the first /24: {}",
        lease.subnet()
    );
}

#[tokio::test]
async fn renewal_keeps_the_lease_and_it_expires_without_renewal() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let cfg = with_config(&reg, r#"{"Network":"10.1.0.0/16"}"#).await;
    let m = LeaseManager::new(reg.clone(), short(3, 2)).unwrap();
    let lease = m.acquire(&cfg, &vxlan_attrs(1, "aa:aa:aa:aa:aa:01")).await.unwrap();
    let key = format!("{PREFIX}/subnets/{}", lease.key);
    let (tx, _rx) = mpsc::channel(64);
    let run = tokio::spawn({
        let cfg = cfg.clone();
        let lease = lease.clone();
        async move { m.run(&cfg, lease, tx).await }
    });
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        raw_get(&reg, &key).await.is_some(),
        "renewed lease outlives its 3 s TTL"
    );
    run.abort();
    let _ = run.await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(raw_get(&reg, &key).await.is_none(), "without renewal the lease expires");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_is_retried_while_etcd_is_down() {
    let mut etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let cfg = with_config(&reg, r#"{"Network":"10.1.0.0/16"}"#).await;
    let m = LeaseManager::new(reg.clone(), short(4, 3)).unwrap();
    let lease = m.acquire(&cfg, &vxlan_attrs(1, "aa:aa:aa:aa:aa:01")).await.unwrap();
    let key = format!("{PREFIX}/subnets/{}", lease.key);
    let (tx, _rx) = mpsc::channel(64);
    let run = tokio::spawn({
        let cfg = cfg.clone();
        async move { m.run(&cfg, lease, tx).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| {
        etcd.stop();
        std::thread::sleep(Duration::from_secs(2));
        etcd.restart();
    });
    // etcd extends leases when it restarts; well past that extension the key must still be
    // there, which only renewals after the outage can explain.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(!run.is_finished(), "the manager keeps running through the outage");
    assert!(
        raw_get(&reg, &key).await.is_some(),
        "renewal resumed after etcd came back"
    );
    run.abort();
}

#[tokio::test]
async fn restart_reuses_the_lease_of_our_public_ip() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let cfg = with_config(&reg, r#"{"Network":"10.2.0.0/16","Backend":{"Type":"vxlan"}}"#).await;
    let first = LeaseManager::new(reg.clone(), ManagerOptions::default()).unwrap();
    let a = first.acquire(&cfg, &vxlan_attrs(7, "aa:00:00:00:00:01")).await.unwrap();
    drop(first);
    // A new process: new connection, new VtepMAC.
    let reg2 = registry(&etcd.endpoint(), PREFIX).await;
    let second = LeaseManager::new(reg2.clone(), ManagerOptions::default()).unwrap();
    let b = second
        .acquire(&cfg, &vxlan_attrs(7, "aa:00:00:00:00:02"))
        .await
        .unwrap();
    assert_eq!(a.key, b.key);
    let listing = reg2.list().await.unwrap();
    assert_eq!(listing.leases.len(), 1, "no second lease for the same host");
    assert_eq!(
        listing.leases[0].attrs.backend.data(),
        Some(json!({"VNI":1,"VtepMAC":"aa:00:00:00:00:02"}))
    );
}

#[tokio::test]
async fn restart_reuses_the_subnet_in_the_subnet_file() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("subnet.env");
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let cfg = with_config(&reg, r#"{"Network":"10.3.0.0/16"}"#).await;
    let m = LeaseManager::new(reg.clone(), short(2, 1)).unwrap();
    let a = m.acquire(&cfg, &vxlan_attrs(1, "aa:00:00:00:00:01")).await.unwrap();
    write_subnet_file(&file, &cfg, &a.key, 1450, false).unwrap();
    // The host was away longer than the TTL and its public IP changed: only the file remembers.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(reg.list().await.unwrap().leases.is_empty(), "old lease expired");
    let (prev, prev6) = read_previous_subnets(&file);
    let opts = ManagerOptions {
        previous_subnet: prev,
        previous_ipv6_subnet: prev6,
        ..Default::default()
    };
    let b = LeaseManager::new(reg.clone(), opts)
        .unwrap()
        .acquire(&cfg, &vxlan_attrs(99, "aa:00:00:00:00:02"))
        .await
        .unwrap();
    assert_eq!(b.key, a.key);
}

#[tokio::test]
async fn reservations_are_reused_kept_without_ttl_and_never_taken() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    // /28: three /30 subnets (.4, .8, .12). Reserve .8 for host 5, as reservations.md does
    // (a put without a lease).
    let cfg = with_config(&reg, r#"{"Network":"10.9.0.0/28"}"#).await;
    let key = format!("{PREFIX}/subnets/10.9.0.8-30");
    let mut c = reg.client().clone();
    c.put(key.as_str(), vxlan_attrs(5, "aa:00:00:00:00:05").to_json(), None)
        .await
        .unwrap();

    let m = LeaseManager::new(reg.clone(), short(2, 1)).unwrap();
    let mut taken = HashSet::new();
    for host in [1, 2] {
        taken.insert(
            m.acquire(&cfg, &vxlan_attrs(host, "aa:00:00:00:00:01"))
                .await
                .unwrap()
                .key
                .to_string(),
        );
    }
    assert!(!taken.contains("10.9.0.8-30"), "{taken:?}");
    let err = m.acquire(&cfg, &vxlan_attrs(3, "aa:00:00:00:00:03")).await.unwrap_err();
    assert!(matches!(err, ManagerError::NetworkFull { .. }), "{err}");

    let mine = m.acquire(&cfg, &vxlan_attrs(5, "aa:00:00:00:00:55")).await.unwrap();
    assert_eq!(mine.key.to_string(), "10.9.0.8-30");
    assert!(mine.is_reservation());
    // Past the (short) lease TTL the reservation is still there, still without a lease,
    // with the attributes of its host's new start.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (value, lease) = raw_get(&reg, &key).await.expect("reservation never expires");
    assert_eq!(lease, 0);
    assert!(value.contains("aa:00:00:00:00:55"), "{value}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_at_once_get_distinct_subnets() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    // 62 usable /24s for 50 hosts: heavy contention for the same subnets.
    let cfg = with_config(&reg, r#"{"Network":"10.20.0.0/18"}"#).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for host in 1..=50u8 {
        let (endpoint, cfg, barrier) = (etcd.endpoint(), cfg.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let reg = registry(&endpoint, PREFIX).await;
            let m = LeaseManager::new(reg, ManagerOptions::default()).unwrap();
            barrier.wait().await;
            m.acquire(&cfg, &vxlan_attrs(host, "aa:00:00:00:00:01")).await
        }));
    }
    let mut keys = HashSet::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let lease = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("agent {} failed: {e}", i + 1));
        assert!(keys.insert(lease.key), "duplicate subnet {}", lease.key);
    }
    assert_eq!(keys.len(), 50);
    let listing = reg.list().await.unwrap();
    assert_eq!(
        listing.leases.len(),
        50,
        "every agent's lease is in etcd, no stray ones"
    );
    let ips: HashSet<Ipv4Addr> = listing.leases.iter().map(|l| l.attrs.public_ip).collect();
    assert_eq!(ips.len(), 50);
}

#[tokio::test]
async fn full_network_is_a_clear_error() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let cfg = with_config(&reg, r#"{"Network":"10.30.0.0/22","SubnetMin":"10.30.2.0"}"#).await;
    let m = LeaseManager::new(reg, ManagerOptions::default()).unwrap();
    m.acquire(&cfg, &vxlan_attrs(1, "aa:00:00:00:00:01")).await.unwrap();
    m.acquire(&cfg, &vxlan_attrs(2, "aa:00:00:00:00:02")).await.unwrap();
    let err = m.acquire(&cfg, &vxlan_attrs(3, "aa:00:00:00:00:03")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "no free /24 subnet left between 10.30.2.0 and 10.30.3.0 (2 leases exist)"
    );
}

#[tokio::test]
async fn agent_waits_for_the_config_and_config_cli_validates() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), "/test/waits").await;
    let opts = ManagerOptions {
        config_retry: Duration::from_millis(100),
        ..Default::default()
    };
    let m = LeaseManager::new(reg.clone(), opts).unwrap();
    let waiting = tokio::spawn(async move { m.wait_for_config().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "no config yet: still waiting");

    let err = overlay::cli::config::set(&reg, r#"{"Network":"10.0.0.0/16","SubnetLen":12}"#)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("SubnetLen"), "{err:#}");
    assert_eq!(reg.get_config().await.unwrap(), None, "invalid config not stored");
    // Raw JSON as an admin would type it with etcdctl.
    let typed = r#"{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", "VNI": 4}}"#;
    overlay::cli::config::set(&reg, typed).await.unwrap();
    let cfg = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cfg.ipv4.unwrap().subnet_len, 24);
    let shown = overlay::cli::config::get(&reg, false).await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&shown).unwrap(),
        serde_json::from_str::<serde_json::Value>(typed).unwrap()
    );
    let effective = overlay::cli::config::get(&reg, true).await.unwrap();
    assert!(effective.contains("\"SubnetMin\": \"10.5.1.0\""), "{effective}");
}

#[tokio::test]
async fn leases_listing_shows_hosts_backend_data_and_ttl() {
    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let cfg = with_config(&reg, r#"{"Network":"10.6.0.0/16"}"#).await;
    // The other host's lease goes in first, so our random subnet can never be its key.
    let mut c = reg.client().clone();
    c.put(
        format!("{PREFIX}/subnets/10.6.200.0-24"),
        r#"{"PublicIP":"192.168.50.2","PublicIPv6":null}"#,
        None,
    )
    .await
    .unwrap();
    let m = LeaseManager::new(reg.clone(), ManagerOptions::default()).unwrap();
    let l = m.acquire(&cfg, &vxlan_attrs(1, "aa:bb:cc:dd:ee:01")).await.unwrap();
    c.put(format!("{PREFIX}/subnets/bogus"), "x", None).await.unwrap();
    let rows = overlay::cli::leases::list(&reg).await.unwrap();
    assert_eq!(rows.len(), 2, "the bogus key is skipped");
    let table = overlay::cli::leases::render_table(&rows);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("SUBNET"));
    let mine = lines
        .iter()
        .find(|r| r.starts_with(&l.subnet().to_string()))
        .expect("our row");
    assert!(
        mine.contains("192.168.50.1") && mine.contains("vxlan") && mine.contains("aa:bb:cc:dd:ee:01"),
        "{mine}"
    );
    assert!(mine.contains("23h59m") || mine.contains("24h00m"), "{mine}");
    let resv = lines.iter().find(|r| r.starts_with("10.6.200.0/24")).unwrap();
    assert!(resv.contains("reservation") && resv.contains("udp"), "{resv}");
}

/// Leases written by hand as flannel writes them (dual stack, and IPv6-only where flannel has no
/// IPv4 device and writes no BackendData) are read with their IPv6 side, ours are written in the
/// same shape, and IPv6 subnets are allocated within IPv6SubnetMin/Max around flannel's.
#[tokio::test]
async fn flannel_dual_stack_and_ipv6_only_leases_are_read_and_ours_written_alike() {
    use overlay::backend::Peer;
    use overlay::subnet::BackendKind;

    let etcd = Etcd::start();
    let reg = registry(&etcd.endpoint(), PREFIX).await;
    let cfg = with_config(
        &reg,
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/56",
            "IPv6SubnetMin":"fd00:244:0:7::","IPv6SubnetMax":"fd00:244:0:8::","Backend":{"Type":"vxlan"}}"#,
    )
    .await;
    let flannel_value = r#"{"PublicIP":"192.168.50.7","PublicIPv6":"fd01::7","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:07"},"BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:06:07"}}"#;
    let mut c = reg.client().clone();
    c.put(
        format!("{PREFIX}/subnets/10.244.7.0-24&fd00:244:0:7::-64"),
        flannel_value,
        None,
    )
    .await
    .unwrap();

    let m = LeaseManager::new(reg.clone(), short(30, 10)).unwrap();
    let ours = vxlan_attrs(1, "0e:00:00:00:00:01").with_ipv6(
        "fd01::1".parse().unwrap(),
        Some(VxlanData {
            vni: 1,
            vtep_mac: "0e:00:00:00:06:01".parse().unwrap(),
        }),
    );
    let lease = m.acquire(&cfg, &ours).await.unwrap();
    assert_eq!(
        lease.key.ipv6.unwrap().to_string(),
        "fd00:244:0:8::/64",
        "the only IPv6 subnet in range that flannel's lease leaves"
    );
    let key = format!("{PREFIX}/subnets/{}-24&fd00:244:0:8::-64", lease.subnet().network());
    let (value, _) = raw_get(&reg, &key).await.expect("dual-stack key as flannel names it");
    assert_eq!(
        value,
        r#"{"PublicIP":"192.168.50.1","PublicIPv6":"fd01::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:06:01"}}"#
    );

    // flannel's lease as a peer, with its IPv6 side.
    let (tx, mut rx) = mpsc::channel(16);
    let run = tokio::spawn(async move { m.run(&cfg, lease, tx).await });
    let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let overlay::subnet::LeaseEvent::Added(theirs) = event else {
        panic!("expected flannel's lease added, got {event:?}")
    };
    let peer = Peer::from_lease(&theirs, BackendKind::Vxlan).unwrap();
    let v6 = peer.ipv6.expect("IPv6 side");
    assert_eq!(
        (
            v6.subnet.to_string(),
            v6.public_ip.to_string(),
            v6.vtep_mac.unwrap().to_string()
        ),
        ("fd00:244:0:7::/64".into(), "fd01::7".into(), "0e:00:00:00:06:07".into())
    );
    assert_eq!(peer.vtep_mac.unwrap().to_string(), "0e:00:00:00:00:07");
    run.abort();

    // IPv6-only, in another prefix: flannel's key carries the empty IPv4 subnet.
    let reg6 = registry(&etcd.endpoint(), "/v6only/network").await;
    let cfg6 = with_config(
        &reg6,
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"vxlan"}}"#,
    )
    .await;
    let flannel_v6only = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd01::9","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:06:09"}}"#;
    c.put(
        "/v6only/network/subnets/0.0.0.0-0&fd00:10:0:9::-64", flannel_v6only, None,
    )
    .await
    .unwrap();
    let m6 = LeaseManager::new(reg6.clone(), short(30, 10)).unwrap();
    let ours6 = LeaseAttrs::new(Ipv4Addr::UNSPECIFIED, LeaseBackend::VxlanNoIpv4).with_ipv6(
        "fd01::1".parse().unwrap(),
        Some(VxlanData {
            vni: 1,
            vtep_mac: "0e:00:00:00:06:01".parse().unwrap(),
        }),
    );
    let mine = m6.acquire(&cfg6, &ours6).await.unwrap();
    assert_eq!(mine.key.ipv4_subnet(), None);
    assert_ne!(mine.key.ipv6.unwrap().to_string(), "fd00:10:0:9::/64");
    let key6 = format!("/v6only/network/subnets/{}", mine.key);
    assert!(key6.contains("/0.0.0.0-0&fd00:10:"), "{key6}");
    let (value, _) = raw_get(&reg6, &key6).await.expect("IPv6-only key");
    assert_eq!(
        value,
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd01::1","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"0e:00:00:00:06:01"}}"#,
        "as flannel writes it: no BackendData"
    );
    let listing = reg6.list().await.unwrap();
    let theirs = listing
        .leases
        .iter()
        .find(|l| l.attrs.public_ipv6 == Some("fd01::9".parse().unwrap()))
        .expect("flannel's IPv6-only lease read");
    let peer = Peer::from_lease(theirs, BackendKind::Vxlan).unwrap();
    assert_eq!(peer.ipv4(), None);
    assert_eq!(peer.ipv6.unwrap().vtep_mac.unwrap().to_string(), "0e:00:00:00:06:09");
    // A second start of the same host (same PublicIPv6) gets its lease back.
    assert_eq!(m6.acquire(&cfg6, &ours6).await.unwrap().key, mine.key);
}
