#!/usr/bin/env python3
"""Runs slimgrad-gpt once per recipe on the same data, seed and model, then writes a Markdown
table (final validation loss, optimizer-state bytes, saved-activation bytes, median step time)
and a PNG of the validation-loss curves (gnuplot).

    python3 tools/compare_gpt.py --gpt build/examples/gpt/slimgrad-gpt --out DIR \\
        [--recipe 'LABEL: SLIMGRAD-GPT ARGS' ...] [--jobs N] -- COMMON SLIMGRAD-GPT ARGS

Each --recipe is a label, a colon and the arguments that run adds (e.g.
'gwt: --optimizer gwt --lr 3e-3'); without --recipe the tuned list of README.md is used (--with-defaults: that list, then the --recipe ones). The
common arguments (data, model, steps...) follow `--`. The first recipe is the reference of the
"vs" columns. Writes DIR/<label>.json and .csv per run, DIR/table.md, DIR/val_loss.png and prints
the table.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

# The recipes of the full run (README.md) at the learning rates that won its sweep (2000 steps,
# nanoGPT's configuration; README.md lists every rate tried). Low-rank recipes use rank n/4 = 32
# of the 128-wide model (GaLore's LLaMA ratio), T = 200 as in the papers; α = 0.25 scales the
# compressed updates of gwt, galore and subtrack, hence their larger rates. --split-qkv hands
# the optimizer q, k and v as three tensors, as LLaMA's q_proj, k_proj and v_proj of the papers'
# runs (one fused c_attn gave APOLLO-Mini a single tensor-wise scale for all three).
DEFAULT_RECIPES = [
    "adamw: --optimizer adamw --lr 4e-3",
    "gwt: --optimizer gwt --lr 2e-2 --set levels=2",
    "galore: --optimizer galore --lr 3.2e-2 --set rank=32",
    "subtrack: --optimizer subtrack --lr 3.6e-2 --set rank=32 --split-qkv",
    "apollo: --optimizer apollo --lr 4.8e-2 --set rank=32",
    # APOLLO-Mini's official 60M/130M setting (sqrt(scale) applied before the limiter) with
    # scale 512 instead of 128: the projections step as with 128 at lr 2e-2 (lr·sqrt(scale)),
    # while the embeddings and LayerNorm gains (plain Adam) and the decay take lr 1e-2.
    "apollo-mini: --optimizer apollo-mini --lr 1e-2 --set scale_front=true --set scale=512 "
    "--split-qkv",
    "adam8bit: --optimizer adam8bit --lr 3e-3",
    "adafactor: --optimizer adafactor --lr 3e-3 --set relative_step=false "
    "--set scale_parameter=false",
    "adamw+velora: --optimizer adamw --lr 3e-3 --activations velora --act-set subtoken=4",
    # CompAct: its recipe on the m×r gradients of CompAct layers (r = n/4); 1.6e-2 and 2.4e-2 tried.
    "compact: --optimizer compact --lr 2.4e-2 --activations compact",
]


# Distinct line colours (a run past the list repeats them dashed).
COLORS = ["#000000", "#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628",
          "#f781bf", "#17becf", "#999999", "#bcbd22", "#1f3a93"]


def human(n):
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def run(gpt, out, label, args, common, threads):
    cmd = [gpt] + common + args + ["--json", os.path.join(out, label + ".json"),
                                   "--log", os.path.join(out, label + ".csv"), "--quiet"]
    # Passive waits: on a shared machine, spinning OpenMP threads slow everyone down.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.setdefault("OMP_WAIT_POLICY", "passive")
    start = time.time()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    took = time.time() - start
    if p.returncode != 0:
        sys.exit(f"compare_gpt: {label} failed ({' '.join(map(shlex.quote, cmd))}):\n{p.stdout}")
    print(f"compare_gpt: {label} done in {took:.0f} s", file=sys.stderr, flush=True)
    with open(os.path.join(out, label + ".json")) as f:
        return json.load(f)


def table(rows):
    ref = rows[0][1]
    lines = ["| recipe | lr | val loss | vs " + rows[0][0] + " | optimizer state | vs " +
             rows[0][0] + " | saved activations (projections) | median step |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['lr']:g} | {r['val_loss']:.4f} | "
            f"{100 * (r['val_loss'] / ref['val_loss'] - 1):+.1f}% | "
            f"{human(r['optimizer_state_bytes'])} | "
            f"{100 * r['optimizer_state_bytes'] / ref['optimizer_state_bytes']:.0f}% | "
            f"{human(r['saved_activation_bytes'])} "
            f"({human(r['linear_saved_activation_bytes'])}) | "
            f"{r['median_step_ms']:.1f} ms |")
    return "\n".join(lines) + "\n"


def plot(out, rows, title):
    if not shutil.which("gnuplot"):
        print("compare_gpt: gnuplot not found; no plot", file=sys.stderr)
        return
    series = []
    tmp = tempfile.mkdtemp()
    for label, r in rows:
        path = os.path.join(tmp, label + ".val.dat")
        with open(path, "w") as f:
            for step, loss in r["val_curve"]:
                f.write(f"{step} {loss}\n")
        color = COLORS[len(series) % len(COLORS)]
        dash = 1 + len(series) // len(COLORS)
        series.append(f"'{path}' using 1:2 with linespoints lw 2 pt 7 ps 0.5 dt {dash} "
                      f"lc rgb '{color}' title '{label}'")
    low = min(min(v for _, v in r["val_curve"]) for _, r in rows)
    script = "\n".join([
        "set terminal pngcairo size 1000,620 font 'sans,11'",
        f"set output '{os.path.join(out, 'val_loss.png')}'",
        f"set title '{title}'",
        "set xlabel 'step'", "set ylabel 'validation loss (nats per byte)'",
        "set grid", "set key top right",
        f"set yrange [{low - 0.05:.3f}:{low + 1.0:.3f}]",
        "plot " + ", \\\n     ".join(series), ""])
    try:
        subprocess.run(["gnuplot"], input=script, text=True, check=True)
    finally:
        shutil.rmtree(tmp)


def main():
    argv = sys.argv[1:]
    common = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpt", help="the slimgrad-gpt executable")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--recipe", action="append", help="'LABEL: ARGS' (repeatable)")
    ap.add_argument("--with-defaults", action="store_true",
                    help="run the default recipes first, then the --recipe ones")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=0,
                    help="OpenMP threads per run (0: cores / jobs)")
    ap.add_argument("--title", default="slimgrad-gpt: validation loss")
    ap.add_argument("--no-run", action="store_true",
                    help="only tabulate and plot the DIR/<label>.json of earlier runs")
    a = ap.parse_args(argv)
    if not a.gpt and not a.no_run:
        ap.error("--gpt is required unless --no-run")
    recipes = []
    specs = (DEFAULT_RECIPES if a.with_defaults or not a.recipe else []) + (a.recipe or [])
    for spec in specs:
        label, sep, rest = spec.partition(":")
        if not sep or not label.strip():
            sys.exit(f"compare_gpt: --recipe expects 'LABEL: ARGS', got '{spec}'")
        recipes.append((label.strip(), shlex.split(rest)))
    os.makedirs(a.out, exist_ok=True)
    if a.no_run:
        rows = []
        for label, _ in recipes:
            with open(os.path.join(a.out, label + ".json")) as f:
                rows.append((label, json.load(f)))
    else:
        threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = [pool.submit(run, a.gpt, a.out, label, args, common, threads)
                       for label, args in recipes]
            rows = [(label, f.result()) for (label, _), f in zip(recipes, futures)]
    text = table(rows)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text)
    plot(a.out, rows, a.title)
    print(text, end="")


if __name__ == "__main__":
    main()
