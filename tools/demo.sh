#!/usr/bin/env bash
# The main job: sets everything up, builds, and takes a short tour of the slimgrad CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=/usr/bin/python3 >/dev/null
cmake --build build -j "$(nproc)" --target slimgrad_cli
./build/tools/slimgrad
