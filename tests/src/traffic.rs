//! Traffic between containers: ping with its figures, and TCP transfers whose every byte is
//! checked on arrival.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::netns::Netns;

#[derive(Debug, Clone, Default)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
    /// Round-trip times in milliseconds, one per reply.
    pub rtts_ms: Vec<f64>,
}

impl PingResult {
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let mut v = self.rtts_ms.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        Some(v[i])
    }
}

/// `ping` from `ns` to `dst`. `size` is the ICMP payload; `dont_fragment` sets DF (`-M do`).
/// Does not fail on loss: the caller asserts on the counts.
pub fn ping(
    ns: &Netns,
    dst: impl Into<IpAddr>,
    count: u32,
    size: u32,
    dont_fragment: bool,
    interval: &str,
) -> anyhow::Result<PingResult> {
    let mut cmd = ns.command("ping");
    cmd.args([
        "-n",
        "-c",
        &count.to_string(),
        "-s",
        &size.to_string(),
        "-i",
        interval,
        "-W",
        "1",
    ]);
    if dont_fragment {
        cmd.args(["-M", "do"]);
    }
    cmd.arg(dst.into().to_string());
    let out = cmd.output().context("running ping (install iputils-ping)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_ping(&text).with_context(|| format!("unreadable ping output: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

pub fn parse_ping(text: &str) -> anyhow::Result<PingResult> {
    let mut r = PingResult::default();
    let mut summary = false;
    for line in text.lines() {
        if let Some(t) = line.split("time=").nth(1) {
            let ms = t.split_whitespace().next().unwrap_or("").parse::<f64>()?;
            r.rtts_ms.push(ms);
        }
        if line.contains("packets transmitted") {
            let nums: Vec<u32> = line
                .split(',')
                .filter_map(|p| p.split_whitespace().next()?.parse().ok())
                .collect();
            if nums.len() >= 2 {
                r.transmitted = nums[0];
                r.received = nums[1];
                summary = true;
            }
        }
    }
    if !summary {
        bail!("no summary line");
    }
    Ok(r)
}

/// The byte at position `i` of a transfer: a cheap pseudo-random stream both ends can compute.
fn pattern(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i as u8)
}

/// Send `bytes` from `client_ns` to a server in `server_ns` at `server_ip`; the server checks
/// every byte against the pattern. Returns the bytes verified on the server side.
pub fn tcp_transfer_verified(
    client_ns: &Netns,
    server_ns: &Netns,
    server_ip: impl Into<IpAddr>,
    port: u16,
    bytes: u64,
) -> anyhow::Result<u64> {
    let server_ip = server_ip.into();
    let any: IpAddr = match server_ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = server_ns.spawn(move || -> anyhow::Result<u64> {
        let listener = TcpListener::bind((any, port))?;
        ready_tx.send(()).ok();
        listener.set_nonblocking(false)?;
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut pos = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                let i = pos + k as u64;
                if *b != pattern(i) {
                    bail!("byte {i} corrupted: got {b:#04x}, expected {:#04x}", pattern(i));
                }
            }
            pos += n as u64;
        }
        s.write_all(&pos.to_be_bytes())?;
        Ok(pos)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("TCP server did not start")?;
    let client = client_ns.spawn(move || -> anyhow::Result<u64> {
        let addr = SocketAddr::from((server_ip, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut pos = 0u64;
        while pos < bytes {
            let n = (bytes - pos).min(buf.len() as u64) as usize;
            for (k, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(pos + k as u64);
            }
            s.write_all(&buf[..n])?;
            pos += n as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut ack = [0u8; 8];
        s.read_exact(&mut ack)?;
        Ok(u64::from_be_bytes(ack))
    });
    let acked = client.join().expect("client thread")??;
    let received = server.join().expect("server thread")??;
    if acked != received || received != bytes {
        bail!("sent {bytes} bytes, server verified {received}, client saw ack {acked}");
    }
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iputils_output() {
        let text = "PING 10.244.2.2 (10.244.2.2) 56(84) bytes of data.\n\
            64 bytes from 10.244.2.2: icmp_seq=1 ttl=62 time=0.608 ms\n\
            64 bytes from 10.244.2.2: icmp_seq=2 ttl=62 time=0.158 ms\n\n\
            --- 10.244.2.2 ping statistics ---\n\
            3 packets transmitted, 2 received, 33% packet loss, time 405ms\n";
        let r = parse_ping(text).unwrap();
        assert_eq!((r.transmitted, r.received), (3, 2));
        assert_eq!(r.rtts_ms, vec![0.608, 0.158]);
        assert_eq!(r.percentile(50.0), Some(0.608));
        assert!(parse_ping("garbage").is_err());
    }

    #[test]
    fn pattern_is_not_constant() {
        let distinct: std::collections::HashSet<u8> = (0..4096).map(pattern).collect();
        assert!(distinct.len() > 200);
    }
}
