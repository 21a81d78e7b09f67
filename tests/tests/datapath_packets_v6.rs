//! Packet tests for IPv6: VXLAN over IPv6 between PublicIPv6s, as flannel's `flannel-v6.<VNI>`.
//! The programs run in the kernel through BPF_PROG_TEST_RUN on hand-built frames; each case
//! names its input, verdict, exact output frame and counter. Frames and checksums are built
//! here byte by byte, independently of overlay-common's builders.
use std::net::Ipv6Addr;

use aya::programs::{TestRun, TestRunOptions};
use overlay::{
    backend::ebpf::{Programs, ipv6::Peer6},
    host::MacAddr,
};
use overlay_common::{CounterIndex, DatapathConfig6};
use overlay_tests::netns::Netns;

const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const PEER_NEIGH_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x02];
const LOCAL_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const PEER_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const OVERLAY_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
const NIC_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x01];
const REMOTE_NIC_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x02];
/// The underlay's MTU in the test namespace, and what is left for an inner IPv6 packet.
const UNDERLAY_MTU: u32 = 1500;
const INNER_MTU: u32 = UNDERLAY_MTU - 70;

/// Underlay addresses: fc00::N.
fn public(n: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfc;
    a[15] = n;
    a
}

/// Overlay addresses: fd00:0:0:<subnet>::<host>.
fn overlay(subnet: u8, host: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[7] = subnet;
    a[15] = host;
    a
}

const LOCAL: u8 = 1;
const PEER: u8 = 2;
/// A peer whose neighbour entry is not resolved yet.
const COLD_PEER: u8 = 3;

// ---- independent frame building -------------------------------------------------------------

fn sum(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The checksum of an upper-layer segment over IPv6 (RFC 8200 section 8.1).
fn l4_checksum(src: [u8; 16], dst: [u8; 16], next: u8, segment: &[u8]) -> u16 {
    let mut pseudo = src.to_vec();
    pseudo.extend(dst);
    pseudo.extend((segment.len() as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, next]);
    fold(sum(&pseudo) + sum(segment))
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut v = dst.to_vec();
    v.extend(src);
    v.extend(ethertype.to_be_bytes());
    v
}

/// An IPv6 header; `ext` (extension headers, already chained) sits between it and `payload`.
fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, hop_limit: u8, ext: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend(((ext.len() + payload.len()) as u16).to_be_bytes());
    h.extend([next, hop_limit]);
    h.extend(src);
    h.extend(dst);
    h.extend(ext);
    h.extend(payload);
    h
}

/// A Hop-by-Hop or Destination Options header of 8 bytes (PadN), followed by `next`.
fn options_header(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

fn fragment_header(next: u8, offset_units: u16, more: bool) -> Vec<u8> {
    let field = (offset_units << 3) | u16::from(more);
    let mut v = vec![next, 0];
    v.extend(field.to_be_bytes());
    v.extend([0, 0, 0x12, 0x34]);
    v
}

fn udp(sport: u16, dport: u16, payload: &[u8], csum: u16) -> Vec<u8> {
    let mut v = sport.to_be_bytes().to_vec();
    v.extend(dport.to_be_bytes());
    v.extend(((8 + payload.len()) as u16).to_be_bytes());
    v.extend(csum.to_be_bytes());
    v.extend(payload);
    v
}

fn vxlan(flags: u8, vni: u32) -> Vec<u8> {
    let mut v = vec![flags, 0, 0, 0];
    v.extend(((vni & 0xff_ffff) << 8).to_be_bytes());
    v
}

/// An ICMPv6 echo request with its checksum, as a whole inner IPv6 packet.
fn inner_echo(src: [u8; 16], dst: [u8; 16], len: usize) -> Vec<u8> {
    let mut icmp = vec![128, 0, 0, 0, 0x42, 0x42, 0, 1];
    icmp.extend((0..len).map(|i| i as u8));
    let c = l4_checksum(src, dst, 58, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv6(src, dst, 58, 63, &[], &icmp)
}

/// A TCP segment (header only, some payload) with its checksum, as an inner IPv6 packet.
fn inner_tcp(src: [u8; 16], dst: [u8; 16], sport: u16, payload: usize) -> Vec<u8> {
    let mut tcp = sport.to_be_bytes().to_vec();
    tcp.extend(80u16.to_be_bytes());
    tcp.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend((0..payload).map(|i| (i * 3) as u8));
    let c = l4_checksum(src, dst, 6, &tcp);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ipv6(src, dst, 6, 63, &[], &tcp)
}

/// A tunnel frame from `outer_src` to `outer_dst`, with the outer extension headers `ext`
/// (chained to UDP by the caller) and a correct outer UDP checksum.
struct Tunnel {
    outer_src: [u8; 16],
    outer_dst: [u8; 16],
    ext: Vec<u8>,
    first_next: u8,
    port: u16,
    vxlan: Vec<u8>,
    inner_ethertype: u16,
    zero_checksum: bool,
}

impl Tunnel {
    fn good() -> Self {
        Tunnel {
            outer_src: public(PEER),
            outer_dst: public(LOCAL),
            ext: vec![],
            first_next: 17,
            port: 8472,
            vxlan: vxlan(0x08, 1),
            inner_ethertype: 0x86dd,
            zero_checksum: false,
        }
    }

    fn frame(&self, inner: &[u8]) -> Vec<u8> {
        let mut payload = self.vxlan.clone();
        payload.extend(eth(LOCAL_VTEP, PEER_VTEP, self.inner_ethertype));
        payload.extend(inner);
        let mut dgram = udp(45678, self.port, &payload, 0);
        if !self.zero_checksum {
            let c = l4_checksum(self.outer_src, self.outer_dst, 17, &dgram);
            dgram[6..8].copy_from_slice(&c.to_be_bytes());
        }
        let mut f = eth(NIC_MAC, REMOTE_NIC_MAC, 0x86dd);
        f.extend(ipv6(
            self.outer_src, self.outer_dst, self.first_next, 64, &self.ext, &dgram,
        ));
        f
    }
}

fn good_tunnel_frame(inner: &[u8]) -> Vec<u8> {
    Tunnel::good().frame(inner)
}

/// What either decap program hands to the stack: the outer Ethernet header, then the inner
/// IPv6 packet.
fn decapsulated(inner: &[u8]) -> Vec<u8> {
    let mut f = eth(NIC_MAC, REMOTE_NIC_MAC, 0x86dd);
    f.extend(inner);
    f
}

fn from_overlay_device(inner: &[u8]) -> Vec<u8> {
    let mut f = eth(OVERLAY_MAC, OVERLAY_MAC, 0x86dd);
    f.extend(inner);
    f
}

/// What our TC program must produce for `inner`, given the outer source port it chose (a hash
/// of the inner flow) and whether the outer UDP checksum is expected (else 0).
fn encapsulated(nic_mac: [u8; 6], inner: &[u8], sport: u16, with_checksum: bool) -> Vec<u8> {
    let mut payload = vxlan(0x08, 1);
    payload.extend(eth(PEER_VTEP, LOCAL_VTEP, 0x86dd));
    payload.extend(inner);
    let mut dgram = udp(sport, 8472, &payload, 0);
    if with_checksum {
        let c = match l4_checksum(public(LOCAL), public(PEER), 17, &dgram) {
            0 => 0xffff,
            c => c,
        };
        dgram[6..8].copy_from_slice(&c.to_be_bytes());
    }
    let mut f = eth(PEER_NEIGH_MAC, nic_mac, 0x86dd);
    f.extend(ipv6(public(LOCAL), public(PEER), 17, 64, &[], &dgram));
    f
}

/// Outer UDP source port of an encapsulated frame.
fn sport_of(out: &[u8]) -> u16 {
    u16::from_be_bytes([out[54], out[55]])
}

// ---- harness ---------------------------------------------------------------------------------

fn setup(ns: &Netns) -> anyhow::Result<(u32, [u8; 6])> {
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    ns.ip(&["link", "add", "nic0", "type", "veth", "peer", "name", "nic1"])?;
    ns.ip(&["link", "set", "nic0", "mtu", &UNDERLAY_MTU.to_string(), "up"])?;
    ns.ip(&["link", "set", "nic1", "up"])?;
    ns.ip(&["-6", "addr", "add", "fc00::1/64", "dev", "nic0", "nodad"])?;
    ns.ip(&[
        "-6", "neigh", "replace", "fc00::2", "lladdr", "02:aa:00:00:00:02", "dev", "nic0", "nud", "permanent",
    ])?;
    let out = ns.ip(&["-j", "link", "show", "nic0"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let ifindex = v[0]["ifindex"].as_u64().unwrap() as u32;
    let mac: MacAddr = v[0]["address"].as_str().unwrap().parse().map_err(anyhow::Error::msg)?;
    Ok((ifindex, mac.0))
}

struct Bench {
    programs: Programs,
    nic_mac: [u8; 6],
}

impl Bench {
    fn new(ifindex: u32, nic_mac: [u8; 6]) -> anyhow::Result<Self> {
        let mut programs = Programs::load()?;
        programs.set_config6(&DatapathConfig6 {
            public_ip: public(LOCAL),
            subnet_addr: overlay(1, 0),
            subnet_prefix_len: 64,
            enabled: 1,
            port: 8472,
            vni: 1,
            vtep_mac: LOCAL_VTEP,
            _pad: [0; 2],
            underlay_ifindex: ifindex,
            mtu: INNER_MTU,
        })?;
        // Peer 2 on the link, peer 3 on the link but unresolved, peer 4 unroutable.
        for (subnet, ip) in [
            (PEER, public(PEER)),
            (COLD_PEER, public(COLD_PEER)),
            (4, {
                let mut a = [0u8; 16];
                a[0] = 0xfe;
                a[1] = 0xc0;
                a[15] = 1;
                a
            }),
        ] {
            programs.upsert_peer6(&Peer6 {
                subnet: format!("fd00:0:0:{subnet}::/64").parse()?,
                public_ip: Ipv6Addr::from(ip),
                vtep_mac: MacAddr(PEER_VTEP),
            })?;
        }
        Ok(Bench { programs, nic_mac })
    }

    fn counter(&mut self, c: CounterIndex) -> u64 {
        self.programs.counters().unwrap().get(c).packets
    }

    /// Either decap program; verdicts as XDP_PASS / XDP_DROP for both. Err: the kernel refused
    /// the test run on this frame (TC's wants more than an Ethernet header for some).
    fn run_decap(&mut self, hook: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let (verdict, len) = match hook {
            Hook::Xdp => {
                let r = self.programs.decap_program().unwrap().test_run(opts)?;
                (r.return_value, r.data_size_out)
            }
            Hook::Tc => {
                let r = self.programs.decap_tc_program().unwrap().test_run(opts)?;
                let verdict = match r.return_value {
                    TC_ACT_UNSPEC => XDP_PASS,
                    TC_ACT_SHOT => XDP_DROP,
                    other => panic!("TC decap returned {other} on a {}-byte frame", frame.len()),
                };
                (verdict, r.data_size_out)
            }
        };
        out.truncate(len as usize);
        Ok((verdict, out))
    }

    fn try_run_tc(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        let r = self.programs.encap_program().unwrap().test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn run_tc(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run_tc(frame)
            .unwrap_or_else(|e| panic!("TC test_run on a {}-byte frame: {e}", frame.len()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
}

#[derive(Debug)]
enum Expect {
    Pass(Vec<u8>),
    PassUnchanged,
    Drop(CounterIndex),
}

/// Returns false when the kernel refused to run the program on this frame.
fn check_decap(b: &mut Bench, hook: Hook, desc: &str, frame: &[u8], expect: &Expect) -> bool {
    let before = match expect {
        Expect::Drop(c) => b.counter(*c),
        _ => b.counter(CounterIndex::DecapVxlan6),
    };
    let Ok((verdict, out)) = b.run_decap(hook, frame) else {
        return false;
    };
    match expect {
        Expect::Pass(bytes) => {
            assert_eq!(verdict, XDP_PASS, "{hook:?} {desc}: verdict");
            assert_eq!(&out, bytes, "{hook:?} {desc}: output frame");
            assert_eq!(
                b.counter(CounterIndex::DecapVxlan6),
                before + 1,
                "{hook:?} {desc}: counter"
            );
        }
        Expect::PassUnchanged => {
            assert_eq!(verdict, XDP_PASS, "{hook:?} {desc}: verdict");
            assert_eq!(&out, frame, "{hook:?} {desc}: frame must pass untouched");
            assert_eq!(
                b.counter(CounterIndex::DecapVxlan6),
                before,
                "{hook:?} {desc}: nothing decapsulated"
            );
        }
        Expect::Drop(c) => {
            assert_eq!(verdict, XDP_DROP, "{hook:?} {desc}: verdict");
            assert_eq!(b.counter(*c), before + 1, "{hook:?} {desc}: counter {}", c.name());
        }
    }
    true
}

fn in_test_namespace(f: impl FnOnce(u32, [u8; 6]) + Send + 'static) {
    let ns = Netns::new("pk6").expect("namespace");
    let (ifindex, mac) = setup(&ns).expect("test underlay");
    match ns.spawn(move || f(ifindex, mac)).join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e:#}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

// ---- decapsulation ---------------------------------------------------------------------------

fn decap_cases() -> Vec<(String, Vec<u8>, Expect)> {
    let inner = inner_echo(overlay(PEER, 5), overlay(LOCAL, 7), 32);
    let mut cases: Vec<(String, Vec<u8>, Expect)> = vec![];
    let mut add = |d: &str, f: Vec<u8>, e: Expect| cases.push((d.to_string(), f, e));
    let with = |t: Tunnel, inner: &[u8]| t.frame(inner);

    add(
        "valid tunnel packet",
        good_tunnel_frame(&inner),
        Expect::Pass(decapsulated(&inner)),
    );
    add(
        "outer UDP checksum zero (RFC 6935)",
        with(
            Tunnel {
                zero_checksum: true,
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::Pass(decapsulated(&inner)),
    );
    let tcp = inner_tcp(overlay(PEER, 5), overlay(LOCAL, 7), 40000, 100);
    add("inner TCP", good_tunnel_frame(&tcp), Expect::Pass(decapsulated(&tcp)));
    let to_host = inner_echo(overlay(PEER, 5), overlay(LOCAL, 0), 8);
    add(
        "inner destination is our overlay address",
        good_tunnel_frame(&to_host),
        Expect::Pass(decapsulated(&to_host)),
    );
    let mut hbh = options_header(17);
    add(
        "outer Hop-by-Hop options",
        with(
            Tunnel {
                ext: hbh.clone(),
                first_next: 0,
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::Pass(decapsulated(&inner)),
    );
    hbh = options_header(60);
    hbh.extend(options_header(17));
    add(
        "outer Hop-by-Hop then Destination options",
        with(
            Tunnel {
                ext: hbh,
                first_next: 0,
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::Pass(decapsulated(&inner)),
    );
    let mut four = options_header(60);
    four.extend(options_header(60));
    four.extend(options_header(60));
    four.extend(options_header(17));
    add(
        "four outer extension headers (beyond what we walk)",
        with(
            Tunnel {
                ext: four,
                first_next: 0,
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::PassUnchanged,
    );
    add(
        "outer routing header",
        with(
            Tunnel {
                ext: vec![17, 0, 0, 0, 0, 0, 0, 0],
                first_next: 43,
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::PassUnchanged,
    );
    add(
        "outer first fragment on the tunnel port",
        with(
            Tunnel {
                ext: fragment_header(17, 0, true),
                first_next: 44,
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::Drop(CounterIndex::DropFragment),
    );
    add(
        "outer atomic fragment (offset 0, no more) is a whole packet",
        with(
            Tunnel {
                ext: fragment_header(17, 0, false),
                first_next: 44,
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::Pass(decapsulated(&inner)),
    );
    add(
        "outer later fragment (no UDP header to judge)",
        with(
            Tunnel {
                ext: fragment_header(17, 3, false),
                first_next: 44,
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::PassUnchanged,
    );
    add(
        "unknown peer",
        with(
            Tunnel {
                outer_src: public(9),
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::Drop(CounterIndex::DropUnknownPeer),
    );
    add(
        "spoofed inner source (another peer's subnet)",
        good_tunnel_frame(&inner_echo(overlay(COLD_PEER, 5), overlay(LOCAL, 7), 8)),
        Expect::Drop(CounterIndex::DropSpoofedSource),
    );
    add(
        "inner destination outside our subnet",
        good_tunnel_frame(&inner_echo(overlay(PEER, 5), overlay(COLD_PEER, 7), 8)),
        Expect::Drop(CounterIndex::DropNotOurSubnet),
    );
    add(
        "wrong VNI",
        with(
            Tunnel {
                vxlan: vxlan(0x08, 2),
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::Drop(CounterIndex::DropWrongVni),
    );
    add(
        "VXLAN I flag clear",
        with(
            Tunnel {
                vxlan: vxlan(0x00, 1),
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::Drop(CounterIndex::DropWrongVni),
    );
    add(
        "inner frame is IPv4 (flannel-v6 carries IPv6 only)",
        with(
            Tunnel {
                inner_ethertype: 0x0800,
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::Drop(CounterIndex::DropMalformed),
    );
    let mut not_v6 = inner.clone();
    not_v6[0] = 0x45;
    add(
        "inner header is not IPv6",
        good_tunnel_frame(&not_v6),
        Expect::Drop(CounterIndex::DropMalformed),
    );
    let mut too_long = inner.clone();
    too_long[5] += 1;
    add(
        "inner payload length beyond the frame",
        good_tunnel_frame(&too_long),
        Expect::Drop(CounterIndex::DropMalformed),
    );
    add(
        "UDP to another port",
        with(
            Tunnel {
                port: 4789,
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::PassUnchanged,
    );
    add(
        "tunnel port, but addressed to another host",
        with(
            Tunnel {
                outer_dst: public(7),
                ..Tunnel::good()
            },
            &inner,
        ),
        Expect::PassUnchanged,
    );
    let mut tcp_outer = eth(NIC_MAC, REMOTE_NIC_MAC, 0x86dd);
    tcp_outer.extend(ipv6(public(PEER), public(LOCAL), 6, 64, &[], &[0u8; 20]));
    add("TCP", tcp_outer, Expect::PassUnchanged);
    let mut ndp = eth([0x33, 0x33, 0, 0, 0, 1], REMOTE_NIC_MAC, 0x86dd);
    ndp.extend(ipv6(
        public(PEER),
        [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        58,
        255,
        &[],
        &[134, 0, 0, 0, 0, 0, 0, 0],
    ));
    add("neighbour discovery", ndp, Expect::PassUnchanged);
    cases
}

/// Every length a valid tunnel frame can be cut to: until the UDP header is whole we cannot tell
/// it is ours (passed untouched); after that, a short frame is malformed.
fn truncation_cases() -> Vec<(String, Vec<u8>, Expect)> {
    let full = good_tunnel_frame(&inner_echo(overlay(PEER, 5), overlay(LOCAL, 7), 32));
    let udp_end = 14 + 40 + 8;
    (14..full.len())
        .map(|len| {
            let expect = if len < udp_end {
                Expect::PassUnchanged
            } else {
                Expect::Drop(CounterIndex::DropMalformed)
            };
            (
                format!("truncated to {len} of {} bytes", full.len()),
                full[..len].to_vec(),
                expect,
            )
        })
        .collect()
}

#[test]
fn decapsulation_table_v6() {
    in_test_namespace(|ifindex, mac| {
        for hook in [Hook::Xdp, Hook::Tc] {
            let mut b = Bench::new(ifindex, mac).unwrap();
            for (desc, frame, expect) in decap_cases() {
                assert!(
                    check_decap(&mut b, hook, &desc, &frame, &expect),
                    "{hook:?} {desc}: kernel refused the run"
                );
            }
            let mut refused = vec![];
            for (desc, frame, expect) in truncation_cases() {
                if !check_decap(&mut b, hook, &desc, &frame, &expect) {
                    refused.push(frame.len());
                }
            }
            if hook == Hook::Xdp {
                assert!(refused.is_empty(), "XDP refused {refused:?}");
            }
            eprintln!("{hook:?}: kernel refused test runs of {refused:?}-byte frames");
        }
    });
}

// ---- encapsulation ---------------------------------------------------------------------------

#[test]
fn encapsulation_table_v6() {
    in_test_namespace(|ifindex, nic_mac| {
        let mut b = Bench::new(ifindex, nic_mac).unwrap();
        let (src, dst) = (overlay(LOCAL, 2), overlay(PEER, 2));
        // (what, inner packet, outer UDP checksum expected)
        let mut hbh_payload = options_header(58);
        hbh_payload.extend([128, 0, 0, 0, 0, 1, 0, 1]);
        let cases = vec![
            ("ICMPv6 echo", inner_echo(src, dst, 32), true),
            ("TCP segment", inner_tcp(src, dst, 40000, 200), true),
            ("odd-length ICMPv6 payload", inner_echo(src, dst, 33), true),
            (
                "from the host's overlay address",
                inner_echo(overlay(LOCAL, 0), dst, 8),
                true,
            ),
            (
                "inner extension header: no outer checksum",
                ipv6(src, dst, 0, 64, &hbh_payload, &[]),
                false,
            ),
            (
                "full-size packet (the route MTU)",
                inner_echo(src, dst, INNER_MTU as usize - 48),
                true,
            ),
        ];
        for (desc, inner, with_checksum) in &cases {
            let before = b.counter(CounterIndex::EncapVxlan6);
            let (verdict, out) = b.run_tc(&from_overlay_device(inner));
            assert_eq!(
                verdict,
                TC_ACT_REDIRECT,
                "{desc}: verdict; counters {:?}",
                b.programs.counters().unwrap().nonzero()
            );
            assert!(out.len() > 70, "{desc}: output too short: {out:?}");
            let sport = sport_of(&out);
            assert!((32768..61000).contains(&sport), "{desc}: source port {sport}");
            assert_eq!(
                out,
                encapsulated(b.nic_mac, inner, sport, *with_checksum),
                "{desc}: output frame"
            );
            assert_eq!(b.counter(CounterIndex::EncapVxlan6), before + 1, "{desc}: counter");
        }

        // The outer source port follows the inner flow.
        let flow = |port: u16| from_overlay_device(&inner_tcp(src, dst, port, 10));
        let a1 = sport_of(&b.run_tc(&flow(1000)).1);
        assert_eq!(
            a1,
            sport_of(&b.run_tc(&flow(1000)).1),
            "same flow, same outer source port"
        );
        let ports: std::collections::HashSet<u16> = (0..16).map(|i| sport_of(&b.run_tc(&flow(2000 + i)).1)).collect();
        assert!(
            ports.len() >= 8,
            "16 flows gave only {} outer source ports",
            ports.len()
        );

        // Unresolved neighbour: handed to the kernel to resolve.
        let before = b.counter(CounterIndex::EncapVxlan6);
        let (verdict, _) = b.run_tc(&from_overlay_device(&inner_echo(src, overlay(COLD_PEER, 2), 8)));
        assert_eq!(verdict, TC_ACT_REDIRECT, "cold neighbour");
        assert_eq!(
            b.counter(CounterIndex::EncapVxlan6),
            before + 1,
            "cold neighbour counted"
        );

        let drops: Vec<(&str, Vec<u8>, CounterIndex)> = vec![
            (
                "one byte over the route MTU, not GSO",
                from_overlay_device(&inner_echo(src, dst, INNER_MTU as usize - 47)),
                CounterIndex::DropTooBig,
            ),
            (
                "no peer owns the destination",
                from_overlay_device(&inner_echo(src, overlay(9, 2), 8)),
                CounterIndex::DropNoPeer,
            ),
            (
                "peer without a route",
                from_overlay_device(&inner_echo(src, overlay(4, 2), 8)),
                CounterIndex::DropNoRoute,
            ),
            (
                "multicast (the device's own chatter)",
                from_overlay_device(&inner_echo(
                    src,
                    [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16],
                    8,
                )),
                CounterIndex::DropNoPeer,
            ),
            (
                "IPv6 EtherType, version 4 header",
                {
                    let mut i = inner_echo(src, dst, 8);
                    i[0] = 0x45;
                    from_overlay_device(&i)
                },
                CounterIndex::DropNotIpv4,
            ),
        ];
        for (desc, frame, counter) in drops {
            let before = b.counter(counter);
            let (verdict, _) = b.run_tc(&frame);
            assert_eq!(verdict, TC_ACT_SHOT, "{desc}: verdict");
            assert_eq!(b.counter(counter), before + 1, "{desc}: counter {}", counter.name());
        }

        // Every cut of the inner IPv6 header: refused by the kernel's test run, or dropped.
        let full = from_overlay_device(&inner_echo(src, dst, 8));
        let mut refused = vec![];
        for len in 15..54 {
            let before = b.counter(CounterIndex::DropNotIpv4);
            let Ok((verdict, _)) = b.try_run_tc(&full[..len]) else {
                refused.push(len);
                continue;
            };
            assert_eq!(verdict, TC_ACT_SHOT, "inner header cut to {len}");
            assert_eq!(b.counter(CounterIndex::DropNotIpv4), before + 1, "cut to {len}");
        }
        eprintln!("kernel refused test runs of {refused:?}-byte frames");
    });
}

/// IPv6 off (the v6 config slot empty): IPv6 frames on the overlay device are dropped as a
/// family we do not carry, and tunnel packets over IPv6 pass untouched.
#[test]
fn ipv6_off_leaves_ipv6_alone() {
    in_test_namespace(|_, _| {
        let mut programs = Programs::load().unwrap();
        let mut out = vec![0u8; 512];
        let frame = from_overlay_device(&inner_echo(overlay(LOCAL, 2), overlay(PEER, 2), 8));
        let r = programs
            .encap_program()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r.return_value, TC_ACT_SHOT);
        assert_eq!(programs.counters().unwrap().get(CounterIndex::DropNotIpv4).packets, 1);
        let tunnel = good_tunnel_frame(&inner_echo(overlay(PEER, 5), overlay(LOCAL, 7), 8));
        let r = programs
            .decap_program()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(&tunnel),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r.return_value, XDP_PASS);
    });
}

// ---- IPv6-only: IPv4 off -----------------------------------------------------------------------

/// The Internet checksum of an IPv4 header, as the sender fills it.
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend(((20 + payload.len()) as u16).to_be_bytes());
    h.extend([0, 1, 0x40, 0, 64, proto, 0, 0]);
    h.extend(src);
    h.extend(dst);
    let c = fold(sum(&h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend(payload);
    h
}

fn inner_echo4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x42, 0x42, 0, 1];
    icmp.extend((0..16).map(|i| i as u8));
    let c = fold(sum(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 1, &icmp)
}

const PUBLIC4_LOCAL: [u8; 4] = [192, 168, 0, 1];
const PUBLIC4_PEER: [u8; 4] = [192, 168, 0, 2];

/// A VXLAN-over-IPv4 frame from the IPv4 peer to our former PublicIP.
fn tunnel4_frame(inner: &[u8]) -> Vec<u8> {
    let mut payload = vxlan(0x08, 1);
    payload.extend(eth(LOCAL_VTEP, PEER_VTEP, 0x0800));
    payload.extend(inner);
    let mut f = eth(NIC_MAC, REMOTE_NIC_MAC, 0x0800);
    f.extend(ipv4(PUBLIC4_PEER, PUBLIC4_LOCAL, 17, &udp(45678, 8472, &payload, 0)));
    f
}

/// An IPv6-only network's datapath writes `DatapathConfig::IPV4_OFF` over whatever IPv4 config
/// was there (a pinned dual-stack run's, whose IPv4 peer is still in the maps here). The same
/// IPv4 frames that the dual-stack config encapsulates and decapsulates are then left alone:
/// tunnel packets pass untouched on both hooks, packets on the overlay device are dropped as
/// unconfigured; IPv6 is carried as before.
#[test]
fn ipv6_only_config_leaves_ipv4_alone_and_carries_ipv6() {
    let ns = Netns::new("pk6o").expect("namespace");
    let (ifindex, nic_mac) = setup(&ns).expect("test underlay");
    // The IPv4 underlay of the dual-stack run before (route lookups need forwarding on).
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns.ip(&["addr", "add", "192.168.0.1/24", "dev", "nic0"]).unwrap();
    ns.ip(&[
        "neigh", "replace", "192.168.0.2", "lladdr", "02:aa:00:00:00:02", "dev", "nic0", "nud", "permanent",
    ])
    .unwrap();
    let run = ns.spawn(move || -> anyhow::Result<()> {
        let mut b = Bench::new(ifindex, nic_mac)?;
        b.programs.set_config(&overlay_common::DatapathConfig {
            public_ip: PUBLIC4_LOCAL,
            subnet_addr: [10, 244, 1, 0],
            subnet_prefix_len: 24,
            format: overlay_common::Format::Vxlan as u8,
            port: 8472,
            vni: 1,
            vtep_mac: LOCAL_VTEP,
            _pad: [0; 2],
            underlay_ifindex: ifindex,
        })?;
        b.programs.upsert_peer(&overlay::backend::Peer {
            subnet: "10.244.2.0/24".parse()?,
            public_ip: PUBLIC4_PEER.into(),
            vtep_mac: Some(MacAddr(PEER_VTEP)),
            ipv6: None,
        })?;
        let tunnel4 = tunnel4_frame(&inner_echo4([10, 244, 2, 5], [10, 244, 1, 7]));
        let mut out4 = eth(OVERLAY_MAC, OVERLAY_MAC, 0x0800);
        out4.extend(inner_echo4([10, 244, 1, 7], [10, 244, 2, 5]));

        // With the dual-stack config the frames are ones the programs carry.
        for hook in [Hook::Xdp, Hook::Tc] {
            let before = b.counter(CounterIndex::DecapVxlan);
            let (verdict, out) = b.run_decap(hook, &tunnel4)?;
            assert_eq!(verdict, XDP_PASS, "{hook:?}");
            assert_ne!(out, tunnel4, "{hook:?}: decapsulated with IPv4 on");
            assert_eq!(b.counter(CounterIndex::DecapVxlan), before + 1, "{hook:?}");
        }
        let (verdict, _) = b.run_tc(&out4);
        assert_eq!(
            verdict,
            TC_ACT_REDIRECT,
            "IPv4 encapsulated with IPv4 on: {}",
            b.programs.counters()?.to_json()
        );
        assert_eq!(b.counter(CounterIndex::EncapVxlan), 1);

        b.programs.set_config(&overlay_common::DatapathConfig::IPV4_OFF)?;
        for hook in [Hook::Xdp, Hook::Tc] {
            assert!(check_decap(
                &mut b,
                hook,
                "IPv4 tunnel packet, IPv4 off",
                &tunnel4,
                &Expect::PassUnchanged
            ));
            let inner = inner_echo(overlay(PEER, 5), overlay(LOCAL, 7), 32);
            assert!(check_decap(
                &mut b,
                hook,
                "IPv6 tunnel packet, IPv4 off",
                &good_tunnel_frame(&inner),
                &Expect::Pass(decapsulated(&inner))
            ));
        }
        assert_eq!(
            b.counter(CounterIndex::DecapVxlan),
            2,
            "no IPv4 decapsulated with IPv4 off"
        );
        let (verdict, _) = b.run_tc(&out4);
        assert_eq!(verdict, TC_ACT_SHOT, "IPv4 on the overlay device, IPv4 off");
        assert_eq!(b.counter(CounterIndex::DropNoConfig), 1);
        assert_eq!(b.counter(CounterIndex::EncapVxlan), 1);

        let inner = inner_echo(overlay(LOCAL, 2), overlay(PEER, 2), 32);
        let (verdict, out) = b.run_tc(&from_overlay_device(&inner));
        assert_eq!(verdict, TC_ACT_REDIRECT, "IPv6 encapsulated with IPv4 off");
        assert_eq!(out, encapsulated(nic_mac, &inner, sport_of(&out), true));
        assert_eq!(b.counter(CounterIndex::EncapVxlan6), 1);
        Ok(())
    });
    match run.join() {
        Ok(r) => r.and_then(|r| r).unwrap(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
