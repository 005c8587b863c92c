#!/usr/bin/env bash
# The serving benchmarks side by side with their peers, on a Debian/Ubuntu machine with a
# Rust toolchain. Installs what is missing: nginx (nginx-light), skopeo and docker-registry
# from Debian's packages, oha with `cargo install oha --locked`; then runs
#   cargo bench --bench socket   (GETs and fetch hits vs nginx, herd, cold pulls vs skopeo)
#   cargo bench --bench index    (misses at 100 and 10,000 entries, start-up, first hit)
# Pass bench names to run only those: benches/run.sh socket
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v docker-registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ] || need+=(docker-registry)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing benchmark peers: ${need[*]}"
  tests/apt-install.sh "${need[@]}"
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
