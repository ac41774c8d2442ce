#!/usr/bin/env bash
# The main job: sets everything up, builds slimgrad-gpt (a character-level GPT in plain C++
# whose parameters any slimgrad recipe steps) and runs a short recipe comparison on the default
# corpus, the King James Bible (public domain, from Debian's bible-kjv-text; about 4 MB of
# English), then prints the table: final validation loss, optimizer-state bytes, saved-activation
# bytes and median step time per recipe, and writes the validation-curve plot. A few minutes on
# 2 cores after the build. The full run of README.md uses the same script with nanoGPT's
# configuration on tinyshakespeare.
#   SLIMGRAD_BUILD_DIR   build directory (default build/)
#   SLIMGRAD_DEMO_OUT    where the runs, table.md and val_loss.png go (default $build/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

build=${SLIMGRAD_BUILD_DIR:-build}
out=${SLIMGRAD_DEMO_OUT:-$build/demo}
py=/usr/bin/python3
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$py" >/dev/null
cmake --build "$build" -j "$(nproc)" --target slimgrad_gpt_cli slimgrad_cli

# The corpus: the whole KJV text, one verse per line, without the verse references.
corpus=$build/kjv.txt
if [ ! -s "$corpus" ]; then
  bible -f gen1:1-rev22:21 | sed -E 's/^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ //' >"$corpus.tmp"
  mv "$corpus.tmp" "$corpus"
fi

echo
echo "== slimgrad-gpt on $(wc -c <"$corpus") bytes of the King James Bible: 2 blocks, width 64,"
echo "   4 heads, context 64, batch 8, 300 steps per recipe (lr cosine from the recipe's tuned"
echo "   peak, 30 warm-up steps), every recipe of the full run, VeLoRA and CompAct activations"
"$py" tools/compare_gpt.py --gpt "$build/examples/gpt/slimgrad-gpt" --out "$out" \
  --title "slimgrad-gpt on the KJV (demo: 2 x 64, 300 steps)" \
  -- \
  --data "$corpus" --layers 2 --width 64 --heads 4 --block 64 --batch 8 --steps 300 \
  --warmup 30 --eval-every 50 --eval-batches 10 --sample 0
echo
echo "== plot: $out/val_loss.png; per-run JSON and CSV logs: $out/"

echo
echo "== Optimizer state of LLaMA-1B under every recipe (exact bytes, nothing allocated)"
"$build/tools/slimgrad" memory --all --model llama-1b
