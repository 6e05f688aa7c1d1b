#!/usr/bin/env bash
# Installs what the tests need, only where missing. Safe to run again.
set -euo pipefail

need_apt=()
command -v ssh >/dev/null || need_apt+=(openssh-client)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v asciinema >/dev/null || need_apt+=(asciinema)
# etcd for the etcd backend's tests (the package starts no server here).
command -v etcd >/dev/null || need_apt+=(etcd-server)
# PostgreSQL for the audit log's tests (the tests start private servers).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
# A real browser for the web console's tests (driven by playwright-core).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${need_apt[*]}: run as root or install them with apt-get" >&2
    exit 1
  fi
  echo "==> apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${need_apt[@]}" >/dev/null 2>&1 || {
    apt-get update >/dev/null
    apt-get install -y --no-install-recommends "${need_apt[@]}" >/dev/null
  }
fi

# Test servers that are not Debian packages, kept out of the tree and built
# or downloaded once: moto (an S3 server, PyPI) and gcp-storage-emulator
# (PyPI) in their own virtual
# environment (Debian's pip is externally managed), s3s-fs (an S3 server on
# disk that checks signatures, crates.io), Azurite (the Azure blob
# emulator, npm) with the Azure SDK the tests use to create a container.
tools="${TURNSTILE_TEST_TOOLS:-$HOME/.cache/turnstile-test-tools}"
mkdir -p "$tools"
if [ ! -x "$tools/venv/bin/moto_server" ] || [ ! -x "$tools/venv/bin/gcp-storage-emulator" ]; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    echo "==> apt-get install python3-venv"
    apt-get install -y --no-install-recommends python3-venv >/dev/null 2>&1 || {
      apt-get update >/dev/null
      apt-get install -y --no-install-recommends python3-venv >/dev/null
    }
  fi
  echo "==> moto (S3 server) and gcp-storage-emulator into $tools/venv"
  [ -x "$tools/venv/bin/pip" ] || python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q "moto[s3]==5.1.4" "flask==3.1.1" "flask-cors==6.0.0" \
    "gcp-storage-emulator==2026.7.19"
fi
if [ ! -x "$tools/bin/s3s-fs" ]; then
  echo "==> cargo install s3s-fs 0.14.1 into $tools (once; about two minutes)"
  cargo install --quiet --root "$tools" s3s-fs --version 0.14.1 --features binary --locked
fi

if [ ! -x "$tools/node/node_modules/.bin/azurite-blob" ] || [ ! -d "$tools/node/node_modules/@azure/storage-blob" ]; then
  if ! command -v npm >/dev/null; then
    echo "missing npm (Node.js): Azurite, the Azure blob emulator, is an npm package" >&2
    exit 1
  fi
  echo "==> azurite 3.35.0 (Azure blob emulator) into $tools/node"
  mkdir -p "$tools/node"
  npm install --silent --no-audit --no-fund --prefix "$tools/node" \
    azurite@3.35.0 @azure/storage-blob@12.28.0 >/dev/null
fi

# playwright-core drives the installed Chromium (it cannot download its own
# browsers here); the web console's tests run their scripts with it.
if [ ! -d "$tools/node/node_modules/playwright-core" ]; then
  echo "==> playwright-core 1.65.1 into $tools/node"
  mkdir -p "$tools/node"
  npm install --silent --no-audit --no-fund --prefix "$tools/node" playwright-core@1.65.1 >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> cargo install cargo-nextest"
  cargo install cargo-nextest --locked
fi

# sshd's privilege-separation directory (the package creates it at boot only).
if [ "$(id -u)" -eq 0 ]; then
  mkdir -p /run/sshd
  # Sessions run as this login in the tests; '*' unlocks it for a stock sshd
  # with UsePAM no while still allowing no password login.
  if ! id turnstile-test >/dev/null 2>&1; then
    echo "==> useradd turnstile-test"
    useradd --create-home --shell /bin/sh turnstile-test
  fi
  usermod -p '*' turnstile-test
else
  echo "warning: not root: tests that need the turnstile-test login or a private sshd will fail" >&2
fi
