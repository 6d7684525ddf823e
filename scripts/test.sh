#!/usr/bin/env bash
# The test command README gives and .ci/run runs: every test, release build.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release "$@"
