#!/usr/bin/env bash
# The main job: sets everything up, builds the slimgrad CLI (and the benchmark program when
# bench/ has sources), then takes a short tour:
#   (a) a real gradient: the weight gradients of a small character-level MLP on English text
#   (b) `slimgrad transform` (GWT's Haar DWT, level 2): energy in approximation vs details,
#       then `--inverse` and the round-trip error
#   (c) `slimgrad bench transform`: Haar level 2 on 4096x4096
#   (d) `slimgrad memory --all`: the optimizer-state table of every recipe for LLaMA-1B
#   (e) `slimgrad bench step`: one AdamW and one GWT step over all of LLaMA-60M
# About a minute on 2 cores after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

build=${SLIMGRAD_BUILD_DIR:-build}  # build directory (default build/)
py=/usr/bin/python3
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$py" >/dev/null
targets=(slimgrad_cli)
if cmake --build "$build" --target help | grep slimgrad_bench >/dev/null; then  # no -q: SIGPIPE
  targets+=(slimgrad_bench)
fi
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
slimgrad() { "$build/tools/slimgrad" "$@"; }
show() { echo "\$ $*"; "$@"; }

echo
echo "== $(slimgrad --version): a tour of the command-line tool"

echo
echo "== (a) A real gradient: character-level MLP (8 chars x 32 -> 256 -> vocab) on English text"
"$py" tools/make_gradient.py "$work/grad.safetensors"

echo
echo "== (b) GWT's transform: Haar, 2 levels, along each row (in_features), pywt.wavedec-exact"
show slimgrad transform --wavelet haar --levels 2 "$work/grad.safetensors" "$work/coeffs.safetensors"
"$py" tools/demo_stats.py energy "$work/coeffs.safetensors"
echo "   (This MLP's in_features are 8 concatenated character embeddings, with no order along a"
echo "    row, so 'a' holds about its white-noise share. GWT keeps Adam state only for 'a': 25%"
echo "    of the coefficients at level 2, a 75% cut of the moments; details pass through.)"
show slimgrad transform --inverse --wavelet haar --levels 2 "$work/coeffs.safetensors" "$work/back.safetensors"
"$py" tools/demo_stats.py error "$work/grad.safetensors" "$work/back.safetensors"

echo
echo "== (c) Speed: forward + inverse on a 4096x4096 float32 matrix (LLaMA-7B attention size)"
show slimgrad bench transform --wavelet haar --levels 2 --shape 4096x4096 --repeat 10

echo
echo "== (d) Optimizer state for LLaMA-1B (1.34B parameters), every recipe, exact bytes"
echo "   (attention and MLP matrices through the transform; embedding, lm_head, norms plain)"
show slimgrad memory --all --model llama-1b

echo
echo "== (e) One optimizer step over every weight of LLaMA-60M (58M parameters, embeddings too)"
show slimgrad bench step --optimizer adamw --model llama-60m
show slimgrad bench step --optimizer gwt --model llama-60m

echo
echo "== done. Try: $build/tools/slimgrad --help"
