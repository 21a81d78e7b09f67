//! Which tunnel packets a host takes in. One rule for the eBPF decap programs and for the
//! userspace forwarder (flannel's udp design), so both drop the same packets for the same
//! reasons. Generic over the address family: IPv4 (`[u8; 4]`) and IPv6 (`[u8; 16]`) packets
//! are judged by the same rule in the same order.

/// An IPv4 subnet, network byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Subnet {
    pub addr: [u8; 4],
    pub prefix_len: u8,
}

impl Ipv4Subnet {
    pub const fn contains(&self, ip: [u8; 4]) -> bool {
        crate::subnet_contains(self.addr, self.prefix_len, ip)
    }
}

/// An IPv6 subnet, network byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Subnet {
    pub addr: [u8; 16],
    pub prefix_len: u8,
}

impl Ipv6Subnet {
    pub const fn contains(&self, ip: [u8; 16]) -> bool {
        crate::subnet6_contains(self.addr, self.prefix_len, ip)
    }
}

/// Our own subnet in one address family: the inner destinations we take.
pub trait OurSubnet<A> {
    fn has(&self, ip: A) -> bool;
}

impl OurSubnet<[u8; 4]> for Ipv4Subnet {
    #[inline(always)]
    fn has(&self, ip: [u8; 4]) -> bool {
        self.contains(ip)
    }
}

impl OurSubnet<[u8; 16]> for Ipv6Subnet {
    #[inline(always)]
    fn has(&self, ip: [u8; 16]) -> bool {
        self.contains(ip)
    }
}

/// Why a tunnel packet that reached us is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The outer source is no peer's PublicIP.
    UnknownPeer,
    /// The inner source lies outside the subnet of the peer that sent it.
    SpoofedSource,
    /// The inner destination lies outside our subnet.
    NotOurSubnet,
}

/// The inner addresses a sending peer may use: the eBPF side knows one subnet per PublicIP,
/// the forwarder looks the source's owner up in its table.
pub trait SenderSubnets<A = [u8; 4]> {
    fn holds(&self, ip: A) -> bool;
}

impl<A, T: SenderSubnets<A>> SenderSubnets<A> for &T {
    #[inline(always)]
    fn holds(&self, ip: A) -> bool {
        (**self).holds(ip)
    }
}

impl SenderSubnets for crate::PeerSubnet {
    #[inline(always)]
    fn holds(&self, ip: [u8; 4]) -> bool {
        self.contains(ip)
    }
}

impl SenderSubnets<[u8; 16]> for crate::PeerSubnet6 {
    #[inline(always)]
    fn holds(&self, ip: [u8; 16]) -> bool {
        self.contains(ip)
    }
}

/// The addresses of a parsed inner packet, network byte order.
pub trait InnerAddresses<A = [u8; 4]> {
    fn source(&self) -> A;
    fn destination(&self) -> A;
}

/// The acceptance rule. `sender` is what we know of the outer source (`None`: not a peer);
/// `parse_inner` reads the inner packet and is only called for a known peer, since a
/// stranger's packet is not ours to parse: its refusal comes first, whatever it carries. Then
/// the inner source must lie in the sender's subnet and the inner destination in ours.
///
/// Errors of `parse_inner` pass through unchanged, so each side keeps its own reasons for
/// packets it cannot read.
#[inline(always)]
pub fn accept_tunnel_packet<A, S, O, I, E>(
    sender: Option<S>,
    our_subnet: O,
    parse_inner: impl FnOnce() -> Result<I, E>,
) -> Result<I, E>
where
    S: SenderSubnets<A>,
    O: OurSubnet<A>,
    I: InnerAddresses<A>,
    E: From<Refusal>,
{
    let sender = sender.ok_or(Refusal::UnknownPeer)?;
    let inner = parse_inner()?;
    if !sender.holds(inner.source()) {
        return Err(Refusal::SpoofedSource.into());
    }
    if !our_subnet.has(inner.destination()) {
        return Err(Refusal::NotOurSubnet.into());
    }
    Ok(inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerSubnet;

    #[derive(Debug, PartialEq, Eq)]
    struct Inner([u8; 4], [u8; 4]);

    impl InnerAddresses for Inner {
        fn source(&self) -> [u8; 4] {
            self.0
        }
        fn destination(&self) -> [u8; 4] {
            self.1
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Why {
        Refused(Refusal),
        Unreadable,
    }

    impl From<Refusal> for Why {
        fn from(r: Refusal) -> Self {
            Why::Refused(r)
        }
    }

    const PEER: PeerSubnet = PeerSubnet {
        addr: [10, 244, 2, 0],
        prefix_len: 24,
        _pad: [0; 3],
    };
    const OURS: Ipv4Subnet = Ipv4Subnet {
        addr: [10, 244, 1, 0],
        prefix_len: 24,
    };

    fn judge(sender: Option<PeerSubnet>, inner: Result<Inner, Why>) -> Result<Inner, Why> {
        accept_tunnel_packet(sender, OURS, || inner)
    }

    #[test]
    fn accepts_a_peer_sending_from_its_subnet_to_ours() {
        let cases = [
            ("container to container", [10, 244, 2, 5], [10, 244, 1, 7]),
            ("network addresses (the devices')", [10, 244, 2, 0], [10, 244, 1, 0]),
            ("broadcast addresses", [10, 244, 2, 255], [10, 244, 1, 255]),
        ];
        for (what, src, dst) in cases {
            assert_eq!(judge(Some(PEER), Ok(Inner(src, dst))), Ok(Inner(src, dst)), "{what}");
        }
    }

    #[test]
    fn refuses_each_rule_broken_with_its_own_reason() {
        use Refusal::*;
        let cases = [
            ("stranger", None, [10, 244, 2, 5], [10, 244, 1, 7], UnknownPeer),
            (
                "source of another peer",
                Some(PEER),
                [10, 244, 3, 5],
                [10, 244, 1, 7],
                SpoofedSource,
            ),
            (
                "source outside the network",
                Some(PEER),
                [172, 16, 0, 1],
                [10, 244, 1, 7],
                SpoofedSource,
            ),
            (
                "destination of another host",
                Some(PEER),
                [10, 244, 2, 5],
                [10, 244, 3, 7],
                NotOurSubnet,
            ),
            (
                "destination outside the network",
                Some(PEER),
                [10, 244, 2, 5],
                [8, 8, 8, 8],
                NotOurSubnet,
            ),
        ];
        for (what, sender, src, dst, why) in cases {
            assert_eq!(judge(sender, Ok(Inner(src, dst))), Err(Why::Refused(why)), "{what}");
        }
    }

    #[test]
    fn checks_in_order_and_parses_only_for_peers() {
        // Both addresses wrong: the source is judged first.
        let both = Inner([10, 244, 3, 5], [10, 244, 3, 7]);
        assert_eq!(judge(Some(PEER), Ok(both)), Err(Why::Refused(Refusal::SpoofedSource)));
        // An unreadable packet from a peer keeps the parser's reason ...
        assert_eq!(judge(Some(PEER), Err(Why::Unreadable)), Err(Why::Unreadable));
        // ... and from a stranger it is not even read.
        let parsed = core::cell::Cell::new(false);
        let r: Result<Inner, Why> = accept_tunnel_packet(None::<PeerSubnet>, OURS, || {
            parsed.set(true);
            Err(Why::Unreadable)
        });
        assert_eq!(r, Err(Why::Refused(Refusal::UnknownPeer)));
        assert!(!parsed.get());
    }

    /// The same rule, in the same order, for IPv6 packets.
    #[test]
    fn judges_ipv6_packets_by_the_same_rule() {
        use crate::PeerSubnet6;
        struct Inner6([u8; 16], [u8; 16]);
        impl InnerAddresses<[u8; 16]> for Inner6 {
            fn source(&self) -> [u8; 16] {
                self.0
            }
            fn destination(&self) -> [u8; 16] {
                self.1
            }
        }
        let net = |n: u8, host: u8| {
            let mut a = [0u8; 16];
            a[0] = 0xfd;
            a[7] = n;
            a[15] = host;
            a
        };
        let peer = PeerSubnet6 {
            addr: net(2, 0),
            prefix_len: 64,
            _pad: [0; 3],
        };
        let ours = Ipv6Subnet {
            addr: net(1, 0),
            prefix_len: 64,
        };
        let judge = |sender: Option<PeerSubnet6>, src, dst| {
            accept_tunnel_packet(sender, ours, || Ok::<_, Refusal>(Inner6(src, dst))).map(|_| ())
        };
        assert_eq!(judge(Some(peer), net(2, 5), net(1, 7)), Ok(()));
        assert_eq!(judge(None, net(2, 5), net(1, 7)), Err(Refusal::UnknownPeer));
        assert_eq!(judge(Some(peer), net(3, 5), net(1, 7)), Err(Refusal::SpoofedSource));
        assert_eq!(judge(Some(peer), net(3, 5), net(3, 7)), Err(Refusal::SpoofedSource));
        assert_eq!(judge(Some(peer), net(2, 5), net(3, 7)), Err(Refusal::NotOurSubnet));
    }

    #[test]
    fn a_wider_peer_subnet_holds_its_whole_range() {
        let wide = PeerSubnet {
            addr: [10, 244, 16, 0],
            prefix_len: 20,
            _pad: [0; 3],
        };
        assert!(judge(Some(wide), Ok(Inner([10, 244, 31, 1], [10, 244, 1, 1]))).is_ok());
        assert_eq!(
            judge(Some(wide), Ok(Inner([10, 244, 32, 1], [10, 244, 1, 1]))),
            Err(Why::Refused(Refusal::SpoofedSource))
        );
    }
}
