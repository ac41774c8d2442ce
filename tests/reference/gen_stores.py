#!/usr/bin/env python3
"""Reference data for slimgrad's state stores (include/slimgrad/state/, backend/cpu/stores.hpp).

Run with /usr/bin/python3 (numpy, torch 1.13) from the repository root:

    /usr/bin/python3 tests/reference/gen_stores.py [--bnb-functional PATH] [--print-cpp]

Writes
  tests/data/stores_q8_maps.json   bitsandbytes' dynamic maps (signed and unsigned), float32 bits
  tests/data/stores_bf16.bin       float32 → bfloat16 by torch for 4096 chosen inputs, plus a hash
                                   of torch's conversion of 1e6 Philox-generated bit patterns
  tests/data/stores_factored.json  HF-Adafactor factored second moment, step by step, in torch

--bnb-functional PATH: cross-check our copy of create_dynamic_map against the function in a
bitsandbytes functional.py (e.g. from `pip download bitsandbytes`, unpacked); the function is
extracted with ast and run, bitsandbytes itself is not imported.
--print-cpp: print the two 256-entry tables in the hex-float form used in state/q8_math.hpp
(paste them into signed_code_map()/unsigned_code_map(), then clang-format-14).
"""
import argparse
import ast
import json
import math
import os
import struct
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")


# --- bitsandbytes' create_dynamic_map, copied from bitsandbytes/functional.py ------------------
# (bitsandbytes-foundation/bitsandbytes @ 95f9af30; unchanged in 0.50.2). Only the code that runs
# for total_bits=8, max_exponent_bits=7 matters: additional_items is 0 there.
def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1,
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()

    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()

    data.append(0)
    data.append(1.0)

    assert len(data) == 2**total_bits

    gap = 256 - len(data)
    for i in range(gap):
        data.append(0)

    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def bnb_create_dynamic_map(path):
    """create_dynamic_map as defined in a bitsandbytes functional.py, without importing bnb."""
    tree = ast.parse(open(path).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "create_dynamic_map")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), namespace)
    return namespace["create_dynamic_map"]


def f32_bits(t):
    return [int(v) for v in t.numpy().astype(np.float32).view(np.uint32)]


def cpp_table(t):
    items = []
    for v in t.numpy().astype(np.float32):
        h = float(v).hex()  # exact: a float32 is a double
        if h in ("0x0.0p+0", "-0x0.0p+0"):
            h = h.replace("0x0.0p+0", "0x0p+0")
        else:
            mant, exp = h.split("p")
            mant = mant.rstrip("0").rstrip(".")
            h = mant + "p" + exp
        items.append(h + "f")
    return "\n".join("      " + ", ".join(items[k:k + 4]) + "," for k in range(0, 256, 4))


# --- Philox4x32-10 in numpy (same as include/slimgrad/core/philox.hpp, tests/reference/gen_philox.py)
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def philox_words(seed, stream, epoch, count):
    """Word e of the key (seed, stream, epoch) is lane e % 4 of Philox block e / 4."""
    nblocks = (count + 3) // 4
    c0 = np.arange(nblocks, dtype=np.uint64)
    c1 = np.full(nblocks, epoch, dtype=np.uint64)
    c2 = np.full(nblocks, stream & 0xFFFFFFFF, dtype=np.uint64)
    c3 = np.full(nblocks, stream >> 32, dtype=np.uint64)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(M0) * c0
        p1 = np.uint64(M1) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0)) & mask, p1 & mask, \
                         ((p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1)) & mask, p0 & mask
        k0 = (k0 + W0) & 0xFFFFFFFF
        k1 = (k1 + W1) & 0xFFFFFFFF
    return np.stack([c0, c1, c2, c3], axis=1).reshape(-1)[:count].astype(np.uint32)


def torch_bf16_bits(x_f32):
    """torch's float32 → bfloat16 conversion, as uint16 bit patterns."""
    return torch.from_numpy(x_f32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def fnv1a64_u16(values):
    h = 0xCBF29CE484222325
    for b in values.astype("<u2").tobytes():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def bf16_cases(rng):
    bits = []
    # Special values and every boundary case, by bit pattern.
    special = [0x00000000, 0x80000000, 0x3F800000, 0xBF800000,
               0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0xBF818000,
               0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000, 0xFF7FFFFF,
               0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF,
               0x7FFFFFFF, 0x00000001, 0x00008000, 0x00018000, 0x00007FFF, 0x00008001, 0x007FFFFF,
               0x007F8000, 0x007F7FFF, 0x80000001, 0x80008000, 0x80018000, 0x807FFFFF,
               0x00800000, 0x00808000, 0x00818000]
    bits += special
    # Ties and near-ties at random magnitudes.
    hi = rng.integers(0, 1 << 16, size=600, dtype=np.uint32) << np.uint32(16)
    bits += list(hi | np.uint32(0x8000))
    bits += list(hi[:300] | np.uint32(0x7FFF))
    bits += list(hi[300:] | np.uint32(0x8001))
    # Uniform bit patterns (all classes), normals at many scales, subnormals.
    bits += list(rng.integers(0, 1 << 32, size=1200, dtype=np.uint64).astype(np.uint32))
    scales = 10.0 ** rng.uniform(-40, 38, size=900)
    normals = (rng.standard_normal(900) * scales).astype(np.float32)
    bits += list(normals.view(np.uint32))
    bits += list(rng.integers(0, 1 << 23, size=200, dtype=np.uint32) | (rng.integers(0, 2, size=200, dtype=np.uint32) << np.uint32(31)))
    bits = np.array(bits, dtype=np.uint32)
    n = 4096
    if len(bits) < n:
        extra = rng.integers(0, 1 << 32, size=n - len(bits), dtype=np.uint64).astype(np.uint32)
        bits = np.concatenate([bits, extra])
    return bits[:n]


def write_bf16(rng):
    bits = bf16_cases(rng)
    x = bits.view(np.float32)
    out = torch_bf16_bits(x.copy())
    # 1e6 bit patterns from Philox (seed 2024, stream 7, epoch 0) hashed after conversion; NaNs
    # are canonicalised to 0x7FC0 first (torch's scalar and vector paths disagree on NaN bits).
    n_big = 1_000_000
    words = philox_words(2024, 7, 0, n_big)
    big = torch_bf16_bits(words.view(np.float32).copy()).copy()
    big[(big & 0x7FFF) > 0x7F80] = 0x7FC0
    h = fnv1a64_u16(big)
    path = os.path.join(DATA, "stores_bf16.bin")
    with open(path, "wb") as f:
        # header: magic, case count, big count, seed, stream, hash
        f.write(struct.pack("<4sIIQQQ", b"SGBF", len(bits), n_big, 2024, 7, h))
        f.write(bits.astype("<u4").tobytes())
        f.write(out.astype("<u2").tobytes())
    print(f"{path}: {len(bits)} cases, hash of {n_big} Philox patterns = {h:#018x}")


def write_maps(bnb_path):
    maps = {"signed": create_dynamic_map(True), "unsigned": create_dynamic_map(False)}
    if bnb_path:
        bnb_fn = bnb_create_dynamic_map(bnb_path)
        for name, signed in (("signed", True), ("unsigned", False)):
            ref = bnb_fn(signed=signed)
            assert torch.equal(ref, maps[name]), f"{name} map differs from {bnb_path}"
        print(f"maps identical to create_dynamic_map in {bnb_path}")
    doc = {"source": "bitsandbytes functional.create_dynamic_map(signed, 7, 8), torch "
                     + torch.__version__ + ", float32 bit patterns",
           "signed": f32_bits(maps["signed"]), "unsigned": f32_bits(maps["unsigned"])}
    path = os.path.join(DATA, "stores_q8_maps.json")
    with open(path, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    print(f"{path}: written")
    return maps


def adafactor_factored(grads, eps1):
    """HF transformers Adafactor's factored second moment, the lines of Adafactor.step()."""
    m, n = grads[0].shape
    exp_avg_sq_row = torch.zeros(m, dtype=torch.float32)
    exp_avg_sq_col = torch.zeros(n, dtype=torch.float32)
    steps = []
    for t, grad in enumerate(grads, start=1):
        beta2t = 1.0 - math.pow(t, -0.8)
        update = (grad**2) + eps1
        exp_avg_sq_row.mul_(beta2t).add_(update.mean(dim=-1), alpha=(1.0 - beta2t))
        exp_avg_sq_col.mul_(beta2t).add_(update.mean(dim=-2), alpha=(1.0 - beta2t))
        # _approx_sq_grad
        r_factor = (exp_avg_sq_row / exp_avg_sq_row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = exp_avg_sq_col.unsqueeze(-2).rsqrt()
        steps.append({"beta2t": beta2t, "row": f32_bits(exp_avg_sq_row), "col": f32_bits(exp_avg_sq_col),
                      "row_factor": f32_bits(r_factor.squeeze(-1)),
                      "col_factor": f32_bits(c_factor.squeeze(-2))})
    return steps


def adafactor_elementwise(grads, eps1):
    exp_avg_sq = torch.zeros_like(grads[0])
    steps = []
    for t, grad in enumerate(grads, start=1):
        beta2t = 1.0 - math.pow(t, -0.8)
        update = (grad**2) + eps1
        exp_avg_sq.mul_(beta2t).add_(update, alpha=(1.0 - beta2t))
        steps.append({"beta2t": beta2t, "v": f32_bits(exp_avg_sq.reshape(-1))})
    return steps


def write_factored(rng):
    eps1 = 1e-30
    cases = []
    for (m, n, scale) in ((5, 7, 1.0), (16, 12, 1e-3), (3, 40, 10.0), (9, 70, 1.0), (6, 5, 1e-16)):
        grads = [torch.from_numpy((rng.standard_normal((m, n)) * scale
                                   * rng.uniform(0.1, 3.0, size=(m, 1))).astype(np.float32))
                 for _ in range(3)]
        cases.append({"rows": m, "cols": n, "eps1": eps1,
                      "grads": [f32_bits(g.reshape(-1)) for g in grads],
                      "steps": adafactor_factored(grads, eps1)})
    grads = [torch.from_numpy(rng.standard_normal((1, 50)).astype(np.float32)) for _ in range(3)]
    elementwise = {"rows": 1, "cols": 50, "eps1": eps1, "grads": [f32_bits(g.reshape(-1)) for g in grads],
                   "steps": adafactor_elementwise(grads, eps1)}
    doc = {"source": "HF transformers Adafactor (factored second moment, _approx_sq_grad), torch "
                     + torch.__version__ + ", float32 bit patterns; beta2t = 1 - t^-0.8 in double",
           "factored": cases, "elementwise": elementwise}
    path = os.path.join(DATA, "stores_factored.json")
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"{path}: {len(cases)} factored cases + 1 elementwise")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bnb-functional", help="path to a bitsandbytes functional.py to cross-check")
    parser.add_argument("--print-cpp", action="store_true", help="print the C++ tables")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed = 20240607
    print(f"numpy seed {seed}")
    rng = np.random.default_rng(seed)
    maps = write_maps(args.bnb_functional)
    write_bf16(rng)
    write_factored(rng)
    if args.print_cpp:
        for name in ("signed", "unsigned"):
            print(f"// {name}\n" + cpp_table(maps[name]))


if __name__ == "__main__":
    sys.exit(main())
