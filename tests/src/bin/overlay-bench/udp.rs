//! The small-packet rate: 64-byte UDP datagrams per second received, from our own senders
//! and receiver (sendmmsg/recvmmsg).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{STOP, options::Options, topology::Endpoint};

/// UDP payload of the packet-rate test: the classic small-packet figure.
pub const UDP_PAYLOAD: u64 = 64;
/// Port of the packet-rate test's receiver.
const UDP_PORT: u16 = 5301;
/// Sender threads (one flow each) of the packet-rate test: one per CPU, so the sender is not
/// what limits the rate.
pub const UDP_SENDERS: usize = 2;
/// Datagrams per sendmmsg/recvmmsg call.
pub const UDP_BATCH: usize = 64;

/// 64-byte datagrams from c1 to c2 for the test's duration, as fast as [`UDP_SENDERS`] threads
/// with sendmmsg make them; a receiver thread in c2 counts what arrives with recvmmsg. The send
/// rate and the loss are recorded next to the received rate. Over veth, a kernel path does its
/// work in the sending CPU's softirq, in line with the send: the senders cannot outrun such a
/// path, and the received rate is what the path does per CPU-second on this machine; a path
/// with a queue of its own (the TUN forwarder) drops what it cannot take.
pub fn measure_udp(c1: Endpoint, c2: Endpoint, opts: &Options, run: &mut Value) -> anyhow::Result<()> {
    let duration = Duration::from_secs(opts.duration);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = {
        let stop = stop.clone();
        let local = SocketAddr::new(any_address(c2.ip), UDP_PORT);
        c2.ns.spawn(move || udp_receive(local, ready_tx, &stop))
    };
    let started = ready_rx.recv_timeout(Duration::from_secs(5));
    let sent: anyhow::Result<(u64, f64)> = match started {
        Ok(Ok(())) => {
            let dst = SocketAddr::from((c2.ip, UDP_PORT));
            let senders: Vec<_> = (0..UDP_SENDERS)
                .map(|_| c1.ns.spawn(move || udp_send(dst, duration)))
                .collect();
            // Sum over the senders; the rate's seconds are the longest sender's.
            let mut total = Ok((0u64, 0f64));
            for h in senders {
                let r = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("UDP sender panicked"))
                    .and_then(|r| r)
                    .and_then(|r| r);
                total = match (total, r) {
                    (Ok((n, t)), Ok((n1, t1))) => Ok((n + n1, t.max(t1))),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
            }
            total
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!("the UDP receiver did not start in 5 s")),
    };
    // Packets still queued in the path arrive within a few ms; then the receiver stops.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("UDP receiver panicked"))?
        .and_then(|r| r)
        .context("UDP receiver")?;
    let (sent, send_secs) = sent.context("UDP sender")?;
    if send_secs <= 0.0 || sent == 0 {
        bail!("the UDP sender sent nothing");
    }
    run["udp64_rx_pps"] = json!(received as f64 / send_secs);
    run["udp64_tx_pps"] = json!(sent as f64 / send_secs);
    run["udp64_sent"] = json!(sent);
    run["udp64_received"] = json!(received);
    run["udp64_lost_percent"] = json!(100.0 * sent.saturating_sub(received) as f64 / sent as f64);
    Ok(())
}

/// The wildcard address of `ip`'s family: where a server for it binds, and a client.
pub fn any_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Bind the receiver to `local`, say so on `ready`, count datagrams until `stop`.
fn udp_receive(
    local: SocketAddr,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let socket = match UdpSocket::bind(local) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("binding UDP {local}: {e}")));
            return Err(e.into());
        }
    };
    // A deep queue absorbs bursts, so drops are the path's, not a slow wake-up of ours.
    set_sockopt_int(&socket, libc::SO_RCVBUF, 8 << 20);
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let _ = ready.send(Ok(()));
    let mut buf = vec![[0u8; 2048]; UDP_BATCH];
    let mut iov: Vec<libc::iovec> = buf
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: all-zero is a valid mmsghdr; each points at its own iovec, which outlives it.
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut received = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs and the buffers they point to are valid for the call.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                UDP_BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received += n as u64;
        }
    }
    Ok(received)
}

/// Send 64-byte datagrams to `dst` for `duration`; returns (sent, seconds it took).
fn udp_send(dst: SocketAddr, duration: Duration) -> anyhow::Result<(u64, f64)> {
    let socket = UdpSocket::bind((any_address(dst.ip()), 0))?;
    socket
        .connect(dst)
        .with_context(|| format!("connecting a UDP socket to {dst}"))?;
    set_sockopt_int(&socket, libc::SO_SNDBUF, 4 << 20);
    let mut payload = [0u8; UDP_PAYLOAD as usize];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: all-zero is a valid mmsghdr; all point at the one iovec, which outlives them.
    let mut msgs: Vec<libc::mmsghdr> = (0..UDP_BATCH)
        .map(|_| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration && !STOP.load(Ordering::Relaxed) {
        // SAFETY: msgs and the payload they point to are valid for the call.
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), UDP_BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        }
        // Errors (ENOBUFS when a queue is full, ECONNREFUSED from an ICMP error) are the
        // path's business: keep sending.
    }
    Ok((sent, start.elapsed().as_secs_f64()))
}

fn set_sockopt_int(socket: &UdpSocket, opt: libc::c_int, value: libc::c_int) {
    // SAFETY: a plain int option on a valid socket. Best effort: a smaller buffer only costs
    // drops, which the figures show.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
