#!/usr/bin/env python3
"""Side-by-side: slimgrad's Dwt (CPU backend) against PyWavelets on the same data, one run.

For each case, one "iteration" is a forward and an inverse multi-level DWT along the rows of a
4096x4096 float32 matrix (GWT's layout, algorithms.md §1.1), boundary mode 'zero':
  PyWavelets: c = pywt.wavedec(x, w, level=L, mode='zero', axis=1)
              y = pywt.waverec(c, w, mode='zero', axis=1)
  slimgrad:   the slimgrad_bench cases dwt_<w>_L<L>_fwd_inv (bench/bench_dwt.cpp)
Bandwidth counts 2 passes of read + write of the matrix: 4*4*4096^2 bytes per iteration. The
copy bandwidth of this machine is measured in the same run by dwt_memcpy_baseline (std::memcpy
of the same bytes, in slimgrad_bench) and, for reference, by numpy.copyto.

This script builds nothing. Usage:
  /usr/bin/python3 bench/compare_pywt.py build/bench/slimgrad_bench [--output bench/results/dwt.md]
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy as np
import pywt

N = 4096
CASES = [("haar", 1), ("haar", 2), ("db2", 2), ("db4", 2)]
BYTES = 4 * 4 * N * N  # 2 passes x (read + write) x 4 bytes x N^2


def median_ms(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def pywt_case(x, wavelet, level, repeats):
    def run():
        c = pywt.wavedec(x, wavelet, level=level, mode="zero", axis=1)
        y = pywt.waverec(c, wavelet, mode="zero", axis=1)
        assert y.dtype == np.float32
        return y

    y = run()
    err = float(np.max(np.abs(y[:, :N] - x)))  # sanity: a round trip
    assert err < 1e-4, err
    return median_ms(run, repeats)


def numpy_copy_gbs(x, repeats):
    a = np.empty_like(x)
    b = np.empty_like(x)

    def run():
        np.copyto(a, x)  # two copies = the bytes of one forward + inverse
        np.copyto(b, a)

    return BYTES / (median_ms(run, repeats) * 1e-3) / 1e9


def slimgrad_medians(binary, repetitions):
    cmd = [
        binary,
        "--benchmark_filter=^dwt_(memcpy_baseline|(haar|db2|db4)_L[12]_fwd_inv)/",
        "--benchmark_format=json",
        "--benchmark_repetitions=%d" % repetitions,
        "--benchmark_report_aggregates_only=true",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    medians = {}
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        name = b["run_name"].split("/")[0]
        medians[name] = b["real_time"] * scale[b["time_unit"]]
    return medians, cmd


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def machine():
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model, os.cpu_count()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("slimgrad_bench", help="path to the slimgrad_bench binary")
    ap.add_argument("--repeats", type=int, default=9, help="PyWavelets timings per case")
    ap.add_argument("--repetitions", type=int, default=9, help="Google Benchmark repetitions")
    ap.add_argument("--output", help="also write the Markdown table to this file")
    args = ap.parse_args()

    load_before = loadavg()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, N), dtype=np.float32)

    pywt_ms = {}
    for wavelet, level in CASES:
        pywt_ms[(wavelet, level)] = pywt_case(x, wavelet, level, args.repeats)
    np_gbs = numpy_copy_gbs(x, args.repeats)
    medians, cmd = slimgrad_medians(args.slimgrad_bench, args.repetitions)

    load_after = loadavg()
    memcpy_ms = medians["dwt_memcpy_baseline"]
    memcpy_gbs = BYTES / (memcpy_ms * 1e-3) / 1e9
    model, nproc = machine()
    lines = []
    lines.append("# slimgrad Dwt vs PyWavelets (CPU)")
    lines.append("")
    lines.append("- date: %s" % datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))
    lines.append("- machine: %s, nproc %s, OMP_NUM_THREADS=%s" %
                 (model, nproc, os.environ.get("OMP_NUM_THREADS", "unset")))
    lines.append("- load average (1/5/15 min) before: %s, after: %s (the machine is shared; "
                 "two-thread timings suffer most from other processes)" % (load_before, load_after))
    lines.append("- PyWavelets %s, numpy %s, Python %s" %
                 (pywt.__version__, np.__version__, platform.python_version()))
    lines.append("- command: `%s`" % " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
    lines.append("- slimgrad: `%s`" % " ".join(shlex.quote(a) for a in cmd))
    lines.append("- one iteration: forward + inverse, %dx%d float32, along rows (axis=1), "
                 "mode 'zero'; bytes = 4*4*%d^2 (2 passes of read + write)" % (N, N, N))
    lines.append("- memcpy (std::memcpy of the same bytes, same run): %.2f ms = %.1f GB/s; "
                 "numpy.copyto: %.1f GB/s" % (memcpy_ms, memcpy_gbs, np_gbs))
    lines.append("- medians of %d PyWavelets runs and %d Google Benchmark repetitions" %
                 (args.repeats, args.repetitions))
    lines.append("")
    lines.append("| case | pywt median ms | slimgrad median ms | speed-up | slimgrad GB/s | "
                 "fraction of memcpy bandwidth |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for wavelet, level in CASES:
        ours = medians["dwt_%s_L%d_fwd_inv" % (wavelet, level)]
        theirs = pywt_ms[(wavelet, level)]
        gbs = BYTES / (ours * 1e-3) / 1e9
        lines.append("| %s L%d fwd+inv | %.1f | %.2f | %.1fx | %.1f | %.0f%% |" %
                     (wavelet, level, theirs, ours, theirs / ours, gbs, 100.0 * gbs / memcpy_gbs))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
