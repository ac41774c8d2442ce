#!/usr/bin/env python3
"""Tests of the `slimgrad` command-line tool against live PyWavelets.

Usage: test_cli.py PATH/TO/slimgrad      (ctest runs it; needs numpy and pywt)

Checks
  * `transform` = pywt.wavedec(x, w, level=L, axis=1, mode=m) for haar/db2/db4, L = 1..3,
    modes zero and periodization, on random float32 matrices of even, odd and tiny widths;
  * `transform --inverse` = pywt.waverec on coefficients made by pywt, and transform followed
    by --inverse gives the input back;
  * `bench transform` (text and --json), --help of every subcommand, --version;
  * `replay` against the peers' outputs stored in tests/data/optim_reference.safetensors
    (tests/reference/gen_optim.py): torch.optim.AdamW, GWT's WaveAdamW step and bitsandbytes'
    8-bit AdamW kernels, to the tolerance of tests/optim/test_peers.cpp, and a changed semantic
    detail must break that tolerance;
    without the file, a torch.optim.AdamW reference made live (torch 1.13);
  * `memory` against hand computations of the state bytes on llama-60m (adamw, adam8bit,
    galore, gwt) and given shapes; `--all`; `bench step` (--json keys, its byte formula, its
    state equal to memory's);
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


# ---- optimizer references (replay) ----------------------------------------------------------------
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data",
                         "optim_reference.safetensors")
ULP = 2.0 ** -23
ELEMENTWISE_ULPS = 4  # per step, as tests/optim/test_peers.cpp (its header says why)


def peer_case(ref, meta, case):
    """Case `case` of the reference file as (meta, replay input {w.P, g.P.k}, {P: peer output})."""
    m = json.loads(meta["case." + case])
    tensors, out = {}, {}
    for p in m["params"]:
        tensors["w." + p] = ref[f"w.{case}.{p}"]
        for k in range(m["K"]):
            tensors[f"g.{p}.{k}"] = ref[f"g.{case}.{p}.{k}"]
        out[p] = ref[f"out.{case}.{p}"]
    return m, tensors, out


def live_adamw_case(rng):
    """The reference file's adamw case made here with torch.optim.AdamW (used when the file is
    missing): two matrices with row scales down to 1e-9 (ε matters there) and a bias, K = 8."""
    import torch
    m = {"K": 8, "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1,
         "params": ["a", "b", "bias"]}
    shapes = {"a": (10, 16), "b": (16, 10), "bias": (16,)}
    tensors, tparams = {}, []
    for p in m["params"]:
        w = rng.standard_normal(shapes[p]).astype(np.float32)
        tensors["w." + p] = w
        rows = 10.0 ** rng.uniform(-9, 0, size=shapes[p][0])
        for k in range(m["K"]):
            g = rng.standard_normal(shapes[p]) * 10.0 ** rng.uniform(-0.5, 0.5)
            g = g * (rows[:, None] if len(shapes[p]) == 2 else rows)
            tensors[f"g.{p}.{k}"] = g.astype(np.float32)
        tparams.append(torch.nn.Parameter(torch.from_numpy(w.copy())))
    opt = torch.optim.AdamW(tparams, lr=m["lr"], betas=(m["beta1"], m["beta2"]), eps=m["eps"],
                            weight_decay=m["weight_decay"], amsgrad=False, foreach=False)
    for k in range(m["K"]):
        for tp, p in zip(tparams, m["params"]):
            tp.grad = torch.from_numpy(tensors[f"g.{p}.{k}"].copy())
        opt.step()
    return m, tensors, {p: tp.detach().numpy().copy() for tp, p in zip(tparams, m["params"])}


def replay_deviation(tmp, tag, tensors, peer, argv):
    """Runs `slimgrad replay` on tensors; returns {P: (max|w - w_peer|, max|w_peer|)} or None."""
    src = os.path.join(tmp, f"replay_{tag}_in.safetensors")
    dst = os.path.join(tmp, f"replay_{tag}_out.safetensors")
    write_st(src, tensors)
    r = run("replay", *argv, src, dst)
    check(r.returncode == 0 and r.stderr == "", f"replay {tag}: exit {r.returncode} "
          f"{r.stderr.strip()}")
    if r.returncode != 0:
        return None
    got, meta = read_st(dst)
    check(set(got) == {"w." + p for p in peer}, f"replay {tag}: names {sorted(got)}")
    check(meta.get("slimgrad.steps") == str(len([k for k in tensors if k.startswith("g.")]) //
                                             len(peer)), f"replay {tag}: steps metadata {meta}")
    dev = {}
    for p, ref in peer.items():
        w = got.get("w." + p)
        if w is None or w.shape != ref.shape or w.dtype != np.float32:
            check(False, f"replay {tag}: w.{p} is {None if w is None else (w.shape, w.dtype)}, "
                  f"expected {ref.shape} float32")
            return None
        dev[p] = (float(np.max(np.abs(w.astype(np.float64) - ref))),
                  float(np.max(np.abs(ref.astype(np.float64)))))
    return dev


def within(dev, steps):
    """Every parameter within ELEMENTWISE_ULPS·K·u·max|w_peer| (tests/optim/test_peers.cpp)."""
    return all(d <= ELEMENTWISE_ULPS * steps * ULP * mx for d, mx in dev.values())


def ulps(dev):
    return ", ".join(f"{p} {d / (ULP * mx):.2f} ulp" for p, (d, mx) in dev.items())


def llama_tensors(hidden, inter, layers, vocab=32000):
    """(shape, compressed) of every weight of the GaLore-benchmark LLaMA (algorithms.md §0.5)."""
    t = [((vocab, hidden), False)]
    for _ in range(layers):
        t += [((hidden, hidden), True)] * 4 + [((inter, hidden), True)] * 2
        t += [((hidden, inter), True), ((hidden,), False), ((hidden,), False)]
    return t + [((hidden,), False), ((vocab, hidden), False)]


def ceil_div(a, b):
    return -(-a // b)


def size(shape):
    return int(np.prod(shape))


def plain_adam_bytes(shape):
    return 8 * size(shape) + 8  # fp32 m and v, the 8-byte step counter


def expected_state(recipe, shape, compressed):
    """Hand-computed optimizer-state bytes of one tensor (the engine's state_bytes() doc)."""
    n = size(shape)
    if recipe == "adamw" or (not compressed and recipe in ("gwt", "galore", "compact")):
        return plain_adam_bytes(shape)
    if recipe == "adam8bit":  # uint8 codes + fp32 absmax per 256-block; fp32 under 4096
        return 2 * (n + 4 * -(-n // 256)) + 8 if n >= 4096 else plain_adam_bytes(shape)
    if recipe == "flora":  # rank 128: Adafactor's factored v (elementwise for vectors) and the
        # momentum, compressed to r·max(m, n) for matrices with min >= r and max/min <= 4
        if len(shape) == 1:
            return 8 * n + 8
        m, c = shape
        r = 128
        keep = min(m, c) >= r and max(m, c) <= 4 * min(m, c)
        return 4 * (m + c) + (4 * r * max(m, c) if keep else 4 * n) + 8
    m, c = shape
    if recipe == "gwt":  # Haar level 2, zero mode: m × ceil(ceil(n/2)/2) coefficients
        return 2 * m * ceil_div(ceil_div(c, 2), 2) * 4 + 8 + 4  # + limiter scalar
    if recipe == "galore":  # rank 128: basis r·min(m,n), moments of r·max(m,n)
        r = 128
        return 4 * r * min(m, c) + 8 * r * max(m, c) + 8
    if recipe == "compact":  # r = n/4 moments m×r, seed and epoch (P is not kept)
        return 8 * m * round(c / 4) + 16 + 8
    raise ValueError(recipe)


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

        # ---- replay against the peers ---------------------------------------------------------
        if os.path.exists(REFERENCE):
            ref, ref_meta = read_st(REFERENCE)
            adamw = peer_case(ref, ref_meta, "adamw")
            gwt = peer_case(ref, ref_meta, "gwt")
            adam8bit = peer_case(ref, ref_meta, "adam8bit")
            print(f"replay references: {REFERENCE} (seed {ref_meta.get('seed')})")
        else:
            print(f"replay references: {REFERENCE} is missing: torch.optim.AdamW made live, "
                  "GWT not checked")
            adamw, gwt, adam8bit = live_adamw_case(rng), None, None
        m, tensors, peer = adamw
        adam_keys = ["lr", "beta1", "beta2", "eps", "weight_decay"]
        argv = ["--optimizer", "adamw"] + [a for k in adam_keys for a in ("--set", f"{k}={m[k]}")]
        dev = replay_deviation(tmp, "adamw", tensors, peer, argv)
        if dev is not None:
            print(f"replay adamw vs torch.optim.AdamW: {ulps(dev)} of max|w| "
                  f"(tolerance {ELEMENTWISE_ULPS * m['K']} ulp)")
            check(within(dev, m["K"]), f"replay adamw vs torch.optim.AdamW: {dev}")
        # The tolerance can fail: HF's ε placement instead of torch's moves the tiny-gradient rows.
        dev = replay_deviation(tmp, "adamw_hf", tensors, peer, argv + ["--set", "adam_mode=hf"])
        check(dev is not None and not within(dev, m["K"]),
              f"replay adamw with adam_mode=hf must miss torch.optim.AdamW: {dev}")
        if gwt is not None:
            m, tensors, peer = gwt
            base = ["--optimizer", "gwt", "--set", f"wavelet={m['wavelet']}", "--set",
                    f"levels={m['level']}", "--set", f"mode={m['boundary']}", "--set",
                    f"scale={m['scale']}", "--set", f"limiter_gamma={m['limiter']}"]
            base += [a for k in adam_keys for a in ("--set", f"{k}={m[k]}")]
            # The peer transforms every matrix of its group, however small.
            argv = base + ["--set", "fallback_min_size=0"]
            dev = replay_deviation(tmp, "gwt", tensors, peer, argv)
            if dev is not None:
                print(f"replay gwt vs GWT's WaveAdamW: {ulps(dev)} of max|w| "
                      f"(tolerance {ELEMENTWISE_ULPS * m['K']} ulp)")
                check(within(dev, m["K"]), f"replay gwt vs WaveAdamW: {dev}")
            # Without the norm-growth limiter the result must leave the tolerance.
            dev = replay_deviation(tmp, "gwt_nolimit", tensors, peer,
                                   argv + ["--set", "limiter_gamma=0"])
            check(dev is not None and not within(dev, m["K"]),
                  f"replay gwt without the limiter must miss WaveAdamW: {dev}")
            # The default fallback (min size 4096) keeps these small matrices on plain AdamW.
            dev = replay_deviation(tmp, "gwt_fallback", tensors, peer, base)
            check(dev is not None and not within(dev, m["K"]),
                  f"replay gwt with the default fallback must miss WaveAdamW: {dev}")
        if adam8bit is not None:  # bitsandbytes' kernels (8-bit matrix, 32-bit bias)
            m, tensors, peer = adam8bit
            argv = ["--optimizer", "adam8bit", "--set", f"block={m['block']}", "--set",
                    f"min_8bit_size={m['min_8bit_size']}"]
            argv += [a for k in adam_keys for a in ("--set", f"{k}={m[k]}")]
            dev = replay_deviation(tmp, "adam8bit", tensors, peer, argv)
            if dev is not None:
                print(f"replay adam8bit vs bitsandbytes' kernels: {ulps(dev)} of max|w| "
                      f"(tolerance {ELEMENTWISE_ULPS * m['K']} ulp)")
                check(within(dev, m["K"]), f"replay adam8bit vs bitsandbytes: {dev}")
            # torch's ε placement and decay order instead of the kernels' must miss.
            dev = replay_deviation(tmp, "adam8bit_torch", tensors, peer,
                                   argv + ["--set", "adam_mode=torch"])
            check(dev is not None and not within(dev, m["K"]),
                  f"replay adam8bit with adam_mode=torch must miss bitsandbytes: {dev}")

        # Type-level keys choose another instantiation; the metadata names it.
        m, tensors, peer = adamw
        dst = os.path.join(tmp, "replay_db2.safetensors")
        write_st(os.path.join(tmp, "replay_in.safetensors"), tensors)
        r = run("replay", "--optimizer", "gwt", "--set", "wavelet=db2", "--set", "levels=3",
                "--set", "fallback_min_size=0", "--quiet",
                os.path.join(tmp, "replay_in.safetensors"), dst)
        check(r.returncode == 0 and r.stdout == "", f"replay gwt db2 L3: {r.stderr.strip()}")
        if r.returncode == 0:
            got, meta = read_st(dst)
            check(meta.get("slimgrad.composition") == "adam/dwt<db2,3>/fp32/wavelet_details",
                  f"replay gwt db2 L3: composition {meta.get('slimgrad.composition')}")
            opts = json.loads(meta.get("slimgrad.options", "{}"))
            check(opts.get("wavelet") == "db2" and opts.get("levels") == "3" and
                  opts.get("fallback_min_size") == "0", f"replay options metadata {opts}")
            check(all(got["w." + p].shape == peer[p].shape for p in peer) and
                  all(np.all(np.isfinite(v)) for v in got.values()), "replay gwt db2 L3 output")
        for recipe in ("adam8bit", "adafactor", "galore", "subtrack", "subtrack++", "apollo",
                       "apollo-mini", "compact", "flora"):
            extra = ["--set", "rank=4"] if recipe in ("galore", "subtrack", "subtrack++",
                                                      "apollo", "flora") else []
            r = run("replay", "--optimizer", recipe, "--set", "fallback_min_size=0", *extra,
                    os.path.join(tmp, "replay_in.safetensors"), dst)
            check(r.returncode == 0 and ("compressed" in r.stdout or recipe in
                                         ("adam8bit", "adafactor", "flora")),
                  f"replay {recipe}: {r.stderr.strip()} {r.stdout}")

        # ---- memory: hand computations ----------------------------------------------------------
        llama60 = llama_tensors(512, 1376, 8)
        params60 = sum(size(s) for s, _ in llama60)
        check(params60 == 58073600, f"llama-60m has {params60} parameters")
        adamw60 = sum(expected_state("adamw", s, c) for s, c in llama60)
        for recipe in ("adamw", "adam8bit", "galore", "gwt", "flora"):
            r = run("memory", "--optimizer", recipe, "--model", "llama-60m", "--json")
            check(r.returncode == 0, f"memory {recipe}: {r.stderr.strip()}")
            if r.returncode != 0:
                continue
            lines = r.stdout.strip().splitlines()
            check(len(lines) == 1, f"memory --json prints one line, got {len(lines)}")
            j = json.loads(r.stdout)
            for key in ("total_bytes", "params", "bytes_per_param", "fraction_of_adamw", "groups",
                        "adamw_bytes", "composition", "tensors"):
                check(key in j, f"memory --json has '{key}'")
            want = sum(expected_state(recipe, s, c) for s, c in llama60)
            check(j.get("total_bytes") == want, f"memory {recipe} llama-60m: total "
                  f"{j.get('total_bytes')} != hand computation {want}")
            check(j.get("params") == params60 and j.get("tensors") == len(llama60) and
                  j.get("adamw_bytes") == adamw60, f"memory {recipe}: counts {j}")
            check(abs(j.get("fraction_of_adamw", 0) - want / adamw60) < 1e-12 and
                  abs(j.get("bytes_per_param", 0) - want / params60) < 1e-12,
                  f"memory {recipe}: ratios {j.get('fraction_of_adamw')}")
            groups = j.get("groups", [])
            check(sum(g["bytes"] for g in groups) == want and
                  sum(g["params"] for g in groups) == params60,
                  f"memory {recipe}: groups do not add up: {groups}")
            roles = {g["name"]: g["role"] for g in groups}
            check(roles.get("attn q,k,v,o") == "compressed" and roles.get("embed_tokens") ==
                  "plain" and roles.get("norms") == "plain" and roles.get("lm_head") == "plain",
                  f"memory {recipe}: roles {roles}")
        # compact leaves each o_proj (the 4th attention matrix) uncompressed: its full path
        # (plain Adam state), chosen explicitly by the tool, not by the recipe from the name.
        compact60 = sum(expected_state("compact", s, c and i % 9 != 4)
                        for i, (s, c) in enumerate(llama60))
        r = run("memory", "--optimizer", "compact", "--model", "llama-60m", "--json")
        check(r.returncode == 0 and json.loads(r.stdout).get("total_bytes") == compact60,
              f"memory compact llama-60m: {r.stdout.strip()[:200]} != hand computation {compact60}")
        print(f"memory llama-60m: adamw {adamw60} bytes (8 per parameter + 8 per tensor), gwt "
              f"{sum(expected_state('gwt', s, c) for s, c in llama60)} bytes by hand")
        r = run("memory", "--optimizer", "gwt", "--model", "llama-60m")
        check(r.returncode == 0 and "total" in r.stdout and "of AdamW" in r.stdout,
              f"memory text output: {r.stdout!r}")
        r = run("memory", "--all", "--model", "llama-7b", "--json")
        check(r.returncode == 0, f"memory --all llama-7b: {r.stderr.strip()}")
        if r.returncode == 0:
            j = json.loads(r.stdout)
            names = [x["optimizer"] for x in j.get("recipes", [])]
            check(names == ["adamw", "adam8bit", "adafactor", "galore", "gwt", "subtrack",
                            "subtrack++", "apollo", "apollo-mini", "compact", "flora"],
                  f"memory --all: {names}")
            params7 = sum(size(s) for s, _ in llama_tensors(4096, 11008, 32))
            check(j.get("params") == params7, f"memory --all llama-7b params {j.get('params')}")
            gwt7 = sum(expected_state("gwt", s, c) for s, c in llama_tensors(4096, 11008, 32))
            check([x["total_bytes"] for x in j["recipes"] if x["optimizer"] == "gwt"] == [gwt7],
                  "memory --all llama-7b gwt total")
            check(j["recipes"][0]["fraction_of_adamw"] == 1.0, "memory --all adamw fraction")
        r = run("memory", "--all", "--model", "llama-1b")
        check(r.returncode == 0 and "apollo-mini" in r.stdout, f"memory --all text: {r.stdout!r}")
        # --shapes: the recipe's fallback rules decide (the vector and the small matrix: plain).
        r = run("memory", "--optimizer", "gwt", "--shapes", "256x96,96,8x8", "--json")
        check(r.returncode == 0, f"memory --shapes: {r.stderr.strip()}")
        if r.returncode == 0:
            j = json.loads(r.stdout)
            want = (expected_state("gwt", (256, 96), True) + plain_adam_bytes((96,)) +
                    plain_adam_bytes((8, 8)))
            check(j.get("total_bytes") == want, f"memory --shapes total {j.get('total_bytes')} "
                  f"!= {want}")
            check([g["role"] for g in j.get("groups", [])] == ["compressed", "plain", "plain"],
                  f"memory --shapes roles {j.get('groups')}")

        # ---- bench step ----------------------------------------------------------------------
        shapes = "96x64,64"
        for recipe, extra in (("adamw", []), ("galore", ["--set", "rank=8", "--set",
                                                         "svd=randomized"])):
            r = run("bench", "step", "--optimizer", recipe, "--shapes", shapes, "--repeat", 3,
                    *extra, "--json")
            check(r.returncode == 0, f"bench step {recipe}: {r.stderr.strip()}")
            if r.returncode != 0:
                continue
            check(len(r.stdout.strip().splitlines()) == 1, "bench step --json prints one line")
            j = json.loads(r.stdout)
            for key in ("median_ms", "bytes", "gbps", "state_bytes", "params", "min_ms",
                        "first_step_ms", "threads", "composition"):
                check(key in j, f"bench step {recipe} --json has '{key}'")
            check(j.get("params") == 96 * 64 + 64 and j.get("median_ms", 0) > 0 and
                  j.get("gbps", 0) > 0, f"bench step {recipe} values {j}")
            check(j.get("bytes") == 2 * j.get("state_bytes", 0) + 12 * j.get("params", 0),
                  f"bench step {recipe}: bytes {j.get('bytes')} != 2 state + 12 params")
            mem = run("memory", "--optimizer", recipe, "--shapes", shapes, *extra, "--json")
            check(mem.returncode == 0 and json.loads(mem.stdout).get("total_bytes") ==
                  j.get("state_bytes"), f"bench step {recipe}: state {j.get('state_bytes')} "
                  f"!= memory's {mem.stdout.strip()[:80]}")
            if recipe == "galore":
                check(j.get("update_gap") == 200 and j.get("compressed_tensors") == 1,
                      f"bench step galore: {j}")
                t = j.get("update_gap", 1)
                amort = (j.get("refresh_ms", 0) + (t - 1) * j.get("median_ms", 0)) / t
                check("amortized_ms" in j and abs(j["amortized_ms"] - amort) <= 1e-9 * amort,
                      f"bench step galore amortized_ms {j.get('amortized_ms')} != {amort}")
            else:
                check("amortized_ms" not in j, "bench step adamw has no amortised time")
        r = run("bench", "step", "--optimizer", "gwt", "--shapes", "64x64", "--repeat", 2)
        check(r.returncode == 0 and "GB/s" in r.stdout and "bytes = 2 x state" in r.stdout,
              f"bench step text output: {r.stdout!r}")

        for cmd in ([], ["transform"], ["bench"], ["bench", "transform"], ["bench", "step"],
                    ["replay"], ["memory"]):
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
            ("no command", [], "needs a command: transform, bench, replay, memory"),
            ("unknown command", ["frobnicate"], "unknown command 'frobnicate'"),
            ("bench without a command", ["bench"], "'slimgrad bench' needs a command"),
            ("unknown bench command", ["bench", "step2"], "unknown command 'step2'"),
            # memory and bench step (no OUT)
            ("memory: unknown model", ["memory", "--optimizer", "adamw", "--model", "llama-3b"],
             "unknown model 'llama-3b'"),
            ("memory: no model", ["memory", "--optimizer", "adamw"], "exactly one of --model"),
            ("memory: model and shapes", ["memory", "--optimizer", "adamw", "--model",
                                          "llama-60m", "--shapes", "8x8"], "exactly one of"),
            ("memory: no optimizer", ["memory", "--model", "llama-60m"], "--optimizer NAME"),
            ("memory: --all and --optimizer", ["memory", "--all", "--optimizer", "gwt",
                                               "--model", "llama-60m"], "--all"),
            ("memory: --all and --set", ["memory", "--all", "--set", "lr=1", "--model",
                                         "llama-60m"], "--set applies to one optimizer"),
            ("memory: unknown optimizer", ["memory", "--optimizer", "lion", "--model",
                                           "llama-60m"], "unknown optimizer 'lion'"),
            ("memory: rank above min(m, n)", ["memory", "--optimizer", "galore", "--set",
                                              "rank=600", "--model", "llama-60m"],
             "rank 600 exceeds"),
            ("memory: bad shapes", ["memory", "--optimizer", "gwt", "--shapes", "12y4"],
             "--shapes expects"),
            ("bench step: no model", ["bench", "step", "--optimizer", "adamw"],
             "exactly one of --model"),
            ("bench step: no optimizer", ["bench", "step", "--model", "llama-60m"], "--optimizer"),
            ("bench step: zero repeat", ["bench", "step", "--optimizer", "adamw", "--shapes",
                                         "8x8", "--repeat", 0], "--repeat"),
            ("bench step: unknown key", ["bench", "step", "--optimizer", "adamw", "--set",
                                         "rank=4", "--model", "llama-60m"], "unknown option 'rank'"),
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

        # replay: every input problem is one line, before anything is written.
        m, tensors, _ = adamw
        good = os.path.join(tmp, "replay_good.safetensors")
        write_st(good, tensors)

        def variant(tag, change):
            t = dict(tensors)
            change(t)
            path = os.path.join(tmp, f"replay_{tag}.safetensors")
            write_st(path, t)
            return path

        def drop(*names):
            return lambda t: [t.pop(n) for n in names]

        def put(name, value):
            return lambda t: t.__setitem__(name, value)

        last = m["K"] - 1
        replay_cases = [
            ("unknown optimizer", ["--optimizer", "adamx"], good, "unknown optimizer 'adamx'"),
            ("flora kappa 0", ["--optimizer", "flora", "--set", "kappa=0"], good,
             "kappa must be >= 1"),
            ("unknown key", ["--optimizer", "adamw", "--set", "rank=4"], good,
             "unknown option 'rank' for optimizer adamw (known: "),
            ("bad value", ["--optimizer", "adamw", "--set", "lr=fast"], good,
             "option 'lr' expects a finite number, got 'fast'"),
            ("value out of range", ["--optimizer", "adamw", "--set", "beta1=1.5"], good, "beta1"),
            ("bad enum value", ["--optimizer", "galore", "--set", "svd=qr"], good,
             "expects one of exact, randomized"),
            ("no '='", ["--optimizer", "adamw", "--set", "lr"], good, "key=value"),
            ("unknown wavelet", ["--optimizer", "gwt", "--set", "wavelet=db7"], good,
             "expects haar, db2 or db4, got 'db7'"),
            ("levels 4", ["--optimizer", "gwt", "--set", "levels=4"], good,
             "expects 1, 2 or 3"),
            ("block 512", ["--optimizer", "adam8bit", "--set", "block=512"], good,
             "expects 256 or 2048"),
            ("wavelet for adamw", ["--optimizer", "adamw", "--set", "wavelet=haar"], good,
             "unknown option 'wavelet'"),
            ("no --optimizer", [], good, "--optimizer"),
            ("missing IN", ["--optimizer", "adamw"], os.path.join(tmp, "nope.safetensors"),
             "does not exist"),
            ("missing gradient", ["--optimizer", "adamw"], variant("gap", drop("g.a.3")),
             "gradient 'g.a.3' is missing"),
            ("K differs", ["--optimizer", "adamw"], variant("short", drop(f"g.b.{last}")),
             f"'b' has {last} gradients but 'a' has {m['K']}"),
            ("shape mismatch", ["--optimizer", "adamw"],
             variant("shape", put("g.a.0", np.zeros((16, 10), np.float32))),
             "gradient 'g.a.0' is [16, 10] but 'w.a' is [10, 16]"),
            ("F64 weights", ["--optimizer", "adamw"],
             variant("f64", put("w.a", tensors["w.a"].astype(np.float64))),
             "tensor 'w.a' is F64, expected F32"),
            ("F64 gradient", ["--optimizer", "adamw"],
             variant("f64g", put("g.b.2", tensors["g.b.2"].astype(np.float64))),
             "tensor 'g.b.2' is F64, expected F32"),
            ("3-D weights", ["--optimizer", "adamw"],
             variant("3d", put("w.a", np.zeros((2, 5, 16), np.float32))), "expected 1 or 2"),
            ("gradient without weights", ["--optimizer", "adamw"],
             variant("orphan", drop("w.b")), "gradient 'g.b.0' has no weights 'w.b'"),
            ("stray tensor", ["--optimizer", "adamw"],
             variant("stray", put("momentum.a", tensors["w.a"])),
             "'momentum.a' is neither weights"),
            ("bad step index", ["--optimizer", "adamw"],
             variant("k", put("g.a.01", tensors["g.a.1"])), "'g.a.01' is neither"),
            ("no parameters", ["--optimizer", "adamw"], empty, "holds no weights"),
            ("no gradients", ["--optimizer", "adamw"],
             variant("nograd", lambda t: [t.pop(k) for k in list(t) if k.startswith("g.")]),
             "holds no gradients"),
        ]
        for what, argv, src_file, text in replay_cases:
            out = os.path.join(tmp, "replay_out.safetensors")
            r = run("replay", *argv, src_file, out)
            lines = r.stderr.splitlines()
            check(r.returncode != 0, f"replay error '{what}': exit status {r.returncode}")
            check(len(lines) == 1 and lines[0].startswith("slimgrad: error: "),
                  f"replay error '{what}': stderr {r.stderr!r}")
            check(text in r.stderr, f"replay error '{what}': {text!r} not in {r.stderr!r}")
            check(not os.path.exists(out), f"replay error '{what}': OUT was created")

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
