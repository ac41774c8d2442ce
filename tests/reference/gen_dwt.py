#!/usr/bin/env python3
"""Writes the PyWavelets reference data for tests/transforms/test_dwt.cpp.

tests/data/dwt_reference_{haar,db2,db4}.json: for each wavelet, levels 1..3, modes zero/periodization, odd and
tiny lengths, axis rows and cols:
  * coeffs: pywt.wavedec(G, wavelet, level=L, mode=mode, axis=...) packed as slimgrad's layout
    ([a_L | d_L | ... | d_1] along the transformed axis), computed in float64;
  * recon:  pywt.waverec(C, wavelet, mode=mode, axis=...) cropped to the input length, for
    coefficients C that are NOT the transform of anything (independent values), so the inverse
    is checked as a linear map and not only as a round trip.
tests/data/dwt_lengths.json: pywt's coefficient lengths [len(a_L), len(d_L), ..., len(d_1)] for
many lengths and levels, including levels beyond pywt.dwt_max_level (pywt warns, still runs).

Inputs are not stored: G and C come from a 32-bit integer hash of (salt, flat index) whose
values (k - 32768) / 16384 are exact in float32, so the C++ test regenerates them bit for bit.

Run: /usr/bin/python3 tests/reference/gen_dwt.py
"""
import json
import os
import warnings

import numpy as np
import pywt

M32 = 0xFFFFFFFF


def hash_value(salt, i):
    """Same as hash_value() in test_dwt.cpp: an exact float32 in [-2, 2)."""
    h = (i * 2654435761 + salt * 97531 + 12345) & M32
    h ^= h >> 15
    h = (h * 2246822519) & M32
    h ^= h >> 13
    k = h & 0xFFFF
    return (k - 32768) / 16384.0


def hash_array(salt, count):
    return np.array([hash_value(salt, i) for i in range(count)], dtype=np.float64)


def fmt(a):
    # 7 significant digits: rounding error <= 5e-7 relative, the test tolerance is 1e-5.
    return [float("%.7g" % v) for v in np.asarray(a, dtype=np.float64).ravel()]


def case(wavelet, level, mode, axis, length, other, salt):
    ax = 1 if axis == "rows" else 0
    shape = (other, length) if axis == "rows" else (length, other)
    g = hash_array(salt, shape[0] * shape[1]).reshape(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # levels beyond dwt_max_level: pywt warns, we match it
        coeffs = pywt.wavedec(g, wavelet, level=level, mode=mode, axis=ax)
        lengths = [c.shape[ax] for c in coeffs]
        packed = np.concatenate(coeffs, axis=ax)
        # Independent coefficients with the same lengths, packed the same way.
        r = hash_array(salt + 1, packed.size).reshape(packed.shape)
        parts = np.split(r, np.cumsum(lengths)[:-1], axis=ax)
        recon = pywt.waverec(parts, wavelet, mode=mode, axis=ax)
    recon = recon[:, :length] if axis == "rows" else recon[:length, :]
    assert recon.shape == g.shape
    return {
        "wavelet": wavelet,
        "level": level,
        "mode": mode,
        "axis": axis,
        "rows": shape[0],
        "cols": shape[1],
        "salt": salt,
        "lengths": lengths,
        "coeffs": fmt(packed),
        "recon": fmt(recon),
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = os.path.join(here, "..", "data")
    salt = 1
    for wavelet in ["haar", "db2", "db4"]:
        cases = []
        for mode in ["zero", "periodization"]:
            for level in [1, 2, 3]:
                lengths = [1, 2, 3, 5, 7, 16, 33] + ([100] if level == 3 else [])
                for n in lengths:
                    cases.append(case(wavelet, level, mode, "rows", n, 2, salt))
                    salt += 2
                if level != 2:
                    for n in [2, 5, 16, 33]:
                        cases.append(case(wavelet, level, mode, "cols", n, 2, salt))
                        salt += 2
        with open(os.path.join(out_dir, "dwt_reference_%s.json" % wavelet), "w") as f:
            json.dump({"pywt_version": pywt.__version__, "cases": cases}, f,
                      separators=(",", ":"))

    table = []
    ns = list(range(1, 21)) + [31, 32, 33, 63, 64, 65, 100, 1000, 4096, 5461, 11008]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for wavelet in ["haar", "db2", "db4"]:
            for mode in ["zero", "periodization"]:
                for level in [1, 2, 3, 4, 6]:
                    for n in ns:
                        cs = pywt.wavedec(np.zeros(n), wavelet, level=level, mode=mode)
                        table.append([wavelet, mode, level, n, [len(c) for c in cs]])
    with open(os.path.join(out_dir, "dwt_lengths.json"), "w") as f:
        json.dump({"pywt_version": pywt.__version__, "lengths": table}, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
