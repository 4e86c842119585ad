#!/usr/bin/env bash
# One-time (and idempotent) set-up on a fresh Debian/Ubuntu x86-64 machine:
# Mosquitto from apt, a Python 3.10/3.11 virtualenv in .venv with hiertrain and all extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# Mosquitto (the broker); debootstrap and qemu-user-static for the test suite's emulated arm64 device;
# chromium for the test that opens the dashboard's page.
need=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need="$need mosquitto mosquitto-clients"
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need="$need debootstrap"
command -v qemu-aarch64-static >/dev/null 2>&1 || need="$need qemu-user-static"
command -v chromium >/dev/null 2>&1 || need="$need chromium"  # the dashboard's page, tested headless
if [ -n "$need" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
  else
    echo "setup: no apt-get; install$need yourself (the demo falls back to the embedded broker)" >&2
  fi
fi

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.10 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(not ((3,10) <= sys.version_info[:2] <= (3,11)))'; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: need CPython 3.10 or 3.11 (onnxruntime-training 1.19.2 has no other wheels)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all]" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import hiertrain, onnxruntime, mip, paho.mqtt' >/dev/null
# matplotlib builds its font cache on first import by running fc-list: do it here, once, not in the
# first test that plots (a unit test may not start a process)
MPLBACKEND=Agg .venv/bin/python -c 'import matplotlib.pyplot' >/dev/null 2>&1 || true
