#!/usr/bin/env python3
"""Where a TCP test's CPU time goes, from `perf script` output of `perf record -a -g` (the
bench's --while-tcp): samples of iperf3, ksoftirqd and softirq work in the idle task only (the
other processes on a shared machine are left out), grouped by the function the sample hit.

Usage: perf script -i host-gw.data > host-gw.txt; perf-categories.py host-gw.txt ...
"""
import sys, re, collections
cats = [
 ("bpf programs", lambda l: l.startswith("bpf_prog_")),
 ("bpf helpers/redirect", lambda l: l.startswith("bpf_") or l in ("skb_do_redirect","__bpf_redirect","dev_forward_skb","____dev_forward_skb") or "redirect" in l),
 ("gso header check", lambda l: "gso_segment" in l or "ufo_fragment" in l or l=="skb_network_protocol"),
 ("copy user->skb", lambda l: l=="_copy_from_iter"),
 ("copy skb->user", lambda l: l=="_copy_to_iter"),
 ("bridge", lambda l: l.startswith("br_") or l.startswith("nbp_")),
 ("netfilter", lambda l: l.startswith("nf_") or l.startswith("ipt_") or "conntrack" in l or l.startswith("ipv4_conntrack") ),
 ("ip route/forward", lambda l: l.startswith("ip_route") or l.startswith("fib_") or l.startswith("ip_forward") or l.startswith("rt_") or l=="ip_rcv_finish_core"),
 ("veth/dev xmit/backlog", lambda l: l.startswith("veth_") or "dev_queue_xmit" in l or "netif_" in l or l in("process_backlog","enqueue_to_backlog","validate_xmit_skb.isra.0","dev_hard_start_xmit","eth_type_trans")),
 ("skb alloc/free", lambda l: "kmem_cache" in l or "kfree" in l or "alloc" in l or "free" in l or l.startswith("skb_release") or l=="pskb_expand_head" or "page" in l),
 ("tcp", lambda l: l.startswith("tcp_") or l.startswith("__tcp") or l.startswith("inet_") or l.startswith("sk_") or l.startswith("__sk")),
]
def main(path):
    counts=collections.Counter(); total=0; allsamples=0
    comm=None; leaf=None; stack=[]
    def flush():
        nonlocal total
        if comm is None: return
        if not (comm.startswith("iperf3") or comm.startswith("ksoftirqd") or comm=="swapper"): return
        if leaf is None: return
        if comm=="swapper" and not any("net_rx_action" in s or "handle_softirqs" in s for s in stack): return
        total+=1
        for name,f in cats:
            if f(leaf): counts[name]+=1; return
        counts["other"]+=1
    for line in open(path, errors="replace"):
        if not line.strip():
            flush(); comm=None; leaf=None; stack=[]; continue
        if not line.startswith((" ","\t")):
            comm=line.split()[0]; allsamples+=1; continue
        parts=line.split()
        if len(parts)>=2:
            sym=parts[1].split("+")[0]
            if leaf is None: leaf=sym
            stack.append(sym)
    flush()
    return total, allsamples, counts
for p in sys.argv[1:]:
    total, alls, c = main(p)
    print(f"== {p}: {total} network-path samples of {alls}")
    for k,v in c.most_common():
        print(f"   {k:<24} {100*v/total:5.1f}%")
