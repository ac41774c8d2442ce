#!/usr/bin/env python3
"""Small summaries for tools/demo.sh (numpy + json + struct; no safetensors package).

  demo_stats.py energy COEFFS     share of each matrix's energy in NAME.a vs NAME.d1..dL,
                                  next to the share a random Gaussian matrix would have
  demo_stats.py error A B         relative Frobenius and max abs error of B's tensors vs A's
"""
import json
import struct
import sys

import numpy as np


def read(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        assert e["dtype"] == "F32", f"{name} is {e['dtype']}"
        b, end = e["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + b:8 + n + end], "<f4").reshape(e["shape"])
    return out, meta


def energy(path):
    t, meta = read(path)
    levels = int(meta["slimgrad.levels"])
    for base in sorted({k.rsplit(".", 1)[0] for k in t}):
        parts = {"a": t[f"{base}.a"], **{f"d{l}": t[f"{base}.d{l}"] for l in range(1, levels + 1)}}
        e = {k: float(np.sum(v.astype(np.float64) ** 2)) for k, v in parts.items()}
        total = sum(e.values())
        m, n = parts["a"].shape[0], int(meta[f"slimgrad.cols.{base}"])
        details = "  ".join(f"{k} {100 * e[k] / total:5.1f}%" for k in
                            [f"d{l}" for l in range(levels, 0, -1)])
        print(f"  {base:14s} {m}x{n}: approximation a {100 * e['a'] / total:5.1f}% of the energy "
              f"in {100 * parts['a'].shape[1] / n:.0f}% of the coefficients "
              f"(white noise: {100 / 2 ** levels:.0f}%);  {details}")


def error(path_a, path_b):
    a, _ = read(path_a)
    b, _ = read(path_b)
    for name in sorted(a):
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        rel = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-300)
        print(f"  {name:14s} round trip: relative error {rel:.2e}, "
              f"max abs error {np.max(np.abs(x - y)):.2e} (max |g| {np.max(np.abs(x)):.2e})")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "energy":
        energy(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "error":
        error(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
