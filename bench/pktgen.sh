#!/bin/bash
# pktgen.sh - send a UDP flood with the kernel's pktgen (CONFIG_NET_PKTGEN).
#
# Used by `cargo xtask bench --generator pktgen` (inside the generator
# namespace, out of g0), and by hand on a sender host wired to the machine
# under test, where a NIC makes the numbers real. pktgen sends UDP only, so
# only the `udp` (closed port) and `wg` (port 51820) mixes can use it.
#
# Usage: pktgen.sh -i IFACE -m DST_MAC -d DST_IP [-s SRC | -s FIRST-LAST]
#                  [-p DST_PORT] [-c CPU] [-t SECONDS | -n COUNT]
#                  [-l FRAME_LEN] [-k CLONE_SKB]
#   -s FIRST-LAST  random source address from the range, per packet
#   -l             frame length without FCS (default 60: 64 bytes on the wire)
#   -k             times each skb is reused (default 0; physical NICs: 1000,
#                  much faster; veth and most virtual devices refuse it)
# Prints `sent=N` last. Stops after -t seconds (default 5) or -n packets.
#
# Example, sender host with a 10G NIC (eth2) cabled to the DUT's eth1:
#   modprobe pktgen
#   ./pktgen.sh -i eth2 -m <DUT eth1 MAC> -d <DUT eth1 IP> -p 9999 -c 2 -t 10 -k 1000
set -euo pipefail

iface="" dst_mac="" dst_ip="" src="" port=9999 cpu=0 seconds=5 count=0 len=60 clone=0
while getopts "i:m:d:s:p:c:t:n:l:k:h" opt; do
	case $opt in
	i) iface=$OPTARG ;; m) dst_mac=$OPTARG ;; d) dst_ip=$OPTARG ;; s) src=$OPTARG ;;
	p) port=$OPTARG ;; c) cpu=$OPTARG ;; t) seconds=$OPTARG ;; n) count=$OPTARG ;;
	l) len=$OPTARG ;; k) clone=$OPTARG ;;
	*) sed -n '2,22p' "$0"; exit 2 ;;
	esac
done
[ -n "$iface" ] && [ -n "$dst_mac" ] && [ -n "$dst_ip" ] || { sed -n '2,22p' "$0" >&2; exit 2; }

if [ ! -d /proc/net/pktgen ] && ! modprobe pktgen 2>/dev/null; then
	echo "pktgen.sh: this kernel has no pktgen (modprobe pktgen failed)" >&2
	exit 1
fi
thread=/proc/net/pktgen/kpktgend_$cpu
[ -e "$thread" ] || { echo "pktgen.sh: no pktgen thread for CPU $cpu ($thread)" >&2; exit 1; }

pgset() { # FILE COMMAND: pktgen answers in the same file
	echo "$2" > "$1"
	if ! grep -q "Result: OK" "$1"; then
		echo "pktgen.sh: '$2' -> $(grep Result: "$1")" >&2
		exit 1
	fi
}

dev=/proc/net/pktgen/$iface
pgset "$thread" "rem_device_all"
pgset "$thread" "add_device $iface"
pgset "$dev" "count $count"
pgset "$dev" "clone_skb $clone"
pgset "$dev" "pkt_size $len"
pgset "$dev" "delay 0"
pgset "$dev" "dst $dst_ip"
pgset "$dev" "dst_mac $dst_mac"
pgset "$dev" "udp_src_min 40000"
pgset "$dev" "udp_src_max 40000"
pgset "$dev" "udp_dst_min $port"
pgset "$dev" "udp_dst_max $port"
case $src in
*-*)
	pgset "$dev" "src_min ${src%-*}"
	pgset "$dev" "src_max ${src#*-}"
	pgset "$dev" "flag IPSRC_RND"
	;;
?*) pgset "$dev" "src_min $src"; pgset "$dev" "src_max $src" ;;
esac

# `start` blocks until the count is reached or `stop` is written.
echo start > /proc/net/pktgen/pgctrl &
runner=$!
if [ "$count" = 0 ]; then
	sleep "$seconds"
	echo stop > /proc/net/pktgen/pgctrl
fi
wait "$runner" || true
sent=$(sed -n 's/.*pkts-sofar: \([0-9]*\).*/\1/p' "$dev")
pgset "$thread" "rem_device_all"
echo "sent=${sent:-0}"
