#!/usr/bin/env bash
# Rollout cost against fleet size on the simulated cloud: simulated time and API calls for
# 2 AZs x 2, 10 and 50 instances. Prints figures; asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release -p builder --example rollout_scale
