#!/usr/bin/env bash
# Installs what the tests need, only where missing. Safe to run again.
set -euo pipefail

need_apt=()
command -v ssh >/dev/null || need_apt+=(openssh-client)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v asciinema >/dev/null || need_apt+=(asciinema)

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
