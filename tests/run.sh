#!/usr/bin/env bash
# The whole test suite, from a fresh Debian/Ubuntu machine with a Rust toolchain.
# Installs the real test dependencies when they are missing:
#   docker-registry (CNCF distribution), skopeo (an OCI client of the registry endpoint),
#   curl, openssl (test CA), prometheus (promtool), systemd (systemd-analyze,
#   systemd-socket-activate), and, in a virtualenv under target/, kubernetes-validate (which
#   brings PyYAML) and oras (the ORAS Python client);
# then checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v docker-registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ] || need+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 && command -v systemd-socket-activate >/dev/null 2>&1 || need+=(systemd)
command -v script >/dev/null 2>&1 || need+=(bsdutils)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test dependencies: ${need[*]}"
  tests/apt-install.sh "${need[@]}"
fi

venv=target/test-venv
if [ ! -x "$venv/bin/kubernetes-validate" ] || ! "$venv/bin/python" -c 'import oras.client' >/dev/null 2>&1; then
  echo "installing kubernetes-validate and oras into $venv"
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate oras
fi
export WASM_CACHE_TEST_VENV="$PWD/$venv"

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# Benchmarks (`cargo bench`) are not tests: lib, bins and tests only.
cargo test --lib --bins --tests --locked
