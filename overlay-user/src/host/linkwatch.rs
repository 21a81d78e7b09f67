//! Link and address changes as the kernel announces them (rtnetlink multicast groups), so the
//! agent reacts to a re-created underlay or bridge at once instead of on its next tick. The
//! messages are not parsed: any one is a reason to look again, and a lost one (a full socket
//! buffer) is reported the same way.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

use super::HostError;

/// A subscription to link and IPv4 address notifications in this network namespace.
pub struct LinkEvents {
    fd: AsyncFd<OwnedFd>,
}

impl LinkEvents {
    /// Must be called inside a tokio runtime.
    pub fn subscribe() -> Result<Self, HostError> {
        let setup = |what: &str, e: io::Error| HostError::Setup(format!("rtnetlink link notifications: {what}: {e}"));
        // SAFETY: plain socket calls on a descriptor we own; the address is a zeroed
        // sockaddr_nl with its family and groups set.
        let fd = unsafe {
            let raw = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if raw < 0 {
                return Err(setup("socket", io::Error::last_os_error()));
            }
            let fd = OwnedFd::from_raw_fd(raw);
            // A burst of changes (a bond rebuilt) can exceed the default buffer; an overrun
            // is still reported, as a change.
            let size: libc::c_int = 1 << 20;
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            addr.nl_groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR) as u32;
            let bound = libc::bind(
                raw,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            );
            if bound < 0 {
                return Err(setup("bind", io::Error::last_os_error()));
            }
            fd
        };
        // SAFETY: the OwnedFd moves into the AsyncFd, which closes it only when dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| setup("registering with the runtime", e.into()))?;
        Ok(LinkEvents { fd })
    }

    /// Wait until something changed, then take every queued notification.
    pub async fn changed(&mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            let mut got = false;
            loop {
                // SAFETY: reads into our own buffer, within its length.
                let n = unsafe {
                    libc::recv(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n >= 0 {
                    got = true;
                    continue;
                }
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::ENOBUFS) => got = true,
                    Some(libc::EINTR) => {}
                    _ => {
                        ready.clear_ready();
                        break;
                    }
                }
            }
            if got {
                return;
            }
        }
    }
}
