#!/usr/bin/env bash
# Installs what slimgrad's build, tests, benchmarks and demo need on a fresh Debian 12 machine
# (as root). Packages already present are left alone; nothing is downloaded at configure time.
set -euo pipefail

packages=(cmake g++ make clang-14 clang-format-14 libomp-14-dev libclang-rt-14-dev
          libeigen3-dev libopenblas-openmp-dev doctest-dev libbenchmark-dev nlohmann-json3-dev libcli11-dev
          python3 python3-numpy python3-pywt bible-kjv gnuplot-nox)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
