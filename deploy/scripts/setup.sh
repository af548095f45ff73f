#!/usr/bin/env bash
# setup.sh — install and start everything Kizuna's build and tests need on a
# fresh Debian 12 machine. Idempotent; run as root. Used by `make test`,
# `make demo` and .ci/run.
#
#   build:  pkg-config, libpcsclite-dev (the pcsc crate links libpcsclite)
#   tests:  pcscd + vsmartcard-vpcd (card tier), nftables + iproute2
#           (namespace tier), python3-aiosmtpd (SMTP tier), libxml2-utils
#           (xmllint: PFIF exports checked against docs/schemas/pfif-1.4.xsd),
#           systemd (systemd-analyze checks the service unit),
#           chromium + chromium-driver + fonts-noto-cjk (browser tier: the
#           screens in headless Chromium over WebDriver, screenshots with
#           Japanese)
#   tools:  cargo-nextest (on the machine image; installed from crates.io
#           only if missing), cargo-fuzz (fuzz/, installed only if
#           missing) and the nightly toolchain it builds with (checked)
set -euo pipefail

need=()
for pkg in pkg-config libpcsclite-dev pcscd vsmartcard-vpcd nftables iproute2 python3-aiosmtpd libxml2-utils curl systemd \
           chromium chromium-driver fonts-noto-cjk; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "setup: system packages present"
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# Fuzzing (fuzz/run.sh): cargo-fuzz from crates.io (only if missing) and
# the nightly toolchain libFuzzer builds need (on the machine image).
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  # Toolchains come with the machine image (no download from here). The
  # fuzz targets (libFuzzer) build only on nightly, and `make test` runs them.
  echo "setup: no nightly Rust toolchain: the fuzz targets of make test need it (rustup toolchain install nightly)" >&2
  exit 1
fi

# The card tier talks to pcscd through the vpcd virtual reader.
"$(dirname "$0")/card-stack.sh" start
