#!/usr/bin/env bash
# The serving benchmarks side by side with their peers, on a Debian/Ubuntu machine with a
# Rust toolchain. Installs what is missing: nginx (nginx-light), skopeo and docker-registry
# from Debian's packages, oha with `cargo install oha --locked`; then runs
#   cargo bench --bench socket   (GETs and fetch hits vs nginx, herd, cold pulls vs skopeo)
#   cargo bench --bench index    (misses at 100 and 10,000 entries, start-up, first hit)
# Pass bench names to run only those: benches/run.sh socket
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v docker-registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ] || need+=(docker-registry)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing benchmark peers: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  # Keep the packages' own services (nginx on :80, a registry on :5000) from starting.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo_cmd[@]}" chmod +x /usr/sbin/policy-rc.d
    trap '"${sudo_cmd[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
if ! command -v oha >/dev/null 2>&1; then
  echo "installing oha (cargo install oha --locked)"
  cargo install oha --locked --quiet
fi

benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(socket index)
for b in "${benches[@]}"; do
  cargo bench --locked --bench "$b"
done
