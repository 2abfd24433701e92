#!/usr/bin/env bash
# Makes sure cargo, a C compiler and make are available (ring, the TLS crypto, builds C code;
# jemalloc, payoutd's allocator, builds with make).
set -euo pipefail
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v cc >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
  echo "ensure-rust: installing a C toolchain (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2 && $SUDO apt-get install -y -qq build-essential curl ca-certificates >&2
fi
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "ensure-rust: installing the Rust toolchain with rustup" >&2
  command -v curl >/dev/null 2>&1 || { $SUDO apt-get update -qq >&2; $SUDO apt-get install -y -qq curl ca-certificates >&2; }
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >&2
fi
