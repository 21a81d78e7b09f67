//! Latency: ping RTT, and a finer UDP request/response RTT timed in nanoseconds.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::traffic;
use serde_json::{Value, json};

use crate::{
    STOP,
    topology::Endpoint,
    udp::{UDP_PAYLOAD, any_address},
};

pub const PINGS: u32 = 5000;
/// Back to back (root only): the next ping leaves when the reply is in, so the figure is the
/// path's latency. At 10 ms the CPUs fall idle between pings and the wake-up, tens of
/// microseconds that vary from run to run, drowned the difference between paths.
pub const PING_INTERVAL: &str = "0";
/// UDP request/response round trips (64-byte datagram each way, one in flight), timed in
/// nanoseconds: ping prints whole microseconds, too coarse for paths of a few microseconds.
/// Both ends spin on non-blocking sockets, so no thread wake-up is timed, only the path.
pub const RR_ROUND_TRIPS: u32 = 20_000;
const RR_PORT: u16 = 5401;

pub fn measure_rtt(c1: Endpoint, c2: Endpoint, run: &mut Value) -> anyhow::Result<()> {
    let r = traffic::ping(c1.ns, c2.ip, PINGS, 56, false, PING_INTERVAL)?;
    let (Some(p50), Some(p99)) = (r.percentile(50.0), r.percentile(99.0)) else {
        bail!("no ping answered ({} sent)", r.transmitted);
    };
    run["rtt_p50_us"] = json!(p50 * 1000.0);
    run["rtt_p99_us"] = json!(p99 * 1000.0);
    run["ping_sent"] = json!(r.transmitted);
    run["ping_received"] = json!(r.received);
    Ok(())
}

pub fn measure_rr(c1: Endpoint, c2: Endpoint, run: &mut Value) -> anyhow::Result<()> {
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let stop = stop.clone();
        let local = SocketAddr::new(any_address(c2.ip), RR_PORT);
        c2.ns.spawn(move || rr_echo(local, ready_tx, &stop))
    };
    let times = match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {
            let dst = SocketAddr::from((c2.ip, RR_PORT));
            c1.ns
                .spawn(move || rr_client(dst))
                .join()
                .map_err(|_| anyhow::anyhow!("UDP RR client panicked"))
                .and_then(|r| r)
                .and_then(|r| r)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!("the UDP echo server did not start in 5 s")),
    };
    stop.store(true, Ordering::Relaxed);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("UDP echo server panicked"))?
        .and_then(|r| r)
        .context("UDP echo server")?;
    let mut times = times.context("UDP RR client")?;
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_nanos() as f64 / 1000.0;
    run["udp_rr_p50_us"] = json!(at(0.50));
    run["udp_rr_p99_us"] = json!(at(0.99));
    run["udp_rr_round_trips"] = json!(times.len());
    Ok(())
}

/// Echo every datagram on `local` back to its sender until `stop`.
fn rr_echo(
    local: SocketAddr,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let socket = match UdpSocket::bind(local) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("binding UDP {local}: {e}")));
            return Err(e.into());
        }
    };
    socket.set_nonblocking(true)?;
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                socket.send_to(&buf[..n], from)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// [`RR_ROUND_TRIPS`] round trips, one in flight, each timed from send to reply.
fn rr_client(dst: SocketAddr) -> anyhow::Result<Vec<Duration>> {
    let socket = UdpSocket::bind((any_address(dst.ip()), 0))?;
    socket.connect(dst)?;
    socket.set_nonblocking(true)?;
    let payload = [0x5au8; UDP_PAYLOAD as usize];
    let mut buf = [0u8; 2048];
    let mut times = Vec::with_capacity(RR_ROUND_TRIPS as usize);
    for _ in 0..RR_ROUND_TRIPS {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let t = Instant::now();
        socket.send(&payload)?;
        loop {
            match socket.recv(&mut buf) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if t.elapsed() > Duration::from_secs(1) {
                        bail!("no reply from {dst} within 1 s");
                    }
                    std::hint::spin_loop();
                }
                Err(e) => return Err(e.into()),
            }
        }
        times.push(t.elapsed());
    }
    if times.is_empty() {
        bail!("no round trip completed");
    }
    Ok(times)
}
