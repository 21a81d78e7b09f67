//! Connecting to etcd as flanneld does: endpoints with failover, TLS with client
//! certificates generated here, flag and environment names, clear errors for bad settings.

use std::net::TcpListener;

use clap::Parser;
use overlay::subnet::{
    Registry,
    etcd::{EtcdArgs, EtcdError, EtcdRegistry},
};
use overlay_tests::etcd::{Etcd, TlsFiles};

#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    etcd: EtcdArgs,
}

const CONFIG: &str = r#"{"Network":"10.7.0.0/16","Backend":{"Type":"vxlan"}}"#;

#[tokio::test]
async fn tls_with_client_certificates() {
    let tls = TlsFiles::generate();
    let etcd = Etcd::start_tls(&tls);
    let ep = etcd.endpoint();
    let cmd = Cmd::try_parse_from([
        "t",
        "--etcd-endpoints",
        &ep,
        "--etcd-cafile",
        tls.ca.to_str().unwrap(),
        "--etcd-certfile",
        tls.client_cert.to_str().unwrap(),
        "--etcd-keyfile",
        tls.client_key.to_str().unwrap(),
    ])
    .unwrap();
    let reg = EtcdRegistry::connect(&cmd.etcd).await.unwrap();
    reg.put_config(CONFIG).await.unwrap();
    assert_eq!(reg.get_config().await.unwrap().as_deref(), Some(CONFIG));

    // Without a client certificate etcd refuses us, and the error names the endpoint.
    let mut no_cert = cmd.etcd.clone();
    no_cert.certfile = None;
    no_cert.keyfile = None;
    let err = match EtcdRegistry::connect(&no_cert).await {
        Ok(reg) => reg.get_config().await.unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&ep), "{err}");
}

#[tokio::test]
async fn fails_over_to_a_live_endpoint() {
    let etcd = Etcd::start();
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let joined = format!("{dead},{}", etcd.endpoint());
    let cmd = Cmd::try_parse_from(["t", "--etcd-endpoints", &joined, "--etcd-prefix", "/failover"]).unwrap();
    assert_eq!(cmd.etcd.endpoints.len(), 2);
    let reg = EtcdRegistry::connect(&cmd.etcd).await.unwrap();
    for _ in 0..10 {
        reg.put_config(CONFIG).await.unwrap();
        assert!(reg.get_config().await.unwrap().is_some());
    }
    assert_eq!(reg.config_key(), "/failover/config");
}

#[test]
fn flags_and_flanneld_environment_names() {
    let cmd = Cmd::try_parse_from(["t"]).unwrap();
    assert_eq!(cmd.etcd.endpoints, ["http://127.0.0.1:2379"]);
    assert_eq!(cmd.etcd.prefix, "/coreos.com/network");
    // SAFETY: no other test in this binary reads these variables.
    unsafe {
        std::env::set_var("FLANNELD_ETCD_ENDPOINTS", "https://a:2379,https://b:2379");
        std::env::set_var("FLANNELD_ETCD_PREFIX", "/env/prefix");
        std::env::set_var("FLANNELD_ETCD_USERNAME", "u");
    }
    let cmd = Cmd::try_parse_from(["t"]).unwrap();
    unsafe {
        std::env::remove_var("FLANNELD_ETCD_ENDPOINTS");
        std::env::remove_var("FLANNELD_ETCD_PREFIX");
        std::env::remove_var("FLANNELD_ETCD_USERNAME");
    }
    assert_eq!(cmd.etcd.endpoints, ["https://a:2379", "https://b:2379"]);
    assert_eq!(cmd.etcd.prefix, "/env/prefix");
    assert_eq!(cmd.etcd.username.as_deref(), Some("u"));
}

#[tokio::test]
async fn bad_settings_are_named() {
    let tls = TlsFiles::generate();
    let base = EtcdArgs::new(vec!["https://127.0.0.1:1".into()], "/p");
    let cases: Vec<(EtcdArgs, &str)> = vec![
        (
            EtcdArgs {
                endpoints: vec!["127.0.0.1:2379".into()],
                ..base.clone()
            },
            "\"127.0.0.1:2379\": must start with http://",
        ),
        (
            EtcdArgs {
                endpoints: vec![],
                ..base.clone()
            },
            "no etcd endpoint",
        ),
        (
            EtcdArgs {
                prefix: "coreos.com".into(),
                ..base.clone()
            },
            "must start with '/'",
        ),
        (
            EtcdArgs {
                endpoints: vec!["http://127.0.0.1:2379".into()],
                cafile: Some(tls.ca.clone()),
                ..base.clone()
            },
            "not https://",
        ),
        (
            EtcdArgs {
                cafile: Some("/nonexistent/ca.pem".into()),
                ..base.clone()
            },
            "--etcd-cafile /nonexistent/ca.pem",
        ),
        (
            EtcdArgs {
                certfile: Some(tls.client_cert.clone()),
                ..base.clone()
            },
            "only --etcd-certfile was given",
        ),
        (
            EtcdArgs {
                password: Some("p".into()),
                ..base.clone()
            },
            "only --etcd-password was given",
        ),
    ];
    for (args, want) in cases {
        let err: EtcdError = EtcdRegistry::connect(&args).await.err().expect(want);
        assert!(err.to_string().contains(want), "{err} (wanted {want:?})");
    }
}
