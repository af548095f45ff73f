#!/usr/bin/env bash
# provision-node.sh CA_DIR ROLE NODE_ID OUT_DIR
#
# On the (offline) CA machine: issue a node certificate and assemble the
# kit to carry to the device: OUT_DIR/certs/{node.crt.pem,node.key.pem,
# ca.crt.pem} and OUT_DIR/kizuna.toml (the role's example config from
# deploy/config, certificates at /etc/kizuna/certs), checked with
# `kizuna config check` against the new certificate. On the device:
#   install -d -m 0750 -o root -g kizuna /etc/kizuna/certs
#   install -m 0644 OUT_DIR/certs/{node.crt.pem,ca.crt.pem} /etc/kizuna/certs/
#   install -m 0600 -o kizuna -g kizuna OUT_DIR/certs/node.key.pem /etc/kizuna/certs/
#   install -m 0640 -g kizuna OUT_DIR/kizuna.toml /etc/kizuna/kizuna.toml
# then start the service (docs/operations.md, section 2).
#
# KIZUNA: the kizuna binary (default: `kizuna` on PATH, else the build).
set -euo pipefail
die() { echo "provision-node.sh: $*" >&2; exit 2; }
(( $# == 4 )) || die "usage: provision-node.sh CA_DIR ROLE NODE_ID OUT_DIR"
ca=$1 role=$2 node=$3 out=$4
root=$(cd "$(dirname "$0")/../.." && pwd)
kizuna=${KIZUNA:-$(command -v kizuna || echo "$root/target/release/kizuna")}
[[ -x "$kizuna" ]] || die "no kizuna binary at $kizuna (set KIZUNA)"
template="$root/deploy/config/$role.toml"
[[ -f "$template" ]] || die "unknown role $role (one of: hq shelter clinic ambulance facility)"
[[ ! -e "$out" ]] || die "$out exists: give a new directory"

mkdir -p "$out"
trap 'rm -rf "$out"' ERR
"$kizuna" certs issue --ca-dir "$ca" --role "$role" --node-id "$node" --out "$out/certs"
cp "$template" "$out/kizuna.toml"
# Check the kit as the device will see it: the config's paths pointed at
# the kit's certificates, in a scratch copy.
check=$(mktemp -d)
trap 'rm -rf "$out" "$check"' ERR
sed -e "s#^dir = \"/etc/kizuna/certs\"#dir = \"$out/certs\"#" \
    -e "s#^data_dir = .*#data_dir = \"$check/data\"#" \
    -e "s#^token_file = .*#token_file = \"$check/metrics.token\"#" \
    "$out/kizuna.toml" > "$check/kizuna.toml"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$check/metrics.token"
"$kizuna" config check --role "$role" "$check/kizuna.toml"
rm -rf "$check"
trap - ERR
echo "kit for $role node $node in $out (certs/, kizuna.toml)"
if [[ "$role" == hq ]]; then
    echo "hq: put a scraper token of 16+ characters in /etc/kizuna/metrics.token on the device"
fi
