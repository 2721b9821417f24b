#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh Debian machine, then
# runs formatting, lints, docs and every test of the workspace against real servers.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/empty.proto ] || need+=(libprotobuf-dev)
[ -x /usr/bin/etcd ] || need+=(etcd-server)
[ -x /usr/bin/etcdctl ] || need+=(etcd-client)
[ -f /usr/share/java/zookeeper.jar ] || need+=(zookeeper)
# The TLS tests make a throwaway PKI with openssl.
[ -x /usr/bin/openssl ] || need+=(openssl)
# Fault tests pause and resume servers with kill(1).
[ -x /bin/kill ] || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  # A freshly booted machine's apt-daily may hold the dpkg lock for a while: wait for it.
  $sudo_cmd apt-get -o DPkg::Lock::Timeout=300 update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
    install -y -qq "${need[@]}" >/dev/null
fi
command -v java >/dev/null 2>&1 || { echo "java is required for ZooKeeper (install openjdk-17-jre-headless)"; exit 1; }

# A one-shot run gains nothing from incremental caches, and they cost a clean build ~1 GB.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
echo "==> cargo test"
# Each conformance case records its result; start the run's summary empty.
rm -rf "${CARGO_TARGET_DIR:-target}/conformance"
status=0
# Bounded: a test that hangs (one that starts no server has no watchdog) fails the run
# instead of holding CI forever; a full run takes about 20 minutes on 2 cores.
timeout -k 60 90m cargo test --workspace --no-fail-fast "$@" || status=$?
echo "==> conformance summary"
cargo run --quiet -p conformance-tests --bin conformance-report || true
exit "$status"
