#!/usr/bin/env bash
# Kizuna testbed: real network namespaces joined by a bridge, and faults
# injected with nftables (the kernel has no netem). Idempotent; run as root.
#
#   netns.sh up N PREFIX     namespaces PREFIX-1..N at 10.77.0.1..N/24, each
#                            with a veth into bridge kz-br0, which lives in its
#                            own namespace PREFIX-br (nothing touches the root
#                            namespace's interfaces, nothing leaks to the LAN)
#   netns.sh down PREFIX     remove every namespace PREFIX-*
#   netns.sh isolate NS      link down NS's veth (bridge side): a full cut
#   netns.sh rejoin NS       link it up again
#   netns.sh cut A B         nftables: A and B drop each other's packets
#   netns.sh heal A B        undo cut (and oneway in both directions)
#   netns.sh oneway A B      nftables in B drops packets from A only
#   netns.sh loss NS PCT     drop PCT % of incoming UDP on NS's veth at random
#   netns.sh clear NS        remove every nftables rule in NS
#
# A and B are namespace names (PREFIX-i). Faults apply to UDP/TCP on the veth
# only, never to loopback, so a node's HTTP API on 127.0.0.1 stays reachable
# with `ip netns exec NS curl ...`. IPv6 is disabled in the namespaces (mDNS
# then announces only the 10.77.0.X address).
set -euo pipefail

SUBNET=10.77.0
BR=kz-br0

die() { echo "netns.sh: $*" >&2; exit 2; }
ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }
# PREFIX-i -> i
index_of() { local i="${1##*-}"; [[ "$i" =~ ^[0-9]+$ ]] || die "not a node namespace: $1"; echo "$i"; }
addr_of() { echo "$SUBNET.$(index_of "$1")"; }
prefix_of() { echo "${1%-*}"; }
# veth names are limited to 15 bytes: kz<hash>-<i>
veth_of() {
    local h; h=$(printf '%s' "$(prefix_of "$1")" | md5sum | cut -c1-6)
    echo "kz$h-$(index_of "$1")"
}

# The fault table of a namespace: one set of blocked sources, one loss rule.
ensure_table() {
    local ns=$1 dev; dev=$(veth_of "$ns")n
    ip netns exec "$ns" nft -f - <<NFT
table inet kizuna {
    set blocked { type ipv4_addr; }
    chain input {
        type filter hook input priority 0; policy accept;
    }
}
NFT
    if ! ip netns exec "$ns" nft list chain inet kizuna input | grep -q '@blocked'; then
        ip netns exec "$ns" nft add rule inet kizuna input iifname "$dev" ip saddr @blocked drop
    fi
}

cmd_up() {
    local n=$1 prefix=$2 br="$2-br"
    [[ "$n" =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 250 )) || die "N must be 1..250"
    ns_exists "$br" || ip netns add "$br"
    ip -n "$br" link set lo up
    if ! ip -n "$br" link show "$BR" >/dev/null 2>&1; then
        ip -n "$br" link add "$BR" type bridge
    fi
    # Link-local multicast (mDNS, 224.0.0.251) is flooded regardless, but
    # do not depend on an IGMP querier.
    ip -n "$br" link set "$BR" type bridge mcast_snooping 0
    ip -n "$br" link set "$BR" up
    for i in $(seq 1 "$n"); do
        local ns="$prefix-$i" v; v=$(veth_of "$ns")
        ns_exists "$ns" || ip netns add "$ns"
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        ip -n "$ns" link set lo up
        if ! ip -n "$ns" link show "${v}n" >/dev/null 2>&1; then
            ip -n "$br" link del "$v" 2>/dev/null || true
            ip link add "$v" type veth peer name "${v}n"
            ip link set "$v" netns "$br"
            ip link set "${v}n" netns "$ns"
        fi
        ip -n "$br" link set "$v" master "$BR"
        ip -n "$br" link set "$v" up
        ip -n "$ns" addr replace "$SUBNET.$i/24" dev "${v}n"
        ip -n "$ns" link set "${v}n" multicast on
        ip -n "$ns" link set "${v}n" up
        ip -n "$ns" route replace 224.0.0.0/4 dev "${v}n"
        ensure_table "$ns"
    done
}

cmd_down() {
    local prefix=$1
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^${prefix}-([0-9]+|br)\$" || true); do
        ip netns del "$ns" || true
    done
}

need_ns() { ns_exists "$1" || die "no namespace $1"; }

br_port() { echo "$(prefix_of "$1")-br"; }

cmd_isolate() { need_ns "$1"; ip -n "$(br_port "$1")" link set "$(veth_of "$1")" down; }
cmd_rejoin() { need_ns "$1"; ip -n "$(br_port "$1")" link set "$(veth_of "$1")" up; }

block() { # in namespace $1, drop packets from address $2
    ensure_table "$1"
    ip netns exec "$1" nft add element inet kizuna blocked "{ $2 }"
}
unblock() {
    ensure_table "$1"
    ip netns exec "$1" nft delete element inet kizuna blocked "{ $2 }" 2>/dev/null || true
}

cmd_cut() { need_ns "$1"; need_ns "$2"; block "$1" "$(addr_of "$2")"; block "$2" "$(addr_of "$1")"; }
cmd_heal() { need_ns "$1"; need_ns "$2"; unblock "$1" "$(addr_of "$2")"; unblock "$2" "$(addr_of "$1")"; }
cmd_oneway() { need_ns "$1"; need_ns "$2"; block "$2" "$(addr_of "$1")"; }

cmd_loss() {
    local ns=$1 pct=$2
    need_ns "$ns"
    [[ "$pct" =~ ^[0-9]+$ ]] && (( pct <= 100 )) || die "PERCENT must be 0..100"
    ip netns exec "$ns" nft delete table inet kizuna_loss 2>/dev/null || true
    ip netns exec "$ns" nft -f - <<NFT
table inet kizuna_loss {
    chain input {
        type filter hook input priority -10; policy accept;
        iifname "$(veth_of "$ns")n" numgen random mod 100 < $pct drop
    }
}
NFT
}

cmd_clear() {
    need_ns "$1"
    ip netns exec "$1" nft delete table inet kizuna_loss 2>/dev/null || true
    ip netns exec "$1" nft delete table inet kizuna 2>/dev/null || true
    ensure_table "$1"
}

[[ $(id -u) -eq 0 ]] || die "run as root"
case "${1:-}" in
    up) (( $# == 3 )) || die "usage: up N PREFIX"; cmd_up "$2" "$3" ;;
    down) (( $# == 2 )) || die "usage: down PREFIX"; cmd_down "$2" ;;
    isolate) (( $# == 2 )) || die "usage: isolate NS"; cmd_isolate "$2" ;;
    rejoin) (( $# == 2 )) || die "usage: rejoin NS"; cmd_rejoin "$2" ;;
    cut) (( $# == 3 )) || die "usage: cut A B"; cmd_cut "$2" "$3" ;;
    heal) (( $# == 3 )) || die "usage: heal A B"; cmd_heal "$2" "$3" ;;
    oneway) (( $# == 3 )) || die "usage: oneway A B"; cmd_oneway "$2" "$3" ;;
    loss) (( $# == 3 )) || die "usage: loss NS PERCENT"; cmd_loss "$2" "$3" ;;
    clear) (( $# == 2 )) || die "usage: clear NS"; cmd_clear "$2" ;;
    *) die "usage: netns.sh up N PREFIX | down PREFIX | isolate NS | rejoin NS | cut A B | heal A B | oneway A B | loss NS PCT | clear NS" ;;
esac
