//! `overlay status`: ask a running agent (its healthz port) for its lease, peers and counters.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The agent's --healthz-ip (0.0.0.0 means ask on loopback).
    #[arg(long = "healthz-ip", env = "FLANNELD_HEALTHZ_IP", default_value = "127.0.0.1")]
    pub healthz_ip: Ipv4Addr,
    /// The agent's --healthz-port.
    #[arg(long = "healthz-port", env = "FLANNELD_HEALTHZ_PORT")]
    pub healthz_port: u16,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ip = if args.healthz_ip.is_unspecified() {
        Ipv4Addr::LOCALHOST
    } else {
        args.healthz_ip
    };
    let addr = SocketAddr::from((ip, args.healthz_port));
    let body = http_get(addr, "/status")
        .with_context(|| format!("asking the agent at {addr} (is it running with --healthz-port?)"))?;
    let v: serde_json::Value = serde_json::from_str(&body).context("the agent's /status is not JSON")?;
    if args.json {
        println!("{v}");
        return Ok(());
    }
    println!("ready:      {}", v["ready"]);
    println!("subnet:     {}", v["subnet"].as_str().unwrap_or("-"));
    println!("public ip:  {}", v["public_ip"].as_str().unwrap_or("-"));
    println!("backend:    {}", v["backend"].as_str().unwrap_or("-"));
    match v["lease_expires_unix"].as_u64() {
        Some(t) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            println!("lease:      expires in {}s", t.saturating_sub(now));
        }
        None => println!("lease:      no expiry (reservation)"),
    }
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    println!("peers:      {}", peers.len());
    for p in &peers {
        println!(
            "  {:<18} via {:<15} {}",
            p["subnet"].as_str().unwrap_or(""),
            p["public_ip"].as_str().unwrap_or(""),
            p["vtep_mac"].as_str().unwrap_or("")
        );
    }
    if let Some(c) = v["counters"].as_object() {
        println!("counters:");
        for (name, c) in c.iter().filter(|(_, c)| c["packets"].as_u64().unwrap_or(0) > 0) {
            println!("  {name:<22} {:>12} packets {:>15} bytes", c["packets"], c["bytes"]);
        }
    }
    Ok(())
}

/// One GET over a fresh connection; returns the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // One write: a request split over segments could be answered (and closed) half-read.
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP answer")?;
    let code = head.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        bail!("{path} answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}
