//! Packet tests: the programs run in the kernel through BPF_PROG_TEST_RUN on hand-built frames.
//! Each case names its input, the verdict it must get, the exact output frame (or "unchanged"),
//! and the counter it must move. Expected frames are built here byte by byte, independently of
//! overlay-common's header builders, so a mistake there cannot hide itself.
use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use overlay::{
    backend::{Peer, ebpf::Programs},
    host::MacAddr,
};
use overlay_common::{CounterIndex, DatapathConfig, Format};
use overlay_tests::netns::Netns;

/// "Go on": the next program on the hook, then the stack (as u32, how test_run returns it).
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const LOCAL_IP: [u8; 4] = [192, 168, 250, 1];
const PEER_IP: [u8; 4] = [192, 168, 250, 2];
/// A peer on the underlay whose neighbour entry is not resolved yet.
const COLD_PEER_IP: [u8; 4] = [192, 168, 250, 3];
/// A peer with no route at all.
const UNROUTABLE_PEER_IP: [u8; 4] = [10, 99, 0, 1];
const PEER_NEIGH_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x02];
const LOCAL_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const PEER_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const OVERLAY_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
const NIC_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x01];
const REMOTE_NIC_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x02];

const LOCAL_CONTAINER: [u8; 4] = [10, 244, 1, 2];
const PEER_CONTAINER: [u8; 4] = [10, 244, 2, 2];

// ---- independent frame building -------------------------------------------------------------

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from(chunk[0]) << 8
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut v = dst.to_vec();
    v.extend(src);
    v.extend(ethertype.to_be_bytes());
    v
}

struct Ip {
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    options: Vec<u8>,
    frag: u16,
    ttl: u8,
    id: u16,
}

impl Ip {
    fn new(src: [u8; 4], dst: [u8; 4], proto: u8) -> Self {
        Ip {
            src,
            dst,
            proto,
            options: vec![],
            frag: 0,
            ttl: 63,
            id: 0x1234,
        }
    }

    fn build(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = 20 + self.options.len();
        assert_eq!(hlen % 4, 0);
        let total = (hlen + payload.len()) as u16;
        let mut h = vec![0x40 | (hlen / 4) as u8, 0];
        h.extend(total.to_be_bytes());
        h.extend(self.id.to_be_bytes());
        h.extend(self.frag.to_be_bytes());
        h.extend([self.ttl, self.proto, 0, 0]);
        h.extend(self.src);
        h.extend(self.dst);
        h.extend(&self.options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend(payload);
        h
    }
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = sport.to_be_bytes().to_vec();
    v.extend(dport.to_be_bytes());
    v.extend(((8 + payload.len()) as u16).to_be_bytes());
    v.extend([0, 0]);
    v.extend(payload);
    v
}

fn vxlan(flags: u8, vni: u32) -> Vec<u8> {
    let mut v = vec![flags, 0, 0, 0];
    v.extend(((vni & 0xff_ffff) << 8).to_be_bytes());
    v
}

/// An ICMP echo request, the inner packet of most cases.
fn icmp_echo(len: usize) -> Vec<u8> {
    let mut v = vec![8, 0, 0, 0, 0x42, 0x42, 0, 1];
    v.extend((0..len).map(|i| i as u8));
    let c = checksum(&v);
    v[2..4].copy_from_slice(&c.to_be_bytes());
    v
}

fn inner_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    Ip::new(src, dst, 1).build(&icmp_echo(32))
}

/// A tunnel frame as a peer would send it to us.
fn tunnel_frame(format: Format, outer_src: [u8; 4], outer: &Ip, vni_hdr: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![];
    let port = match format {
        Format::Udp => 8285,
        Format::Vxlan => {
            payload.extend(vni_hdr);
            payload.extend(eth(LOCAL_VTEP, PEER_VTEP, 0x0800));
            8472
        }
    };
    payload.extend(inner);
    let mut ip = Ip {
        src: outer_src,
        ..Ip::new(outer_src, outer.dst, 17)
    };
    ip.options = outer.options.clone();
    ip.frag = outer.frag;
    let mut f = eth(NIC_MAC, REMOTE_NIC_MAC, 0x0800);
    f.extend(ip.build(&udp(45678, port, &payload)));
    f
}

fn good_tunnel_frame(format: Format, inner: &[u8]) -> Vec<u8> {
    tunnel_frame(format, PEER_IP, &Ip::new(PEER_IP, LOCAL_IP, 17), &vxlan(0x08, 1), inner)
}

/// What either decap program must hand to the stack after decapsulation.
fn decapsulated(inner: &[u8]) -> Vec<u8> {
    let mut f = eth(NIC_MAC, REMOTE_NIC_MAC, 0x0800);
    f.extend(inner);
    f
}

/// What our TC program must produce for `inner` towards PEER_IP, with the outer source port
/// left to the caller (it is a hash of the inner flow).
fn encapsulated(format: Format, outer_eth: Vec<u8>, peer_ip: [u8; 4], inner: &[u8], sport: u16) -> Vec<u8> {
    let mut payload = vec![];
    let port = match format {
        Format::Udp => 8285,
        Format::Vxlan => {
            payload.extend(vxlan(0x08, 1));
            payload.extend(eth(PEER_VTEP, LOCAL_VTEP, 0x0800));
            8472
        }
    };
    payload.extend(inner);
    let ip = Ip {
        frag: 0x4000,
        ttl: 64,
        id: 0,
        ..Ip::new(LOCAL_IP, peer_ip, 17)
    };
    let mut f = outer_eth;
    f.extend(ip.build(&udp(sport, port, &payload)));
    f
}

// ---- harness ---------------------------------------------------------------------------------

struct Bench {
    programs: Programs,
    nic_mac: [u8; 6],
}

fn config(format: Format, ifindex: u32) -> DatapathConfig {
    DatapathConfig {
        public_ip: LOCAL_IP,
        subnet_addr: [10, 244, 1, 0],
        subnet_prefix_len: 24,
        format: format as u8,
        port: format.default_port(),
        vni: 1,
        vtep_mac: LOCAL_VTEP,
        _pad: [0; 2],
        underlay_ifindex: ifindex,
    }
}

/// Programs loaded, peers in the maps, and an underlay in the current (test) namespace: the
/// encap program's route lookup runs in the namespace of the thread that calls test_run.
fn setup(ns: &Netns) -> anyhow::Result<(u32, [u8; 6])> {
    // bpf_fib_lookup answers only on interfaces that forward; the loader enables forwarding.
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.ip(&["link", "add", "nic0", "type", "veth", "peer", "name", "nic1"])?;
    ns.ip(&["link", "set", "nic0", "up"])?;
    ns.ip(&["link", "set", "nic1", "up"])?;
    ns.ip(&["addr", "add", "192.168.250.1/24", "dev", "nic0"])?;
    ns.ip(&[
        "neigh", "replace", "192.168.250.2", "lladdr", "02:aa:00:00:00:02", "dev", "nic0", "nud", "permanent",
    ])?;
    let out = ns.ip(&["-j", "link", "show", "nic0"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let ifindex = v[0]["ifindex"].as_u64().unwrap() as u32;
    let mac: MacAddr = v[0]["address"].as_str().unwrap().parse().map_err(anyhow::Error::msg)?;
    Ok((ifindex, mac.0))
}

impl Bench {
    fn new(format: Format, nic_ifindex: u32, nic_mac: [u8; 6]) -> anyhow::Result<Self> {
        let mut programs = Programs::load()?;
        programs.set_config(&config(format, nic_ifindex))?;
        for ip in [PEER_IP, COLD_PEER_IP, UNROUTABLE_PEER_IP] {
            let third = if ip == PEER_IP {
                2
            } else if ip == COLD_PEER_IP {
                3
            } else {
                4
            };
            programs.upsert_peer(&Peer {
                subnet: format!("10.244.{third}.0/24").parse()?,
                public_ip: Ipv4Addr::from(ip),
                vtep_mac: Some(MacAddr(PEER_VTEP)),
                ipv6: None,
            })?;
        }
        Ok(Bench { programs, nic_mac })
    }

    fn counter(&mut self, c: CounterIndex) -> u64 {
        self.programs.counters().unwrap().get(c).packets
    }

    fn run_xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.programs.decap_program().unwrap();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("XDP test_run on a {}-byte frame: {e}", frame.len()));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Run one of the two decap programs; verdicts come back as XDP_PASS / XDP_DROP for both, so
    /// one table judges both. Err: the kernel refused the test run (TC wants more than an
    /// Ethernet header for some frames).
    fn run_decap(&mut self, hook: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        match hook {
            Hook::Xdp => Ok(self.run_xdp(frame)),
            Hook::Tc => {
                let mut out = vec![0u8; frame.len() + 256];
                let prog = self.programs.decap_tc_program().unwrap();
                let r = prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ..Default::default()
                })?;
                out.truncate(r.data_size_out as usize);
                let verdict = match r.return_value {
                    TC_ACT_UNSPEC => XDP_PASS,
                    TC_ACT_SHOT => XDP_DROP,
                    other => panic!("TC decap returned {other} on a {}-byte frame", frame.len()),
                };
                Ok((verdict, out))
            }
        }
    }

    fn run_tc(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run_tc(frame)
            .unwrap_or_else(|e| panic!("TC test_run on a {}-byte frame: {e}", frame.len()))
    }

    fn try_run_tc(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.programs.encap_program().unwrap();
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }
}

#[derive(Debug)]
enum Expect {
    /// Passed on with these exact bytes.
    Pass(Vec<u8>),
    PassUnchanged,
    Drop(CounterIndex),
}

/// The two decap entry points, judged by one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
}

/// Returns false when the kernel refused to run the program on this frame.
fn check_decap(b: &mut Bench, hook: Hook, format: Format, desc: &str, frame: &[u8], expect: &Expect) -> bool {
    let desc = &format!("{hook:?} {desc}");
    let before = match expect {
        Expect::Drop(c) => b.counter(*c),
        _ => b.counter(CounterIndex::decap(format)),
    };
    let Ok((verdict, out)) = b.run_decap(hook, frame) else {
        return false;
    };
    match expect {
        Expect::Pass(bytes) => {
            assert_eq!(verdict, XDP_PASS, "{format:?} {desc}: verdict");
            assert_eq!(&out, bytes, "{format:?} {desc}: output frame");
            assert_eq!(
                b.counter(CounterIndex::decap(format)),
                before + 1,
                "{format:?} {desc}: decap counter"
            );
        }
        Expect::PassUnchanged => {
            assert_eq!(verdict, XDP_PASS, "{format:?} {desc}: verdict");
            assert_eq!(&out, frame, "{format:?} {desc}: frame must pass untouched");
            assert_eq!(
                b.counter(CounterIndex::decap(format)),
                before,
                "{format:?} {desc}: nothing decapsulated"
            );
        }
        Expect::Drop(c) => {
            assert_eq!(verdict, XDP_DROP, "{format:?} {desc}: verdict");
            assert_eq!(b.counter(*c), before + 1, "{format:?} {desc}: counter {}", c.name());
        }
    }
    true
}

fn in_test_namespace(f: impl FnOnce(u32, [u8; 6]) + Send + 'static) {
    let ns = Netns::new("pkt").expect("namespace");
    let (ifindex, mac) = setup(&ns).expect("test underlay");
    let r = ns.spawn(move || f(ifindex, mac)).join();
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e:#}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

// ---- decapsulation ---------------------------------------------------------------------------

fn decap_cases(format: Format) -> Vec<(String, Vec<u8>, Expect)> {
    let inner = inner_packet(PEER_CONTAINER, LOCAL_CONTAINER);
    let mut cases: Vec<(String, Vec<u8>, Expect)> = vec![];
    let mut add = |d: &str, f: Vec<u8>, e: Expect| cases.push((d.to_string(), f, e));

    add(
        "valid tunnel packet",
        good_tunnel_frame(format, &inner),
        Expect::Pass(decapsulated(&inner)),
    );

    let outer_opts = Ip {
        options: vec![0x01, 0x01, 0x01, 0x00],
        ..Ip::new(PEER_IP, LOCAL_IP, 17)
    };
    add(
        "outer IPv4 options",
        tunnel_frame(format, PEER_IP, &outer_opts, &vxlan(0x08, 1), &inner),
        Expect::Pass(decapsulated(&inner)),
    );
    let inner_opts = Ip {
        options: vec![0x94, 0x04, 0, 0],
        ..Ip::new(PEER_CONTAINER, LOCAL_CONTAINER, 1)
    }
    .build(&icmp_echo(40));
    add(
        "inner IPv4 options",
        good_tunnel_frame(format, &inner_opts),
        Expect::Pass(decapsulated(&inner_opts)),
    );
    let inner_frag = Ip {
        frag: 0x2000,
        ..Ip::new(PEER_CONTAINER, LOCAL_CONTAINER, 17)
    }
    .build(&[7u8; 64]);
    add(
        "inner fragment is ordinary payload",
        good_tunnel_frame(format, &inner_frag),
        Expect::Pass(decapsulated(&inner_frag)),
    );
    let to_host = inner_packet(PEER_CONTAINER, [10, 244, 1, 0]);
    add(
        "inner destination is our overlay address",
        good_tunnel_frame(format, &to_host),
        Expect::Pass(decapsulated(&to_host)),
    );

    add(
        "unknown peer",
        tunnel_frame(
            format,
            [192, 168, 250, 9],
            &Ip::new([192, 168, 250, 9], LOCAL_IP, 17),
            &vxlan(0x08, 1),
            &inner,
        ),
        Expect::Drop(CounterIndex::DropUnknownPeer),
    );
    add(
        "spoofed inner source (another peer's subnet)",
        good_tunnel_frame(format, &inner_packet([10, 244, 3, 5], LOCAL_CONTAINER)),
        Expect::Drop(CounterIndex::DropSpoofedSource),
    );
    add(
        "inner destination outside our subnet",
        good_tunnel_frame(format, &inner_packet(PEER_CONTAINER, [10, 244, 3, 5])),
        Expect::Drop(CounterIndex::DropNotOurSubnet),
    );
    let first_frag = Ip {
        frag: 0x2000,
        ..Ip::new(PEER_IP, LOCAL_IP, 17)
    };
    add(
        "outer first fragment on the tunnel port",
        tunnel_frame(format, PEER_IP, &first_frag, &vxlan(0x08, 1), &inner),
        Expect::Drop(CounterIndex::DropFragment),
    );
    let later_frag = Ip {
        frag: 0x0010,
        ..Ip::new(PEER_IP, LOCAL_IP, 17)
    };
    add(
        "outer non-first fragment (no UDP header to judge)",
        tunnel_frame(format, PEER_IP, &later_frag, &vxlan(0x08, 1), &inner),
        Expect::PassUnchanged,
    );
    let mut other_port = eth(NIC_MAC, REMOTE_NIC_MAC, 0x0800);
    other_port.extend(Ip::new(PEER_IP, LOCAL_IP, 17).build(&udp(5000, 53, &inner)));
    add("UDP to another port", other_port, Expect::PassUnchanged);
    let mut tcp = eth(NIC_MAC, REMOTE_NIC_MAC, 0x0800);
    tcp.extend(Ip::new(PEER_IP, LOCAL_IP, 6).build(&[0u8; 20]));
    add("TCP", tcp, Expect::PassUnchanged);
    let mut arp = eth([0xff; 6], REMOTE_NIC_MAC, 0x0806);
    arp.extend([0u8; 28]);
    add("ARP", arp, Expect::PassUnchanged);
    let mut v6 = eth(NIC_MAC, REMOTE_NIC_MAC, 0x86dd);
    v6.extend([0x60, 0, 0, 0, 0, 8, 17, 64]);
    v6.extend([0u8; 40]);
    add("IPv6", v6, Expect::PassUnchanged);
    add(
        "tunnel port, but addressed to another host",
        tunnel_frame(
            format,
            PEER_IP,
            &Ip::new(PEER_IP, [192, 168, 250, 7], 17),
            &vxlan(0x08, 1),
            &inner,
        ),
        Expect::PassUnchanged,
    );
    let mut bad_version = good_tunnel_frame(format, &inner);
    let inner_at = bad_version.len() - inner.len();
    bad_version[inner_at] = 0x65;
    add(
        "inner header is not IPv4",
        bad_version,
        Expect::Drop(CounterIndex::DropMalformed),
    );

    if format == Format::Vxlan {
        add(
            "wrong VNI",
            tunnel_frame(
                format,
                PEER_IP,
                &Ip::new(PEER_IP, LOCAL_IP, 17),
                &vxlan(0x08, 2),
                &inner,
            ),
            Expect::Drop(CounterIndex::DropWrongVni),
        );
        add(
            "VXLAN I flag clear",
            tunnel_frame(
                format,
                PEER_IP,
                &Ip::new(PEER_IP, LOCAL_IP, 17),
                &vxlan(0x00, 1),
                &inner,
            ),
            Expect::Drop(CounterIndex::DropWrongVni),
        );
        let mut arp_inside = good_tunnel_frame(format, &inner);
        let et = arp_inside.len() - inner.len() - 2;
        arp_inside[et..et + 2].copy_from_slice(&0x0806u16.to_be_bytes());
        add(
            "inner frame is not IPv4",
            arp_inside,
            Expect::Drop(CounterIndex::DropMalformed),
        );
    }
    cases
}

/// Every length a valid tunnel frame can be cut to: before the UDP header is complete we cannot
/// know it is ours (pass untouched); after that, a short frame is malformed.
fn truncation_cases(format: Format) -> Vec<(String, Vec<u8>, Expect)> {
    let inner = inner_packet(PEER_CONTAINER, LOCAL_CONTAINER);
    let full = good_tunnel_frame(format, &inner);
    let udp_end = 14 + 20 + 8;
    // XDP test runs need at least an Ethernet header.
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
fn decapsulation_table() {
    in_test_namespace(|ifindex, mac| {
        for hook in [Hook::Xdp, Hook::Tc] {
            for format in [Format::Udp, Format::Vxlan] {
                let mut b = Bench::new(format, ifindex, mac).unwrap();
                let mut n = 0;
                for (desc, frame, expect) in decap_cases(format) {
                    assert!(
                        check_decap(&mut b, hook, format, &desc, &frame, &expect),
                        "{hook:?} {format:?} {desc}: kernel refused the test run"
                    );
                    n += 1;
                }
                // Cut frames: the skb test run refuses some (it wants whole headers, as the
                // stack guarantees at TC ingress); the rest must get the XDP verdicts.
                let mut refused = vec![];
                for (desc, frame, expect) in truncation_cases(format) {
                    if check_decap(&mut b, hook, format, &desc, &frame, &expect) {
                        n += 1;
                    } else {
                        assert_eq!(hook, Hook::Tc, "{format:?} {desc}: XDP test run refused");
                        refused.push(frame.len());
                    }
                }
                assert!(
                    refused.iter().all(|&len| len < 14 + 20),
                    "{hook:?} {format:?}: refused frames longer than Ethernet + IPv4: {refused:?}"
                );
                if !refused.is_empty() {
                    eprintln!("{hook:?} {format:?}: kernel refused test runs of {refused:?}-byte frames");
                }
                assert!(n > 40, "{hook:?} {format:?}: only {n} cases ran");
            }
        }
    });
}

// ---- encapsulation ---------------------------------------------------------------------------

fn from_overlay_device(inner: &[u8]) -> Vec<u8> {
    let mut f = eth(OVERLAY_MAC, OVERLAY_MAC, 0x0800);
    f.extend(inner);
    f
}

fn sport_of(out: &[u8]) -> u16 {
    u16::from_be_bytes([out[34], out[35]])
}

#[test]
fn encapsulation_table() {
    in_test_namespace(|ifindex, nic_mac| {
        for format in [Format::Udp, Format::Vxlan] {
            let mut b = Bench::new(format, ifindex, nic_mac).unwrap();
            let resolved_eth = eth(PEER_NEIGH_MAC, b.nic_mac, 0x0800);

            let mut inners = vec![
                ("ICMP echo", inner_packet(LOCAL_CONTAINER, PEER_CONTAINER)),
                (
                    "inner IPv4 options",
                    Ip {
                        options: vec![0x94, 0x04, 0, 0],
                        ..Ip::new(LOCAL_CONTAINER, PEER_CONTAINER, 1)
                    }
                    .build(&icmp_echo(8)),
                ),
                (
                    "inner fragment",
                    Ip {
                        frag: 0x2001,
                        ..Ip::new(LOCAL_CONTAINER, PEER_CONTAINER, 17)
                    }
                    .build(&[1u8; 24]),
                ),
                (
                    "from the host's overlay address",
                    inner_packet([10, 244, 1, 0], PEER_CONTAINER),
                ),
            ];
            inners.push((
                "full-size packet",
                Ip::new(LOCAL_CONTAINER, PEER_CONTAINER, 17).build(&vec![9u8; 1500 - 50 - 20]),
            ));
            for (desc, inner) in &inners {
                let before = b.counter(CounterIndex::encap(format));
                let (verdict, out) = b.run_tc(&from_overlay_device(inner));
                assert_eq!(
                    verdict,
                    TC_ACT_REDIRECT,
                    "{format:?} {desc}: verdict; counters {:?}",
                    b.programs.counters().unwrap().nonzero()
                );
                assert!(out.len() > 36, "{format:?} {desc}: output too short: {out:?}");
                let sport = sport_of(&out);
                assert!(
                    (32768..61000).contains(&sport),
                    "{format:?} {desc}: source port {sport}"
                );
                let expected = encapsulated(format, resolved_eth.clone(), PEER_IP, inner, sport);
                assert_eq!(out, expected, "{format:?} {desc}: output frame");
                assert_eq!(
                    b.counter(CounterIndex::encap(format)),
                    before + 1,
                    "{format:?} {desc}: counter"
                );
            }

            // The source port follows the inner flow: stable for one flow, spread over flows.
            let flow = |port: u16| {
                let inner = Ip::new(LOCAL_CONTAINER, PEER_CONTAINER, 17).build(&udp(port, 80, &[0u8; 16]));
                from_overlay_device(&inner)
            };
            let a1 = sport_of(&b.run_tc(&flow(1000)).1);
            let a2 = sport_of(&b.run_tc(&flow(1000)).1);
            assert_eq!(a1, a2, "{format:?}: same flow, same outer source port");
            let ports: std::collections::HashSet<u16> =
                (0..16).map(|i| sport_of(&b.run_tc(&flow(2000 + i)).1)).collect();
            assert!(
                ports.len() >= 8,
                "{format:?}: 16 flows gave only {} outer source ports",
                ports.len()
            );
            // Only real ports count: echoes whose checksums differ are one flow, and every
            // fragment of a datagram leaves on the same port as its first one.
            let echo = |len| from_overlay_device(&Ip::new(LOCAL_CONTAINER, PEER_CONTAINER, 1).build(&icmp_echo(len)));
            assert_eq!(
                sport_of(&b.run_tc(&echo(8)).1),
                sport_of(&b.run_tc(&echo(40)).1),
                "{format:?}: two echoes of one ICMP flow"
            );
            let fragment = |frag: u16| {
                let ip = Ip {
                    frag,
                    ..Ip::new(LOCAL_CONTAINER, PEER_CONTAINER, 17)
                };
                from_overlay_device(&ip.build(&udp(1000 + frag, 80, &[0u8; 16])))
            };
            assert_eq!(
                sport_of(&b.run_tc(&fragment(0x2000)).1),
                sport_of(&b.run_tc(&fragment(0x0003)).1),
                "{format:?}: first and last fragment of one datagram"
            );

            // Peer whose neighbour is not resolved: handed to the kernel to resolve
            // (bpf_redirect_neigh), outer Ethernet left for it to fill.
            let inner = inner_packet(LOCAL_CONTAINER, [10, 244, 3, 2]);
            let (verdict, out) = b.run_tc(&from_overlay_device(&inner));
            assert_eq!(verdict, TC_ACT_REDIRECT, "{format:?}: cold neighbour");
            let expected = encapsulated(
                format,
                eth(OVERLAY_MAC, OVERLAY_MAC, 0x0800),
                COLD_PEER_IP,
                &inner,
                sport_of(&out),
            );
            assert_eq!(out, expected, "{format:?}: cold neighbour frame");

            let drops: Vec<(&str, Vec<u8>, CounterIndex)> = vec![
                (
                    "no peer for the destination",
                    from_overlay_device(&inner_packet(LOCAL_CONTAINER, [10, 244, 9, 9])),
                    CounterIndex::DropNoPeer,
                ),
                (
                    "peer without a route",
                    from_overlay_device(&inner_packet(LOCAL_CONTAINER, [10, 244, 4, 2])),
                    CounterIndex::DropNoRoute,
                ),
                (
                    "ARP frame",
                    {
                        let mut f = eth([0xff; 6], OVERLAY_MAC, 0x0806);
                        f.extend([0u8; 28]);
                        f
                    },
                    CounterIndex::DropNotIpv4,
                ),
                (
                    "IPv6 frame",
                    {
                        let mut f = eth(OVERLAY_MAC, OVERLAY_MAC, 0x86dd);
                        f.extend([0x60u8; 40]);
                        f
                    },
                    CounterIndex::DropNotIpv4,
                ),
                (
                    "IPv4 header length below 20",
                    {
                        let mut i = inner_packet(LOCAL_CONTAINER, PEER_CONTAINER);
                        i[0] = 0x44;
                        from_overlay_device(&i)
                    },
                    CounterIndex::DropNotIpv4,
                ),
                (
                    "IPv4 ethertype, version 6 header",
                    {
                        let mut i = inner_packet(LOCAL_CONTAINER, PEER_CONTAINER);
                        i[0] = 0x65;
                        from_overlay_device(&i)
                    },
                    CounterIndex::DropNotIpv4,
                ),
            ];
            for (desc, frame, counter) in drops {
                let before = b.counter(counter);
                let (verdict, _) = b.run_tc(&frame);
                assert_eq!(verdict, TC_ACT_SHOT, "{format:?} {desc}: verdict");
                assert_eq!(
                    b.counter(counter),
                    before + 1,
                    "{format:?} {desc}: counter {}",
                    counter.name()
                );
            }

            // Every cut of the inner IPv4 header: refused by the kernel's skb test run (it wants a
            // whole IPv4 header, as the stack guarantees on egress), or dropped and counted.
            let full = from_overlay_device(&inner_packet(LOCAL_CONTAINER, PEER_CONTAINER));
            let mut refused = vec![];
            for len in 15..34 {
                let before = b.counter(CounterIndex::DropNotIpv4);
                let Ok((verdict, _)) = b.try_run_tc(&full[..len]) else {
                    refused.push(len);
                    continue;
                };
                assert_eq!(verdict, TC_ACT_SHOT, "{format:?}: inner header cut to {len}");
                assert_eq!(
                    b.counter(CounterIndex::DropNotIpv4),
                    before + 1,
                    "{format:?}: cut to {len}"
                );
            }
            eprintln!("{format:?}: kernel refused test runs of {refused:?}-byte frames");
        }
    });
}

/// A config map left empty (datapath loaded but not configured) must not let packets through
/// unencapsulated: egress drops and counts, ingress passes everything (it cannot know the port).
#[test]
fn unconfigured_datapath_is_safe() {
    in_test_namespace(|_, _| {
        let mut programs = Programs::load().unwrap();
        let frame = from_overlay_device(&inner_packet(LOCAL_CONTAINER, PEER_CONTAINER));
        let mut out = vec![0u8; 256];
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
        assert_eq!(programs.counters().unwrap().get(CounterIndex::DropNoConfig).packets, 1);
        let tunnel = good_tunnel_frame(Format::Vxlan, &inner_packet(PEER_CONTAINER, LOCAL_CONTAINER));
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
        let r = programs
            .decap_tc_program()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(&tunnel),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r.return_value, TC_ACT_UNSPEC);
    });
}

/// Two leases of one host (same PublicIP: it leased a new subnet while the old lease lives on):
/// removing the old one keeps tunnel traffic from the new one accepted, and removing an entry
/// that is already gone is not an error.
#[test]
fn removing_an_old_lease_keeps_the_hosts_new_one() {
    in_test_namespace(|ifindex, nic_mac| {
        let mut b = Bench::new(Format::Vxlan, ifindex, nic_mac).unwrap();
        let old = Peer {
            subnet: "10.244.2.0/24".parse().unwrap(),
            public_ip: Ipv4Addr::from(PEER_IP),
            vtep_mac: Some(MacAddr(PEER_VTEP)),
            ipv6: None,
        };
        let new = Peer {
            subnet: "10.244.9.0/24".parse().unwrap(),
            ..old
        };
        b.programs.upsert_peer(&new).unwrap();
        b.programs.remove_peer(&old).unwrap();
        b.programs.remove_peer(&old).unwrap();
        let from_new = good_tunnel_frame(Format::Vxlan, &inner_packet([10, 244, 9, 5], LOCAL_CONTAINER));
        let before = b.counter(CounterIndex::DecapVxlan);
        assert_eq!(b.run_xdp(&from_new).0, XDP_PASS);
        assert_eq!(
            b.counter(CounterIndex::DecapVxlan),
            before + 1,
            "new lease's traffic decapsulated"
        );
        let from_old = good_tunnel_frame(Format::Vxlan, &inner_packet(PEER_CONTAINER, LOCAL_CONTAINER));
        assert_eq!(
            b.run_xdp(&from_old).0,
            XDP_DROP,
            "old lease's subnet no longer accepted"
        );
        b.programs.remove_peer(&new).unwrap();
        assert_eq!(b.run_xdp(&from_new).0, XDP_DROP, "unknown peer once both are gone");
    });
}

// ---- container bridge egress -----------------------------------------------------------------

/// `overlay_bridge_out` on the container bridge's egress: a unicast frame for a MAC in the FDB
/// copy whose port is live is redirected; everything else goes on to the bridge untouched, the
/// unknown unicast ones counted. Ports are real veths: the devmap takes only live devices, and
/// the kernel prunes an entry when its device is deleted, which is what keeps a stale FDB copy
/// from sending frames into the void.
#[test]
fn bridge_egress_table() {
    use overlay::backend::ebpf::bridge::Mirror;

    let ns = Netns::new("brg").expect("namespace");
    for port in ["port0", "port1"] {
        let peer = format!("{port}c");
        ns.ip(&["link", "add", port, "type", "veth", "peer", "name", &peer])
            .expect("veth");
    }
    let ifindex = |dev: &str| -> u32 {
        let out = ns.ip(&["-j", "link", "show", dev]).expect("ip link show");
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
        v[0]["ifindex"].as_u64().expect("ifindex") as u32
    };
    let (port0, port1) = (ifindex("port0"), ifindex("port1"));
    let ns_name = ns.name().to_string();
    // Devmap entries are resolved in the namespace of the thread that writes them.
    let r = ns
        .spawn(move || {
            const ON_PORT0: [u8; 6] = [0x02, 0x42, 0x0a, 0xf4, 0x01, 0x02];
            const ON_PORT1: [u8; 6] = [0x02, 0x42, 0x0a, 0xf4, 0x01, 0x03];
            const ON_NO_DEVICE: [u8; 6] = [0x02, 0x42, 0x0a, 0xf4, 0x01, 0x04];
            const UNKNOWN: [u8; 6] = [0x02, 0x42, 0x0a, 0xf4, 0x01, 0x09];
            let frame = |dst: [u8; 6]| {
                let mut f = eth(dst, OVERLAY_MAC, 0x0800);
                f.extend(inner_packet(PEER_CONTAINER, LOCAL_CONTAINER));
                f
            };
            let mut programs = Programs::load().unwrap();
            let mut mirror = Mirror::default();
            let fdb = std::collections::HashMap::from([
                (MacAddr(ON_PORT0), port0),
                (MacAddr(ON_PORT1), port1),
                // A port that vanished between the FDB dump and the copy: the devmap refuses
                // it, the FDB entry is written, the frame goes to the bridge.
                (MacAddr(ON_NO_DEVICE), 0x7fff_fff0),
            ]);
            programs.sync_bridge_fdb(&mut mirror, &fdb).unwrap();
            assert_eq!(mirror.ports, [port0, port1].into(), "only live ports enter the devmap");

            run_bridge(
                &mut programs,
                "known MAC, live port",
                &frame(ON_PORT0),
                TC_ACT_REDIRECT,
                Some(CounterIndex::BridgeRedirect),
            );
            run_bridge(
                &mut programs,
                "known MAC, other live port",
                &frame(ON_PORT1),
                TC_ACT_REDIRECT,
                Some(CounterIndex::BridgeRedirect),
            );
            run_bridge(
                &mut programs,
                "unknown MAC",
                &frame(UNKNOWN),
                TC_ACT_UNSPEC,
                Some(CounterIndex::BridgeUnknownPort),
            );
            run_bridge(
                &mut programs,
                "known MAC, port never in the devmap",
                &frame(ON_NO_DEVICE),
                TC_ACT_UNSPEC,
                Some(CounterIndex::BridgeUnknownPort),
            );
            run_bridge(&mut programs, "broadcast", &frame([0xff; 6]), TC_ACT_UNSPEC, None);
            run_bridge(
                &mut programs,
                "IPv4 multicast",
                &frame([0x01, 0x00, 0x5e, 0, 0, 1]),
                TC_ACT_UNSPEC,
                None,
            );
            run_bridge(
                &mut programs,
                "IPv6 multicast",
                &frame([0x33, 0x33, 0, 0, 0, 1]),
                TC_ACT_UNSPEC,
                None,
            );
            let mut arp = eth([0xff; 6], OVERLAY_MAC, 0x0806);
            arp.extend([0u8; 28]);
            run_bridge(&mut programs, "ARP request", &arp, TC_ACT_UNSPEC, None);

            // The container's port goes away (container stopped); nobody has updated the copy
            // yet: the kernel dropped the devmap entry, so the bridge gets the frame.
            overlay_tests::netns::run(std::process::Command::new("ip").args(["-n", &ns_name, "link", "del", "port1"]))
                .unwrap();
            run_bridge(
                &mut programs,
                "known MAC, port device deleted",
                &frame(ON_PORT1),
                TC_ACT_UNSPEC,
                Some(CounterIndex::BridgeUnknownPort),
            );
            run_bridge(
                &mut programs,
                "known MAC, remaining live port",
                &frame(ON_PORT0),
                TC_ACT_REDIRECT,
                Some(CounterIndex::BridgeRedirect),
            );

            // The next copy forgets the MAC and the dead port; a MAC that left the FDB is unknown.
            let fdb = std::collections::HashMap::from([(MacAddr(ON_PORT1), port0)]);
            programs.sync_bridge_fdb(&mut mirror, &fdb).unwrap();
            assert_eq!(mirror.ports, [port0].into());
            assert_eq!(mirror.fdb, fdb);
            run_bridge(
                &mut programs,
                "MAC moved to a live port",
                &frame(ON_PORT1),
                TC_ACT_REDIRECT,
                Some(CounterIndex::BridgeRedirect),
            );
            run_bridge(
                &mut programs,
                "MAC no longer in the FDB",
                &frame(ON_PORT0),
                TC_ACT_UNSPEC,
                Some(CounterIndex::BridgeUnknownPort),
            );
            programs.sync_bridge_fdb(&mut mirror, &Default::default()).unwrap();
            assert!(mirror.ports.is_empty() && mirror.fdb.is_empty());
            run_bridge(
                &mut programs,
                "empty copy",
                &frame(ON_PORT1),
                TC_ACT_UNSPEC,
                Some(CounterIndex::BridgeUnknownPort),
            );
        })
        .join();
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e:#}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Run the bridge program on `frame`: it must give `verdict`, leave the frame as it is and move
/// `counter` (if any) by this frame, and no other bridge counter.
fn run_bridge(programs: &mut Programs, desc: &str, frame: &[u8], verdict: u32, counter: Option<CounterIndex>) {
    let counted = [CounterIndex::BridgeRedirect, CounterIndex::BridgeUnknownPort];
    let before = programs.counters().unwrap();
    let mut out = vec![0u8; frame.len() + 64];
    let r = programs
        .bridge_program()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{desc}: test run: {e}"));
    out.truncate(r.data_size_out as usize);
    assert_eq!(r.return_value, verdict, "{desc}: verdict");
    assert_eq!(out, frame, "{desc}: the frame is never changed");
    let after = programs.counters().unwrap();
    for c in counted {
        let (b, a) = (before.get(c), after.get(c));
        if Some(c) == counter {
            assert_eq!(a.packets, b.packets + 1, "{desc}: {} packets", c.name());
            assert_eq!(a.bytes, b.bytes + frame.len() as u64, "{desc}: {} bytes", c.name());
        } else {
            assert_eq!(a, b, "{desc}: {} moved", c.name());
        }
    }
}

// ---- host routing ----------------------------------------------------------------------------

const BRIDGE_MAC: [u8; 6] = [0x02, 0x42, 0xb0, 0, 0, 0x01];
const CONTAINER_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0xf4, 0x01, 0x02];

fn host_routing(mode: overlay_common::HostRoutingMode, mtu: u32) -> overlay_common::HostRoutingConfig {
    overlay_common::HostRoutingConfig {
        bridge_mac: BRIDGE_MAC,
        mode: mode as u8,
        _pad: 0,
        mtu,
    }
}

/// Run `name` (a host-routing program) on `frame`; `gso_size` > 0 marks the skb as GSO.
fn run_host_routing(programs: &mut Programs, name: &'static str, frame: &[u8], gso_size: u32) -> (u32, Vec<u8>) {
    // struct __sk_buff: gso_segs at 164, gso_size at 176, 192 bytes in all.
    let mut ctx = vec![0u8; 192];
    if gso_size > 0 {
        ctx[164..168].copy_from_slice(&2u32.to_ne_bytes());
        ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
    }
    let mut out = vec![0u8; frame.len() + 256];
    let r = programs
        .tc_program(name)
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{name}: test run on a {}-byte frame: {e}", frame.len()));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// A frame a container sends to its gateway (the bridge).
fn from_container(inner: &[u8]) -> Vec<u8> {
    let mut f = eth(BRIDGE_MAC, CONTAINER_MAC, 0x0800);
    f.extend(inner);
    f
}

#[test]
fn host_routing_from_container_table() {
    use overlay_common::{HostRoutingMode, PROG_FROM_CONTAINER};
    in_test_namespace(|ifindex, nic_mac| {
        for format in [Format::Udp, Format::Vxlan] {
            let mtu = 1500 - format.overhead();
            let mut b = Bench::new(format, ifindex, nic_mac).unwrap();
            let echo = |src, dst, ttl| {
                Ip {
                    ttl,
                    ..Ip::new(src, dst, 1)
                }
                .build(&icmp_echo(32))
            };
            let to_peer = from_container(&echo(LOCAL_CONTAINER, PEER_CONTAINER, 63));

            // Unconfigured (the map's zeroes), then off: everything to the stack.
            b.programs
                .set_host_routing(&host_routing(HostRoutingMode::Off, mtu))
                .unwrap();
            let (verdict, out) = run_host_routing(&mut b.programs, PROG_FROM_CONTAINER, &to_peer, 0);
            assert_eq!((verdict, &out), (TC_ACT_UNSPEC, &to_peer), "{format:?} off");
            b.programs
                .set_host_routing(&host_routing(HostRoutingMode::Encap, mtu))
                .unwrap();

            // The shortcut: TTL down by one, encapsulated, out of the underlay to the peer.
            let shortcut = |b: &mut Bench, desc: &str, frame: &[u8], inner_out: &[u8], gso: u32| {
                let before = b.programs.counters().unwrap();
                let (verdict, out) = run_host_routing(&mut b.programs, PROG_FROM_CONTAINER, frame, gso);
                assert_eq!(verdict, TC_ACT_REDIRECT, "{format:?} {desc}: verdict");
                let expected = encapsulated(
                    format,
                    eth(PEER_NEIGH_MAC, nic_mac, 0x0800),
                    PEER_IP,
                    inner_out,
                    sport_of(&out),
                );
                assert_eq!(out, expected, "{format:?} {desc}: output frame");
                let after = b.programs.counters().unwrap();
                for c in [CounterIndex::ShortcutFromContainer, CounterIndex::encap(format)] {
                    assert_eq!(
                        after.get(c).packets,
                        before.get(c).packets + 1,
                        "{format:?} {desc}: {}",
                        c.name()
                    );
                }
            };
            shortcut(
                &mut b,
                "echo to a peer's container",
                &to_peer,
                &echo(LOCAL_CONTAINER, PEER_CONTAINER, 62),
                0,
            );
            shortcut(
                &mut b,
                "TTL 2 (leaves with 1)",
                &from_container(&echo(LOCAL_CONTAINER, PEER_CONTAINER, 2)),
                &echo(LOCAL_CONTAINER, PEER_CONTAINER, 1),
                0,
            );
            let big = |ttl| {
                Ip {
                    ttl,
                    ..Ip::new(LOCAL_CONTAINER, PEER_CONTAINER, 17)
                }
                .build(&vec![7u8; mtu as usize - 20])
            };
            shortcut(&mut b, "exactly the MTU", &from_container(&big(63)), &big(62), 0);
            let over = |ttl| {
                Ip {
                    ttl,
                    ..Ip::new(LOCAL_CONTAINER, PEER_CONTAINER, 17)
                }
                .build(&vec![7u8; mtu as usize - 20 + 1])
            };
            // (A GSO packet over the MTU: in the route-mode case below. test_run cannot mark
            // an skb as TCP GSO, and adjust_room refuses other GSO skbs.)

            // To the stack, untouched.
            let mut arp = eth([0xff; 6], CONTAINER_MAC, 0x0806);
            arp.extend([0u8; 28]);
            let mut to_other_container = eth([0x02, 0x42, 0x0a, 0xf4, 0x01, 0x03], CONTAINER_MAC, 0x0800);
            to_other_container.extend(echo(LOCAL_CONTAINER, [10, 244, 1, 3], 64));
            let mut ipv6 = eth(BRIDGE_MAC, CONTAINER_MAC, 0x86dd);
            ipv6.extend([0x60u8; 40]);
            let passes: Vec<(&str, Vec<u8>, Option<CounterIndex>)> = vec![
                ("ARP", arp, None),
                ("to another container (its MAC)", to_other_container, None),
                ("IPv6", ipv6, None),
                (
                    "to a container on this host, via the gateway",
                    from_container(&echo(LOCAL_CONTAINER, [10, 244, 1, 3], 64)),
                    None,
                ),
                (
                    "to the host",
                    from_container(&echo(LOCAL_CONTAINER, [10, 244, 1, 1], 64)),
                    None,
                ),
                (
                    "to the outside world",
                    from_container(&echo(LOCAL_CONTAINER, [192, 0, 2, 1], 64)),
                    None,
                ),
                (
                    "spoofed source (another subnet's address)",
                    from_container(&echo([10, 244, 3, 9], PEER_CONTAINER, 64)),
                    None,
                ),
                (
                    "TTL 1 (the stack answers time exceeded)",
                    from_container(&echo(LOCAL_CONTAINER, PEER_CONTAINER, 1)),
                    None,
                ),
                (
                    "over the MTU, not GSO (the stack answers fragmentation needed)",
                    from_container(&over(63)),
                    Some(CounterIndex::ShortcutOversize),
                ),
            ];
            for (desc, frame, counter) in passes {
                let before = b.programs.counters().unwrap();
                let (verdict, out) = run_host_routing(&mut b.programs, PROG_FROM_CONTAINER, &frame, 0);
                assert_eq!(verdict, TC_ACT_UNSPEC, "{format:?} {desc}: verdict");
                assert_eq!(out, frame, "{format:?} {desc}: frame changed");
                let after = b.programs.counters().unwrap();
                for c in CounterIndex::ALL {
                    let moved = after.get(c).packets - before.get(c).packets;
                    assert_eq!(moved, u64::from(Some(c) == counter), "{format:?} {desc}: {}", c.name());
                }
            }

            // A peer without a route: dropped and counted, as the overlay device's encap does.
            let before = b.counter(CounterIndex::DropNoRoute);
            let frame = from_container(&echo(LOCAL_CONTAINER, [10, 244, 4, 2], 64));
            let (verdict, _) = run_host_routing(&mut b.programs, PROG_FROM_CONTAINER, &frame, 0);
            assert_eq!(verdict, TC_ACT_SHOT, "{format:?} unroutable peer");
            assert_eq!(b.counter(CounterIndex::DropNoRoute), before + 1);
        }

        // eBPF host-gw: no encapsulation, the peer's PublicIP as next hop.
        let mut b = Bench::new(Format::Vxlan, ifindex, nic_mac).unwrap();
        b.programs
            .set_host_routing(&host_routing(HostRoutingMode::Route, 1500))
            .unwrap();
        let inner = |ttl| {
            Ip {
                ttl,
                ..Ip::new(LOCAL_CONTAINER, PEER_CONTAINER, 1)
            }
            .build(&icmp_echo(32))
        };
        let (verdict, out) = run_host_routing(&mut b.programs, PROG_FROM_CONTAINER, &from_container(&inner(63)), 0);
        assert_eq!(verdict, TC_ACT_REDIRECT, "route mode: verdict");
        let mut expected = eth(PEER_NEIGH_MAC, nic_mac, 0x0800);
        expected.extend(inner(62));
        assert_eq!(out, expected, "route mode: routed as it is, to the peer's MAC");
        assert_eq!(b.counter(CounterIndex::ShortcutFromContainer), 1);
        assert_eq!(
            b.counter(CounterIndex::encap(Format::Vxlan)),
            0,
            "route mode encapsulates nothing"
        );
        // Larger than the MTU: GSO packets go (cut later), others to the stack.
        let over = |ttl| {
            Ip {
                ttl,
                ..Ip::new(LOCAL_CONTAINER, PEER_CONTAINER, 17)
            }
            .build(&vec![7u8; 1500 - 20 + 1])
        };
        let (verdict, out) = run_host_routing(&mut b.programs, PROG_FROM_CONTAINER, &from_container(&over(63)), 1400);
        let mut expected = eth(PEER_NEIGH_MAC, nic_mac, 0x0800);
        expected.extend(over(62));
        assert_eq!(
            (verdict, &out),
            (TC_ACT_REDIRECT, &expected),
            "route mode, GSO over the MTU"
        );
        let frame = from_container(&over(63));
        let (verdict, out) = run_host_routing(&mut b.programs, PROG_FROM_CONTAINER, &frame, 0);
        assert_eq!((verdict, &out), (TC_ACT_UNSPEC, &frame), "route mode, over the MTU");
        assert_eq!(b.counter(CounterIndex::ShortcutOversize), 1);
        // A peer whose neighbour is cold: the kernel resolves its PublicIP (bpf_redirect_neigh).
        let cold = Ip {
            ttl: 63,
            ..Ip::new(LOCAL_CONTAINER, [10, 244, 3, 2], 1)
        }
        .build(&icmp_echo(32));
        let (verdict, out) = run_host_routing(&mut b.programs, PROG_FROM_CONTAINER, &from_container(&cold), 0);
        assert_eq!(verdict, TC_ACT_REDIRECT, "route mode, cold neighbour: verdict");
        assert_eq!(out[14 + 8], 62, "route mode, cold neighbour: TTL");
    });
}

#[test]
fn host_routing_to_container_table() {
    use overlay::backend::ebpf::bridge::Mirror;
    use overlay_common::{HostRoutingMode, LocalEndpoint, PROG_TO_CONTAINER};

    let ns = Netns::new("hrt").expect("namespace");
    ns.ip(&["link", "add", "port0", "type", "veth", "peer", "name", "port0c"])
        .expect("veth");
    let out = ns.ip(&["-j", "link", "show", "port0"]).expect("ip link show");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    let port0 = v[0]["ifindex"].as_u64().expect("ifindex") as u32;
    let ns_name = ns.name().to_string();
    let r = ns
        .spawn(move || {
            let mut programs = Programs::load().unwrap();
            programs.upsert_peer(&Peer {
                subnet: "10.244.2.0/24".parse().unwrap(),
                public_ip: Ipv4Addr::from(PEER_IP),
                vtep_mac: Some(MacAddr(PEER_VTEP)),
                ipv6: None,
            })?;
            let mut mirror = Mirror::default();
            programs.sync_bridge_fdb(&mut mirror, &[(MacAddr(CONTAINER_MAC), port0)].into())?;
            let mut endpoints = Default::default();
            let endpoint = LocalEndpoint {
                port_ifindex: port0,
                mac: CONTAINER_MAC,
                _pad: [0; 2],
            };
            programs.sync_local_endpoints(&mut endpoints, &[(Ipv4Addr::from(LOCAL_CONTAINER), endpoint)].into())?;
            let echo = |src, dst, ttl| {
                decapsulated(
                    &Ip {
                        ttl,
                        ..Ip::new(src, dst, 1)
                    }
                    .build(&icmp_echo(32)),
                )
            };
            let delivered = |ttl| {
                let mut f = eth(CONTAINER_MAC, BRIDGE_MAC, 0x0800);
                f.extend(
                    Ip {
                        ttl,
                        ..Ip::new(PEER_CONTAINER, LOCAL_CONTAINER, 1)
                    }
                    .build(&icmp_echo(32)),
                );
                f
            };
            let check = |programs: &mut Programs, desc: &str, frame: &[u8], expect: Option<Vec<u8>>| {
                let before = programs.counters().unwrap().get(CounterIndex::ShortcutToContainer);
                let (verdict, out) = run_host_routing(programs, PROG_TO_CONTAINER, frame, 0);
                let after = programs.counters().unwrap().get(CounterIndex::ShortcutToContainer);
                match expect {
                    Some(expected) => {
                        assert_eq!(verdict, TC_ACT_REDIRECT, "{desc}: verdict");
                        assert_eq!(out, expected, "{desc}: output frame");
                        assert_eq!(after.packets, before.packets + 1, "{desc}: counter");
                    }
                    None => {
                        assert_eq!(verdict, TC_ACT_UNSPEC, "{desc}: verdict");
                        assert_eq!(out, frame, "{desc}: frame changed");
                        assert_eq!(after, before, "{desc}: counter");
                    }
                }
            };

            check(
                &mut programs,
                "off (not configured)",
                &echo(PEER_CONTAINER, LOCAL_CONTAINER, 63),
                None,
            );
            programs.set_host_routing(&host_routing(HostRoutingMode::Encap, 1450))?;
            check(
                &mut programs,
                "from a peer's container to a known one",
                &echo(PEER_CONTAINER, LOCAL_CONTAINER, 63),
                Some(delivered(62)),
            );
            check(
                &mut programs,
                "TTL 2",
                &echo(PEER_CONTAINER, LOCAL_CONTAINER, 2),
                Some(delivered(1)),
            );
            check(&mut programs, "TTL 1", &echo(PEER_CONTAINER, LOCAL_CONTAINER, 1), None);
            check(
                &mut programs,
                "to an unknown container",
                &echo(PEER_CONTAINER, [10, 244, 1, 7], 63),
                None,
            );
            check(
                &mut programs,
                "from outside the overlay (not a peer's subnet)",
                &echo([192, 0, 2, 1], LOCAL_CONTAINER, 63),
                None,
            );
            let mut arp = eth([0xff; 6], REMOTE_NIC_MAC, 0x0806);
            arp.extend([0u8; 28]);
            check(&mut programs, "ARP", &arp, None);
            let tunnel = good_tunnel_frame(Format::Vxlan, &inner_packet(PEER_CONTAINER, LOCAL_CONTAINER));
            check(&mut programs, "a tunnel packet (not decapsulated)", &tunnel, None);

            // The port goes away before the agent's next look: the devmap forgets it at once.
            overlay_tests::netns::run(std::process::Command::new("ip").args(["-n", &ns_name, "link", "del", "port0"]))?;
            check(
                &mut programs,
                "known container, port deleted",
                &echo(PEER_CONTAINER, LOCAL_CONTAINER, 63),
                None,
            );
            programs.set_host_routing(&host_routing(HostRoutingMode::Off, 1450))?;
            check(&mut programs, "off", &echo(PEER_CONTAINER, LOCAL_CONTAINER, 63), None);
            anyhow::Ok(())
        })
        .join();
    match r {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e)) | Err(e)) => panic!("{e:#}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
