#!/usr/bin/env python3
"""Independent reference for slimgrad's Gaussian generator (include/slimgrad/core/philox.hpp).

Philox4x32-10 in plain Python integers, Box-Muller with libm's log/cos/sin in double, rounded to
float32 with numpy. Prints the values pinned in tests/core/test_philox.cpp.
"""
import math
import sys

import numpy as np

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox(ctr, k0, k1):
    c = list(ctr)
    for _ in range(10):
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k1) & MASK, p0 & MASK]
        k0 = (k0 + W0) & MASK
        k1 = (k1 + W1) & MASK
    return c


def gaussians(seed, stream, epoch, count, stddev):
    out = []
    block = 0
    while len(out) < count:
        w = philox([block & MASK, epoch, stream & MASK, stream >> 32], seed & MASK, seed >> 32)
        for pair in range(2):
            u1 = (w[2 * pair] + 0.5) * 2.0**-32
            u2 = (w[2 * pair + 1] + 0.5) * 2.0**-32
            r = math.sqrt(-2.0 * math.log(u1))
            out += [r * math.cos(2 * math.pi * u2) * stddev, r * math.sin(2 * math.pi * u2) * stddev]
        block += 1
    return np.array(out[:count], dtype=np.float64).astype(np.float32)


if __name__ == "__main__":
    assert philox([0, 0, 0, 0], 0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    vals = gaussians(42, 7, 3, 8, 1.0)
    sys.stdout.write(", ".join(f"{float(v)!r}f" for v in vals) + "\n")
