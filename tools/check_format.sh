#!/usr/bin/env bash
# Fails if any C++/CUDA source differs from the repository's .clang-format (clang-format 14).
set -euo pipefail
cd "$(dirname "$0")/.."
files=$(git ls-files '*.hpp' '*.cpp' '*.cuh' '*.cu' '*.h')
clang-format-14 --dry-run -Werror $files
echo "format: $(echo "$files" | wc -w) files clean"
