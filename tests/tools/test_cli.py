#!/usr/bin/env python3
"""Tests of the `slimgrad` command-line tool against live PyWavelets.

Usage: test_cli.py PATH/TO/slimgrad      (ctest runs it; needs numpy and pywt)

Checks
  * `transform` = pywt.wavedec(x, w, level=L, axis=1, mode=m) for haar/db2/db4, L = 1..3,
    modes zero and periodization, on random float32 matrices of even, odd and tiny widths;
  * `transform --inverse` = pywt.waverec on coefficients made by pywt, and transform followed
    by --inverse gives the input back;
  * `bench transform` (text and --json), --help of every subcommand, --version;
  * the error contract: non-zero exit, exactly one stderr line "slimgrad: error: ...", no OUT
    file created (and an existing OUT left untouched), no temporary file left behind.
Safetensors files are written and read here with numpy + json + struct only.
Prints "N passed, M failed" last and exits 1 on any failure.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pywt

SEED = 1234
DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64,
          "U8": np.uint8, "I8": np.int8, "F16": np.float16}

passed = 0
failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}", flush=True)


def write_st(path, tensors, metadata=None):
    """Writes a safetensors file: tensors is {name: ndarray}, metadata {str: str} or None."""
    header, buf = {}, b""
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        dtype = [k for k, v in DTYPES.items() if np.dtype(v) == arr.dtype][0]
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [len(buf), len(buf) + len(data)]}
        buf += data
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + buf)


def read_st(path):
    """Reads a safetensors file: ({name: ndarray}, metadata); checks the header padding."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0, "header not padded to 8 bytes"
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + b:8 + n + end],
                                  dtype=np.dtype(DTYPES[e["dtype"]]).newbyteorder("<")
                                  ).reshape(e["shape"])
    return out, meta


def run(*args):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True)


def close(got, ref, what, rel=2e-5):
    """float32 results vs a float64 reference: max error <= rel * max(1, max|ref|)."""
    if got.shape != ref.shape:
        check(False, f"{what}: shape {got.shape} != {ref.shape}")
        return
    err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    tol = rel * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    check(err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}")


def main():
    rng = np.random.default_rng(SEED)
    print(f"test_cli.py: seed {SEED}, pywt {pywt.__version__}, cli {CLI}")
    warnings.simplefilter("ignore")  # pywt warns when a level exceeds dwt_max_level
    shapes = {"even": (4, 64), "odd": (3, 33), "odd_small": (5, 7), "one": (2, 1),
              "two": (1, 2), "wide": (6, 129)}
    mats = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}

    with tempfile.TemporaryDirectory(prefix="slimgrad_cli_") as tmp:
        src = os.path.join(tmp, "in.safetensors")
        write_st(src, mats, {"format": "pt"})

        # ---- forward vs pywt.wavedec, inverse round trip ---------------------------------------
        for wavelet in ("haar", "db2", "db4"):
            for levels in (1, 2, 3):
                for mode in ("zero", "periodization"):
                    tag = f"{wavelet} L{levels} {mode}"
                    out = os.path.join(tmp, f"c_{wavelet}_{levels}_{mode}.safetensors")
                    r = run("transform", "--wavelet", wavelet, "--levels", levels, "--mode",
                            mode, src, out)
                    check(r.returncode == 0 and r.stderr == "", f"{tag}: exit {r.returncode} "
                          f"{r.stderr.strip()}")
                    if r.returncode != 0:
                        continue
                    got, meta = read_st(out)
                    check(meta.get("format") == "pt", f"{tag}: input metadata kept")
                    check(meta.get("slimgrad.wavelet") == wavelet and
                          meta.get("slimgrad.levels") == str(levels) and
                          meta.get("slimgrad.mode") == mode, f"{tag}: metadata {meta}")
                    expected_names = set()
                    for name, x in mats.items():
                        ref = pywt.wavedec(x.astype(np.float64), wavelet, level=levels, axis=1,
                                           mode=mode)
                        parts = [f"{name}.a"] + [f"{name}.d{l}" for l in range(levels, 0, -1)]
                        expected_names.update(parts)
                        for part, c in zip(parts, ref):
                            if part not in got:
                                check(False, f"{tag}: {part} missing")
                                continue
                            check(got[part].dtype == np.float32, f"{tag}: {part} dtype")
                            close(got[part], c, f"{tag}: {part} vs pywt.wavedec")
                        check(meta.get(f"slimgrad.cols.{name}") == str(x.shape[1]),
                              f"{tag}: cols metadata of {name}")
                    check(set(got) == expected_names, f"{tag}: names {sorted(got)}")

                    back = os.path.join(tmp, f"b_{wavelet}_{levels}_{mode}.safetensors")
                    r = run("transform", "--inverse", "--wavelet", wavelet, "--levels", levels,
                            "--mode", mode, out, back)
                    check(r.returncode == 0, f"{tag} inverse: exit {r.returncode} "
                          f"{r.stderr.strip()}")
                    if r.returncode == 0:
                        rec, meta2 = read_st(back)
                        check(set(rec) == set(mats), f"{tag} inverse: names {sorted(rec)}")
                        check(meta2 == {"format": "pt"}, f"{tag} inverse: metadata {meta2}")
                        for name, x in mats.items():
                            if name in rec:
                                close(rec[name], x.astype(np.float64),
                                      f"{tag}: inverse(forward({name})) vs input", rel=5e-5)

                    # Coefficients made by pywt (no slimgrad metadata): output = waverec.
                    coeffs = {}
                    for name, x in mats.items():
                        ref = pywt.wavedec(x.astype(np.float64), wavelet, level=levels, axis=1,
                                           mode=mode)
                        coeffs[f"{name}.a"] = ref[0].astype(np.float32)
                        for l in range(1, levels + 1):
                            coeffs[f"{name}.d{l}"] = ref[-l].astype(np.float32)
                    pyc = os.path.join(tmp, f"p_{wavelet}_{levels}_{mode}.safetensors")
                    write_st(pyc, coeffs)
                    r = run("transform", "--inverse", "--wavelet", wavelet, "--levels", levels,
                            "--mode", mode, pyc, back)
                    check(r.returncode == 0, f"{tag} inverse of pywt coefficients: exit "
                          f"{r.returncode} {r.stderr.strip()}")
                    if r.returncode == 0:
                        rec, _ = read_st(back)
                        for name in mats:
                            parts = [coeffs[f"{name}.a"].astype(np.float64)] + [
                                coeffs[f"{name}.d{l}"].astype(np.float64)
                                for l in range(levels, 0, -1)]
                            ref = pywt.waverec(parts, wavelet, mode=mode, axis=1)
                            if name in rec:
                                close(rec[name], ref, f"{tag}: inverse({name}) vs pywt.waverec",
                                      rel=5e-5)
                            else:
                                check(False, f"{tag}: inverse output lacks {name}")

        # ---- bench, help, version -------------------------------------------------------------
        r = run("bench", "transform", "--wavelet", "db2", "--levels", 2, "--shape", "64x96",
                "--repeat", 3, "--json")
        check(r.returncode == 0, f"bench --json: exit {r.returncode} {r.stderr.strip()}")
        lines = r.stdout.strip().splitlines()
        check(len(lines) == 1, f"bench --json prints one line, got {len(lines)}")
        try:
            j = json.loads(r.stdout)
            for key in ("median_ms", "gbps", "shape", "wavelet", "levels", "repeat", "mode"):
                check(key in j, f"bench --json has '{key}'")
            check(j.get("shape") == [64, 96] and j.get("wavelet") == "db2" and
                  j.get("levels") == 2 and j.get("repeat") == 3, f"bench --json values {j}")
            check(j.get("median_ms", 0) > 0 and j.get("gbps", 0) > 0, f"bench --json rates {j}")
            # bytes = 2 x 4 x R x (C + K), K the packed width of db2 level 2 for C = 96.
            k = sum(len(c) for c in pywt.wavedec(np.zeros(96), "db2", level=2, mode="zero"))
            check(j.get("bytes") == 2 * 4 * 64 * (96 + k), f"bench bytes {j.get('bytes')}")
        except json.JSONDecodeError as e:
            check(False, f"bench --json output is not JSON: {e}: {r.stdout!r}")
        r = run("bench", "transform", "--shape", "32x32", "--repeat", 2)
        check(r.returncode == 0 and "GB/s" in r.stdout, f"bench text output: {r.stdout!r}")

        for cmd in ([], ["transform"], ["bench"], ["bench", "transform"]):
            r = run(*cmd, "--help")
            check(r.returncode == 0 and "Usage" in r.stdout, f"{cmd} --help")
        r = run("--version")
        check(r.returncode == 0 and r.stdout.startswith("slimgrad "), "--version")

        # ---- error contract -------------------------------------------------------------------
        f64 = os.path.join(tmp, "f64.safetensors")
        write_st(f64, {"ok": mats["even"], "w": mats["even"].astype(np.float64)})
        one_d = os.path.join(tmp, "oned.safetensors")
        write_st(one_d, {"ok": mats["even"], "v": np.arange(5, dtype=np.float32)})
        garbage = os.path.join(tmp, "garbage.safetensors")
        with open(garbage, "wb") as f:
            text = b'{"w": {"dtype": "F3'
            f.write(struct.pack("<Q", len(text)) + text)
        too_long = os.path.join(tmp, "toolong.safetensors")
        with open(too_long, "wb") as f:
            f.write(struct.pack("<Q", 1 << 40) + b"{}")
        short = os.path.join(tmp, "short.safetensors")
        with open(short, "wb") as f:
            f.write(b"abc")
        empty = os.path.join(tmp, "empty.safetensors")
        write_st(empty, {})
        coeff = os.path.join(tmp, "c_haar_2_zero.safetensors")
        parts, _ = read_st(coeff)
        missing_part = os.path.join(tmp, "missing_part.safetensors")
        write_st(missing_part, {k: v for k, v in parts.items() if k != "odd.d2"})
        bad_widths = os.path.join(tmp, "bad_widths.safetensors")
        write_st(bad_widths, {"w.a": np.zeros((2, 3), np.float32),
                              "w.d2": np.zeros((2, 3), np.float32),
                              "w.d1": np.zeros((2, 9), np.float32)})
        stray = os.path.join(tmp, "stray.safetensors")
        write_st(stray, {"w.a": np.zeros((2, 3), np.float32), "w.d1": np.zeros((2, 3), np.float32),
                         "w.x": np.zeros((2, 3), np.float32)})
        missing = os.path.join(tmp, "does_not_exist.safetensors")
        inv = ["transform", "--inverse", "--levels", 2]

        cases = [  # (description, argv without OUT, text the message must contain)
            ("missing file", ["transform", missing], "does not exist"),
            ("directory as input", ["transform", tmp], "is a directory"),
            ("bad header JSON", ["transform", garbage], "not valid JSON"),
            ("header length beyond the file", ["transform", too_long], "header length"),
            ("file shorter than 8 bytes", ["transform", short], "shorter than the 8-byte"),
            ("F64 tensor", ["transform", f64], "tensor 'w' is F64, expected F32"),
            ("1-D tensor", ["transform", one_d], "expected a 2-D matrix"),
            ("no tensors", ["transform", empty], "holds no tensors"),
            ("unknown option", ["transform", "--frobnicate", src], "--frobnicate"),
            ("unknown wavelet", ["transform", "--wavelet", "db7", src], "unknown wavelet 'db7'"),
            ("levels 0", ["transform", "--levels", 0, src], "levels must be"),
            ("levels 9", ["transform", "--levels", 9, src], "levels must be"),
            ("levels not a number", ["transform", "--levels", "two", src], "levels must be"),
            ("unknown mode", ["transform", "--mode", "symmetric", src], "unknown boundary mode"),
            ("missing OUT", ["transform", src], "OUT"),
            ("inverse: missing part", inv + [missing_part], "'odd.d2'"),
            ("inverse: inconsistent widths", inv + [bad_widths], "widths"),
            ("inverse: not a part", ["transform", "--inverse", "--levels", 1, stray],
             "not a wavelet part"),
            ("inverse: options differ from the file's", ["transform", "--inverse", "--levels",
                                                          2, "--wavelet", "db2", coeff],
             "--wavelet haar"),
            ("inverse: level above --levels", ["transform", "--inverse", "--levels", 1,
                                                os.path.join(tmp, "p_haar_2_zero.safetensors")],
             "level-2 detail"),
            ("bench: bad shape", ["bench", "transform", "--shape", "64by64"], "shape"),
            ("bench: zero repeat", ["bench", "transform", "--shape", "8x8", "--repeat", 0],
             "--repeat"),
            ("no command", [], "needs a command: transform, bench"),
            ("unknown command", ["frobnicate"], "unknown command 'frobnicate'"),
            ("bench without a command", ["bench"], "'slimgrad bench' needs a command"),
            ("unknown bench command", ["bench", "step2"], "unknown command 'step2'"),
        ]
        for what, argv, text in cases:
            out = os.path.join(tmp, "out.safetensors")
            if what == "missing OUT" or argv[:1] != ["transform"]:
                r = run(*argv)
            else:
                r = run(*argv, out)
            lines = r.stderr.splitlines()
            check(r.returncode != 0, f"error case '{what}': exit status {r.returncode}")
            check(len(lines) == 1 and lines[0].startswith("slimgrad: error: "),
                  f"error case '{what}': stderr {r.stderr!r}")
            check(text in r.stderr, f"error case '{what}': {text!r} not in {r.stderr!r}")
            check(not os.path.exists(out), f"error case '{what}': OUT was created")

        # A failed run leaves an existing OUT untouched; OUT in a missing directory fails cleanly.
        out = os.path.join(tmp, "keep.safetensors")
        with open(out, "wb") as f:
            f.write(b"precious")
        r = run("transform", f64, out)
        check(r.returncode != 0 and open(out, "rb").read() == b"precious", "existing OUT kept")
        r = run("transform", src, os.path.join(tmp, "no", "such", "dir", "out.safetensors"))
        check(r.returncode != 0 and len(r.stderr.splitlines()) == 1 and
              "cannot" in r.stderr, f"OUT in a missing directory: {r.stderr!r}")
        leftovers = [f for f in os.listdir(tmp) if ".tmp" in f]
        check(not leftovers, f"temporary files left behind: {leftovers}")

    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: test_cli.py PATH/TO/slimgrad", file=sys.stderr)
        sys.exit(2)
    CLI = os.path.abspath(sys.argv[1])
    sys.exit(main())
