//! Fuzz test: every datapath program runs in the kernel (BPF_PROG_TEST_RUN) on random and
//! mutated frames, and each result is judged by invariants rather than by a table: the verdict
//! is one the program defines, a frame is decapsulated only when a known peer sent it for our
//! subnet, output lengths add up, and exactly the counted frames move the counters.
//! Seeded and reproducible: the seed is printed, `OVERLAY_FUZZ_SEED` sets it.
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use overlay::{
    backend::{
        Peer,
        ebpf::{Programs, bridge::Mirror, ipv6::Peer6},
    },
    host::{Counters, MacAddr},
};
use overlay_common::{
    CounterIndex, DatapathConfig, DatapathConfig6, Format, HostRoutingConfig, HostRoutingMode, LocalEndpoint,
    PROG_FROM_CONTAINER, PROG_TO_CONTAINER,
};
use overlay_tests::netns::Netns;

/// Frames per program (split between the tunnel formats where a program runs under both).
const FRAMES: usize = 20_000;

const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const LOCAL_IP: [u8; 4] = [192, 168, 250, 1];
/// Known peers: PublicIP and the third octet of their 10.244.x.0/24 subnet. The first has a
/// neighbour entry, the second none, the third no route.
const PEERS: [([u8; 4], u8); 3] = [([192, 168, 250, 2], 2), ([192, 168, 250, 3], 3), ([10, 99, 0, 1], 4)];
const STRANGER_IP: [u8; 4] = [192, 168, 250, 9];
const OUR_SUBNET: [u8; 3] = [10, 244, 1];
const LOCAL_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const PEER_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const NIC_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x01];
const REMOTE_NIC_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x02];
const OVERLAY_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
const BRIDGE_MAC: [u8; 6] = [0x02, 0x42, 0xb0, 0, 0, 0x01];
const CONTAINER_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0xf4, 0x01, 0x02];
const VNI: u32 = 1;

fn public6(n: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfc;
    a[15] = n;
    a
}

fn overlay6(subnet: u8, host: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[7] = subnet;
    a[15] = host;
    a
}

// ---- PRNG (xorshift64*): small, ours, reproducible --------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn seed(test: &str) -> u64 {
    let seed = match std::env::var("OVERLAY_FUZZ_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("OVERLAY_FUZZ_SEED={s:?} is not a u64: {e}"))
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    println!("{test}: seed {seed} (OVERLAY_FUZZ_SEED={seed} repeats this run)");
    seed
}

// ---- frames ----------------------------------------------------------------------------------

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        sum += hi | chunk.get(1).map_or(0, |&b| u32::from(b));
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

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend(((20 + payload.len()) as u16).to_be_bytes());
    h.extend([0x12, 0x34, 0, 0, 63, proto, 0, 0]);
    h.extend(src);
    h.extend(dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend(payload);
    h
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend((payload.len() as u16).to_be_bytes());
    h.extend([next, 64]);
    h.extend(src);
    h.extend(dst);
    h.extend(payload);
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = sport.to_be_bytes().to_vec();
    v.extend(dport.to_be_bytes());
    v.extend(((8 + payload.len()) as u16).to_be_bytes());
    v.extend([0, 0]);
    v.extend(payload);
    v
}

fn vxlan_and_eth(ethertype: u16) -> Vec<u8> {
    let mut v = vec![0x08, 0, 0, 0];
    v.extend((VNI << 8).to_be_bytes());
    v.extend(eth(LOCAL_VTEP, PEER_VTEP, ethertype));
    v
}

fn inner4(src: [u8; 4], dst: [u8; 4], rng: &mut Rng) -> Vec<u8> {
    let len = rng.below(64);
    let payload: Vec<u8> = (0..8 + len).map(|_| rng.byte()).collect();
    ipv4(src, dst, [1, 6, 17][rng.below(3)], &payload)
}

fn inner6(src: [u8; 16], dst: [u8; 16], rng: &mut Rng) -> Vec<u8> {
    let payload: Vec<u8> = (0..8 + rng.below(64)).map(|_| rng.byte()).collect();
    ipv6(src, dst, [58, 6, 17][rng.below(3)], &payload)
}

/// A real tunnel frame as a peer (or a stranger) would send it, with inner addresses drawn
/// from our subnet, the sender's subnet, another peer's subnet or nowhere.
fn tunnel_frame4(format: Format, rng: &mut Rng) -> Vec<u8> {
    let (outer_src, peer_third) = if rng.chance(85) {
        PEERS[rng.below(PEERS.len())]
    } else {
        (STRANGER_IP, 9)
    };
    let pick = |rng: &mut Rng, likely: u8| -> [u8; 4] {
        let third = if rng.chance(80) {
            likely
        } else {
            [1, 2, 3, 4, 9][rng.below(5)]
        };
        [10, 244, third, rng.byte()]
    };
    let src = pick(rng, peer_third);
    let dst = pick(rng, OUR_SUBNET[2]);
    let inner = inner4(src, dst, rng);
    let mut payload = vec![];
    if format == Format::Vxlan {
        payload.extend(vxlan_and_eth(0x0800));
    }
    payload.extend(inner);
    let mut f = eth(NIC_MAC, REMOTE_NIC_MAC, 0x0800);
    f.extend(ipv4(
        outer_src,
        LOCAL_IP,
        17,
        &udp(rng.next() as u16, format.default_port(), &payload),
    ));
    f
}

/// VXLAN over IPv6 from a known peer (fc00::2, fd00:0:0:2::/64) or a stranger.
fn tunnel_frame6(rng: &mut Rng) -> Vec<u8> {
    let sender = [2u8, 3, 9][rng.below(3)];
    let third = |rng: &mut Rng, likely: u8| {
        if rng.chance(80) {
            likely
        } else {
            [1, 2, 3, 9][rng.below(4)]
        }
    };
    let src = overlay6(third(rng, sender), rng.byte());
    let dst = overlay6(third(rng, 1), rng.byte());
    let mut payload = vxlan_and_eth(0x86dd);
    payload.extend(inner6(src, dst, rng));
    let mut f = eth(NIC_MAC, REMOTE_NIC_MAC, 0x86dd);
    f.extend(ipv6(
        public6(sender),
        public6(1),
        17,
        &udp(rng.next() as u16, 8472, &payload),
    ));
    f
}

/// A frame as the overlay device (encap) or a container (host routing) hands it over.
fn from_host(src_mac: [u8; 6], dst_mac: [u8; 6], rng: &mut Rng) -> Vec<u8> {
    if rng.chance(20) {
        let mut f = eth(dst_mac, src_mac, 0x86dd);
        f.extend(inner6(overlay6(1, 2), overlay6([1, 2, 3, 4, 9][rng.below(5)], 2), rng));
        return f;
    }
    let mut f = eth(dst_mac, src_mac, 0x0800);
    let dst = [10, 244, [1, 2, 3, 4, 9][rng.below(5)], rng.byte()];
    f.extend(inner4([10, 244, 1, 2], dst, rng));
    f
}

/// A frame that arrives from the underlay for a local container (host routing, bridge).
fn to_host(rng: &mut Rng) -> Vec<u8> {
    let mut f = eth(if rng.chance(50) { BRIDGE_MAC } else { CONTAINER_MAC }, NIC_MAC, 0x0800);
    let dst = [10, 244, [1, 1, 1, 2][rng.below(4)], [2, 2, 3][rng.below(3)]];
    f.extend(inner4([10, 244, 2, 2], dst, rng));
    f
}

/// Mutations of a valid frame: bit flips, random bytes, IPv4 flags, fragment offset and
/// options, VNI and VXLAN flags, truncation and growth. Checksums stay as they fall.
fn mutate(mut f: Vec<u8>, rng: &mut Rng) -> Vec<u8> {
    for _ in 0..1 + rng.below(3) {
        let len = f.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                f[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                f[i] = rng.byte();
            }
            // Outer IPv4 flags and fragment offset (DF, MF, any offset).
            2 if len >= 22 => {
                let v = [0x0000u16, 0x4000, 0x2000, 0x2001, 0x0001, rng.next() as u16][rng.below(6)];
                f[20..22].copy_from_slice(&v.to_be_bytes());
            }
            // Outer IPv4 options: 4 to 40 random bytes, IHL and total length made to agree
            // (or not).
            3 if len >= 34 && f[12..14] == [0x08, 0x00] => {
                let words = 1 + rng.below(10);
                let opts: Vec<u8> = (0..words * 4).map(|_| rng.byte()).collect();
                f.splice(34..34, opts);
                f[14] = 0x40 | (5 + words) as u8;
                if rng.chance(80) {
                    let total = (f.len() - 14) as u16;
                    f[16..18].copy_from_slice(&total.to_be_bytes());
                }
            }
            // VNI and VXLAN flags (IPv4 outer without options: VXLAN at 42; IPv6: at 62).
            4 => {
                let at = if f.get(12..14) == Some(&[0x86, 0xdd]) { 62 } else { 42 };
                if len >= at + 8 {
                    if rng.chance(50) {
                        f[at] = rng.byte();
                    } else {
                        let vni = [0, 1, 2, 0xff_ffff, rng.next() as u32 & 0xff_ffff][rng.below(5)];
                        f[at + 4..at + 7].copy_from_slice(&vni.to_be_bytes()[1..]);
                    }
                }
            }
            5 => f.truncate(rng.below(len + 1)),
            6 => f.extend((0..rng.below(64)).map(|_| rng.byte())),
            // IHL and length fields: a few bytes that decide where everything else is.
            7 if len >= 20 => {
                let i = [14, 16, 17, 18, 19][rng.below(5)];
                f[i] = rng.byte();
            }
            _ if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                for b in &mut f[start..end] {
                    *b = rng.byte();
                }
            }
            _ => {}
        }
    }
    f
}

/// The fuzz input stream: truncations of real frames at every length first, then mutated
/// real frames and a share of random bytes.
fn frames(n: usize, rng: &mut Rng, real: &mut dyn FnMut(&mut Rng) -> Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = vec![];
    for _ in 0..2 {
        let f = real(rng);
        out.extend((0..=f.len()).map(|l| f[..l].to_vec()));
    }
    while out.len() < n {
        let f = match rng.below(10) {
            0 => (0..rng.below(200)).map(|_| rng.byte()).collect(),
            1 => real(rng),
            _ => {
                let f = real(rng);
                mutate(f, rng)
            }
        };
        out.push(f);
    }
    out.truncate(n);
    out
}

// ---- harness ---------------------------------------------------------------------------------

struct Run {
    verdict: u32,
    out: Vec<u8>,
    /// (counter, packets moved) for every counter that moved.
    moved: Vec<(CounterIndex, u64)>,
}

impl Run {
    fn total(&self) -> u64 {
        self.moved.iter().map(|m| m.1).sum()
    }

    fn only(&self) -> Option<CounterIndex> {
        match self.moved[..] {
            [(c, 1)] => Some(c),
            _ => None,
        }
    }
}

fn moved(before: &Counters, after: &Counters) -> Vec<(CounterIndex, u64)> {
    CounterIndex::ALL
        .iter()
        .map(|&c| (c, after.get(c).packets - before.get(c).packets))
        .filter(|m| m.1 != 0)
        .collect()
}

/// None: the kernel refused the test run (too short for an skb, say); nothing may be counted.
fn run(programs: &mut Programs, name: &'static str, frame: &[u8]) -> Option<Run> {
    let before = programs.counters().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let result = if name == overlay_common::PROG_DECAP {
        programs.decap_program().unwrap().test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
    } else {
        // struct __sk_buff, zeroed: not GSO.
        let ctx = [0u8; 192];
        let ctx_in = [PROG_FROM_CONTAINER, PROG_TO_CONTAINER]
            .contains(&name)
            .then_some(&ctx[..]);
        programs.tc_program(name).unwrap().test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in,
            ..Default::default()
        })
    };
    let after = programs.counters().unwrap();
    let moved = moved(&before, &after);
    let Ok(r) = result else {
        assert!(moved.is_empty(), "{name}: refused test run moved counters {moved:?}");
        return None;
    };
    out.truncate(r.data_size_out as usize);
    Some(Run {
        verdict: r.return_value,
        out,
        moved,
    })
}

/// Judges one frame's run: Err names the broken invariant.
type Check<'a> = dyn FnMut(&[u8], &Run) -> Result<(), String> + 'a;

fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `frames` through `name`, judging each with `check` (Err: the broken invariant).
/// Returns how many the kernel ran.
fn fuzz(
    programs: &mut Programs,
    name: &'static str,
    label: &str,
    seed: u64,
    frames: &[Vec<u8>],
    check: &mut Check,
) -> usize {
    let start = std::time::Instant::now();
    let mut ran = 0;
    let mut verdicts = std::collections::BTreeMap::<String, usize>::new();
    for (i, f) in frames.iter().enumerate() {
        let Some(r) = run(programs, name, f) else {
            continue;
        };
        ran += 1;
        if let Err(e) = check(f, &r) {
            panic!(
                "{label} (seed {seed}) frame #{i}: {e}\n verdict {} moved {:?}\n in  {}\n out {}",
                r.verdict as i32,
                r.moved,
                hex(f),
                hex(&r.out)
            );
        }
        let key = match r.moved.first() {
            Some((c, _)) => format!("{}/{}", r.verdict as i32, c.name()),
            None => format!("{}/-", r.verdict as i32),
        };
        *verdicts.entry(key).or_default() += 1;
    }
    println!(
        "{label}: {} frames, {ran} run by the kernel, {:.2} s; verdict/counter: {verdicts:?}",
        frames.len(),
        start.elapsed().as_secs_f64()
    );
    ran
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

fn in_subnet4(a: &[u8], third: u8) -> bool {
    a[..3] == [10, 244, third]
}

fn in_subnet6(a: &[u8], subnet: u8) -> bool {
    a[..8] == overlay6(subnet, 0)[..8]
}

// ---- setup -----------------------------------------------------------------------------------

/// An underlay (nic0, both families, a resolved neighbour for the first peer) and a container
/// port (port0) in a fresh namespace; programs loaded and filled there.
fn in_test_namespace(format: Format, f: impl FnOnce(Programs) + Send + 'static) {
    let ns = Netns::new("fuzz").expect("namespace");
    let setup = || -> anyhow::Result<(u32, u32)> {
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        ns.ip(&["link", "add", "nic0", "type", "veth", "peer", "name", "nic1"])?;
        ns.ip(&["link", "add", "port0", "type", "veth", "peer", "name", "port0c"])?;
        for dev in ["nic0", "nic1", "port0", "port0c"] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        ns.ip(&["addr", "add", "192.168.250.1/24", "dev", "nic0"])?;
        ns.ip(&["-6", "addr", "add", "fc00::1/64", "dev", "nic0", "nodad"])?;
        ns.ip(&[
            "neigh", "replace", "192.168.250.2", "lladdr", "02:aa:00:00:00:02", "dev", "nic0", "nud", "permanent",
        ])?;
        ns.ip(&[
            "-6", "neigh", "replace", "fc00::2", "lladdr", "02:aa:00:00:00:02", "dev", "nic0", "nud", "permanent",
        ])?;
        let ifindex = |dev: &str| -> anyhow::Result<u32> {
            let v: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", dev])?)?;
            v[0]["ifindex"]
                .as_u64()
                .map(|i| i as u32)
                .ok_or_else(|| anyhow::anyhow!("no ifindex for {dev}"))
        };
        Ok((ifindex("nic0")?, ifindex("port0")?))
    };
    let (nic, port) = setup().expect("test underlay");
    let r = ns
        .spawn(move || -> anyhow::Result<()> {
            let mut p = Programs::load()?;
            p.set_config(&DatapathConfig {
                public_ip: LOCAL_IP,
                subnet_addr: [10, 244, 1, 0],
                subnet_prefix_len: 24,
                format: format as u8,
                port: format.default_port(),
                vni: VNI,
                vtep_mac: LOCAL_VTEP,
                _pad: [0; 2],
                underlay_ifindex: nic,
            })?;
            p.set_config6(&DatapathConfig6 {
                public_ip: public6(1),
                subnet_addr: overlay6(1, 0),
                subnet_prefix_len: 64,
                enabled: 1,
                port: 8472,
                vni: VNI,
                vtep_mac: LOCAL_VTEP,
                _pad: [0; 2],
                underlay_ifindex: nic,
                mtu: 1430,
            })?;
            for (ip, third) in PEERS {
                p.upsert_peer(&Peer {
                    subnet: format!("10.244.{third}.0/24").parse()?,
                    public_ip: Ipv4Addr::from(ip),
                    vtep_mac: Some(MacAddr(PEER_VTEP)),
                    ipv6: None,
                })?;
            }
            for n in [2u8, 3] {
                p.upsert_peer6(&Peer6 {
                    subnet: format!("fd00:0:0:{n}::/64").parse()?,
                    public_ip: Ipv6Addr::from(public6(n)),
                    vtep_mac: MacAddr(PEER_VTEP),
                })?;
            }
            p.set_host_routing(&HostRoutingConfig {
                bridge_mac: BRIDGE_MAC,
                mode: HostRoutingMode::Encap as u8,
                _pad: 0,
                mtu: 1500 - format.overhead(),
            })?;
            p.sync_bridge_fdb(&mut Mirror::default(), &[(MacAddr(CONTAINER_MAC), port)].into())?;
            let endpoint = LocalEndpoint {
                port_ifindex: port,
                mac: CONTAINER_MAC,
                _pad: [0; 2],
            };
            p.sync_local_endpoints(
                &mut Default::default(),
                &[(Ipv4Addr::new(10, 244, 1, 2), endpoint)].into(),
            )?;
            f(p);
            Ok(())
        })
        .join();
    match r {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e)) | Err(e)) => panic!("{e:#}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

// ---- invariants ------------------------------------------------------------------------------

const DECAP_DROPS: [CounterIndex; 8] = [
    CounterIndex::DropUnknownPeer,
    CounterIndex::DropSpoofedSource,
    CounterIndex::DropNotOurSubnet,
    CounterIndex::DropMalformed,
    CounterIndex::DropWrongVni,
    CounterIndex::DropFragment,
    CounterIndex::DropDecapFailed,
    CounterIndex::DropNoConfig,
];

const ENCAP_DROPS: [CounterIndex; 6] = [
    CounterIndex::DropNoPeer,
    CounterIndex::DropNotIpv4,
    CounterIndex::DropEncapFailed,
    CounterIndex::DropNoRoute,
    CounterIndex::DropNoConfig,
    CounterIndex::DropTooBig,
];

/// Decap (either hook): passed untouched with nothing counted, dropped with one drop counter,
/// or decapsulated (one accept counter) and then only for a tunnel packet a known peer sent
/// to us, with an inner source in its subnet and an inner destination in ours.
fn check_decap(format: Format, pass: u32, drop: u32, f: &[u8], r: &Run) -> Result<(), String> {
    ensure(r.verdict == pass || r.verdict == drop, || "verdict not defined".into())?;
    if r.verdict == drop {
        let c = r.only();
        return ensure(c.is_some_and(|c| DECAP_DROPS.contains(&c)), || {
            "a drop must move exactly one decap drop counter".into()
        });
    }
    if r.total() == 0 {
        return ensure(r.out == f, || "passed without a count, but changed".into());
    }
    let Some(c) = r.only() else {
        return Err("more than one count for one frame".into());
    };
    ensure(r.out.len() >= 14 && r.out[..14] == f[..14], || {
        "outer Ethernet header not kept".into()
    })?;
    let inner = &r.out[14..];
    if c == CounterIndex::decap(format) {
        // IPv4 outer: our address, UDP to our port, from a known peer's PublicIP.
        ensure(f[12..14] == [0x08, 0x00] && f[14] >> 4 == 4 && f[23] == 17, || {
            "decapsulated a frame that is not IPv4/UDP".into()
        })?;
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let udp_at = 14 + ihl;
        let overhead = ihl + 8 + if format == Format::Vxlan { 22 } else { 0 };
        ensure(f.len() - r.out.len() == overhead, || {
            format!(
                "output {} bytes, input {} less overhead {overhead}",
                r.out.len(),
                f.len()
            )
        })?;
        ensure(f[30..34] == LOCAL_IP, || "outer destination is not our PublicIP".into())?;
        ensure(
            u16::from_be_bytes([f[udp_at + 2], f[udp_at + 3]]) == format.default_port(),
            || "UDP destination is not our port".into(),
        )?;
        ensure(f[20] & 0x20 == 0 && f[20..22] == [f[20] & 0xe0, 0], || {
            "decapsulated a fragment".into()
        })?;
        if format == Format::Vxlan {
            let vx = &f[udp_at + 8..];
            ensure(vx[0] & 0x08 != 0 && vx[4..7] == VNI.to_be_bytes()[1..], || {
                "VXLAN without the I flag or with another VNI".into()
            })?;
        }
        let Some(&(_, third)) = PEERS.iter().find(|p| p.0[..] == f[26..30]) else {
            return Err("outer source is not a known peer".into());
        };
        ensure(inner.len() >= 20 && inner[0] >> 4 == 4, || "inner is not IPv4".into())?;
        ensure(in_subnet4(&inner[12..16], third), || {
            "inner source outside the sending peer's subnet".into()
        })?;
        ensure(in_subnet4(&inner[16..20], OUR_SUBNET[2]), || {
            "inner destination outside our subnet".into()
        })
    } else if c == CounterIndex::DecapVxlan6 {
        ensure(f[12..14] == [0x86, 0xdd] && f[14] >> 4 == 6, || {
            "decapsulated a frame that is not IPv6".into()
        })?;
        // Outer IPv6 (40 and any extension headers, 8-byte units), UDP, VXLAN, Ethernet.
        let cut = f.len() - r.out.len();
        ensure(cut >= 70 && (cut - 70).is_multiple_of(8), || format!("cut {cut} bytes"))?;
        ensure(f[38..54] == public6(1), || {
            "outer destination is not our PublicIPv6".into()
        })?;
        let sender = f[22..38].to_vec();
        let Some(n) = [2u8, 3].into_iter().find(|&n| public6(n)[..] == sender[..]) else {
            return Err("outer source is not a known IPv6 peer".into());
        };
        ensure(inner.len() >= 40 && inner[0] >> 4 == 6, || "inner is not IPv6".into())?;
        ensure(in_subnet6(&inner[8..24], n), || {
            "inner source outside the sending peer's subnet".into()
        })?;
        ensure(in_subnet6(&inner[24..40], 1), || {
            "inner destination outside our subnet".into()
        })
    } else {
        Err(format!("passed with counter {}", c.name()))
    }
}

/// Encapsulation towards a peer (encap program, or host routing's shortcut): redirected with
/// one accept counter, the input's IP packet behind outer headers of the format's length,
/// addressed to the peer that owns the inner destination.
fn check_encapsulated(format: Format, f: &[u8], r: &Run) -> Result<(), String> {
    let c = r.only().ok_or("redirected without exactly one count")?;
    let (overhead, dst_ok) = if c == CounterIndex::encap(format) {
        let o = format.overhead() as usize;
        let inner_dst = f.get(30..34).ok_or("short")?;
        let peer = PEERS.iter().find(|p| in_subnet4(inner_dst, p.1));
        let ok = peer.is_some_and(|p| r.out.get(30..34) == Some(&p.0[..]));
        (o, ok)
    } else if c == CounterIndex::EncapVxlan6 {
        let inner_dst = f.get(38..54).ok_or("short")?;
        let ok = [2u8, 3]
            .into_iter()
            .any(|n| in_subnet6(inner_dst, n) && r.out.get(38..54) == Some(&public6(n)[..]));
        (70, ok)
    } else {
        return Err(format!("redirected with counter {}", c.name()));
    };
    ensure(r.out.len() == f.len() + overhead, || {
        format!(
            "output {} bytes, input {} plus overhead {overhead}",
            r.out.len(),
            f.len()
        )
    })?;
    ensure(dst_ok, || {
        "outer destination is not the PublicIP of the inner destination's peer".into()
    })?;
    // The inner packet travels unchanged, but for host routing's TTL / hop limit.
    let (a, b) = (&r.out[14 + overhead..], &f[14..]);
    let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
    ensure(diff <= 3, || format!("inner packet changed in {diff} bytes"))
}

fn check_encap(format: Format, f: &[u8], r: &Run) -> Result<(), String> {
    match r.verdict {
        TC_ACT_SHOT => ensure(r.only().is_some_and(|c| ENCAP_DROPS.contains(&c)), || {
            "a drop must move exactly one encap drop counter".into()
        }),
        TC_ACT_REDIRECT => check_encapsulated(format, f, r),
        _ => Err("verdict not defined".into()),
    }
}

// ---- tests -----------------------------------------------------------------------------------

#[test]
fn decap_fuzz() {
    let seed = seed("decap_fuzz");
    for (hook, name, pass, drop) in [
        ("XDP", overlay_common::PROG_DECAP, XDP_PASS, XDP_DROP),
        ("TC", overlay_common::PROG_DECAP_TC, TC_ACT_UNSPEC, TC_ACT_SHOT),
    ] {
        for format in [Format::Udp, Format::Vxlan] {
            in_test_namespace(format, move |mut p| {
                let mut rng = Rng::new(seed ^ format as u64 ^ u64::from(pass));
                let frames = frames(FRAMES / 2, &mut rng, &mut |rng| {
                    if format == Format::Vxlan && rng.chance(30) {
                        tunnel_frame6(rng)
                    } else {
                        tunnel_frame4(format, rng)
                    }
                });
                let label = format!("{hook} decap, {format:?}");
                let ran = fuzz(&mut p, name, &label, seed, &frames, &mut |f, r| {
                    check_decap(format, pass, drop, f, r)
                });
                assert!(ran > frames.len() / 2, "{label}: the kernel ran only {ran} frames");
            });
        }
    }
}

#[test]
fn encap_fuzz() {
    let seed = seed("encap_fuzz");
    for format in [Format::Udp, Format::Vxlan] {
        in_test_namespace(format, move |mut p| {
            let mut rng = Rng::new(seed ^ format as u64);
            let frames = frames(FRAMES / 2, &mut rng, &mut |rng| {
                from_host(OVERLAY_MAC, OVERLAY_MAC, rng)
            });
            let label = format!("encap, {format:?}");
            let ran = fuzz(
                &mut p,
                overlay_common::PROG_ENCAP,
                &label,
                seed,
                &frames,
                &mut |f, r| check_encap(format, f, r),
            );
            assert!(ran > frames.len() / 2, "{label}: the kernel ran only {ran} frames");
        });
    }
}

#[test]
fn bridge_and_host_routing_fuzz() {
    let seed = seed("bridge_and_host_routing_fuzz");
    in_test_namespace(Format::Vxlan, move |mut p| {
        let format = Format::Vxlan;
        let mut rng = Rng::new(seed);

        // Bridge egress: never changes a frame; redirected to a known port, or on to the
        // bridge (counted when the MAC has no port).
        let frames_in = frames(FRAMES, &mut rng, &mut to_host);
        fuzz(
            &mut p,
            overlay_common::PROG_BRIDGE_OUT,
            "bridge",
            seed,
            &frames_in,
            &mut |f, r| {
                ensure(r.out == f, || "the bridge program changed the frame".into())?;
                match (r.verdict, r.only()) {
                    (TC_ACT_REDIRECT, Some(CounterIndex::BridgeRedirect)) => Ok(()),
                    (TC_ACT_UNSPEC, Some(CounterIndex::BridgeUnknownPort)) => Ok(()),
                    (TC_ACT_UNSPEC, None) if r.total() == 0 => Ok(()),
                    _ => Err("verdict and counter do not go together".into()),
                }
            },
        );

        // Into a container: untouched and uncounted, or redirected (counted) with the same
        // length.
        let frames_in = frames(FRAMES, &mut rng, &mut to_host);
        fuzz(
            &mut p,
            PROG_TO_CONTAINER,
            "to container",
            seed,
            &frames_in,
            &mut |f, r| match (r.verdict, r.only()) {
                (TC_ACT_REDIRECT, Some(CounterIndex::ShortcutToContainer)) => {
                    ensure(r.out.len() == f.len(), || "length changed".into())?;
                    ensure(r.out[..6] == CONTAINER_MAC && r.out[6..12] == BRIDGE_MAC, || {
                        "not addressed from the bridge to the container".into()
                    })?;
                    ensure(f.get(30..34) == Some(&[10, 244, 1, 2]), || {
                        "delivered to a container we do not have".into()
                    })
                }
                (TC_ACT_UNSPEC, None) if r.total() == 0 => ensure(r.out == f, || "passed on, but changed".into()),
                _ => Err("verdict and counter do not go together".into()),
            },
        );

        // Out of a container: to the stack (untouched; counted if oversize), dropped with one
        // encap drop counter, or encapsulated towards its peer.
        let frames_in = frames(FRAMES, &mut rng, &mut |rng| from_host(CONTAINER_MAC, BRIDGE_MAC, rng));
        fuzz(
            &mut p,
            PROG_FROM_CONTAINER,
            "from container",
            seed,
            &frames_in,
            &mut |f, r| {
                match r.verdict {
                    TC_ACT_UNSPEC => {
                        ensure(r.out == f, || "passed on, but changed".into())?;
                        ensure(
                            r.total() == 0 || r.only() == Some(CounterIndex::ShortcutOversize),
                            || "passed on with a count other than oversize".into(),
                        )
                    }
                    TC_ACT_SHOT => ensure(r.only().is_some_and(|c| ENCAP_DROPS.contains(&c)), || {
                        "a drop must move exactly one drop counter".into()
                    }),
                    TC_ACT_REDIRECT => {
                        // Counted twice: as a shortcut and as the encapsulation it is.
                        let shortcut = (CounterIndex::ShortcutFromContainer, 1);
                        ensure(r.moved.contains(&shortcut), || {
                            "redirected without the shortcut count".into()
                        })?;
                        let r2 = Run {
                            verdict: r.verdict,
                            out: r.out.clone(),
                            moved: r.moved.iter().copied().filter(|&m| m != shortcut).collect(),
                        };
                        check_encapsulated(format, f, &r2)
                    }
                    _ => Err("verdict not defined".into()),
                }
            },
        );
    });
}
