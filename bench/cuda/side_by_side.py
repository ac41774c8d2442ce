#!/usr/bin/env python3
"""slimgrad's CUDA optimizer steps next to torch.optim.AdamW(fused=True), in one process, on the
LLaMA-1B-like parameter set of issue 5 (24 layers of q, k, v, o 2048x2048; gate, up 5461x2048;
down 2048x5461; 1.21 B parameters, no embeddings).

slimgrad runs through ctypes from libslimgrad_cuda_bench.so (bench/cuda/bench_cuda.cu) on the
very tensors torch allocated. Each step is timed with CUDA events (median of --reps after
--warmup). The bandwidth floor of a method is the bytes its step must move (reads + writes of
weights, gradients and state) over the measured device-to-device copy bandwidth.

  python3 bench/cuda/side_by_side.py --lib build/bench/libslimgrad_cuda_bench.so [--json out.json]
(CMake builds the library and bench_cuda where nvcc is found; bench/cuda/run_device.sh builds
them without CMake on a GPU machine.)
"""
import argparse
import ctypes
import json
import statistics
import sys

import torch

SHAPES = [(2048, 2048)] * 4 + [(5461, 2048), (5461, 2048), (2048, 5461)]


def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), min(times), max(times)


def copy_bandwidth(warmup, reps):
    n = 1 << 28  # 1 GiB of fp32, far beyond L2
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms, _, _ = timed(lambda: dst.copy_(src), warmup, reps)
    del src, dst
    return 2 * n * 4 / (ms * 1e-3)  # bytes/s, read + write


# Bytes a low-rank step must move per parameter: W read + written, G read (12), and the moments
# of the r/min(m, n) = 1/4 coefficients per parameter read + written (16 B each: 4 B/param).
LOWRANK_BPP = 16


def lowrank_section(lib, args, results, row, timed, shapes, n, W, G, R, K, ref):
    """slimgrad GaLore and SubTrack-Grad (rank args.rank, T = 200, HF-Adam lr 1e-2, alpha 0.25)
    on the same tensors: the steady step, the refresh alone, and the step amortised over T."""
    T = 200
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    flops = sum(4 * args.rank * r * c for r, c in shapes)
    results["lowrank"] = {"rank": args.rank, "T": T, "gemm_flops_per_step": flops, "runs": []}
    print(f"low-rank steady step: {flops / 1e12:.2f} TFLOP of GEMMs per step", flush=True)

    def one(name, subtrack, method, tf32, refresh_reps=3, lanes=None, batched=1,
            refresh_batch=None, limiter=0.0):
        h = lib.sg_lowrank_create(subtrack, method, tf32, args.rank, T, 10.0, lanes or args.lanes,
                                  batched, refresh_batch or args.refresh_batch, limiter, n, W, G,
                                  R, K, 1e-2, 0.9, 0.999, 1e-6, 0.0, 0.25)
        if not h:
            print(f"{name}: creation failed", flush=True)
            return None
        first, _, _ = timed(lambda: lib.sg_step(h, stream), 0, 1)
        steady, lo, hi = timed(lambda: lib.sg_step(h, stream), args.warmup, args.reps)
        refresh, rlo, rhi = timed(lambda: lib.sg_refresh(h, stream), 1 if refresh_reps > 1 else 0,
                                  refresh_reps)
        amort = steady + refresh / T
        state = lib.sg_state_bytes(h) / 1e9
        workspace = lib.sg_workspace_bytes(h) / 1e9
        tflops = flops / (steady * 1e-3) / 1e12
        print(f"{name}: first step (SVD + step) {first:.1f} ms; refresh {refresh:.1f} ms "
              f"(min {rlo:.1f} max {rhi:.1f}); state {state:.2f} GB, workspace {workspace:.2f} GB; "
              f"steady {tflops:.0f} TFLOP/s", flush=True)
        row(f"{name} steady", steady, LOWRANK_BPP, ref, f"min {lo:.3f} max {hi:.3f}")
        row(f"{name} amortised /{T}", amort, LOWRANK_BPP, ref, f"refresh {refresh:.1f} ms")
        results["lowrank"]["runs"].append({"name": name, "first_ms": first, "steady_ms": steady,
                                           "refresh_ms": refresh, "amortised_ms": amort,
                                           "state_GB": state, "workspace_GB": workspace,
                                           "steady_TFLOPs": tflops})
        lib.sg_destroy(h)
        return amort

    one("slimgrad galore r512 tf32 randomized", 0, 1, 1)
    one("slimgrad galore r512 tf32 randomized, refresh_batch 168", 0, 1, 1, refresh_batch=168)
    one("slimgrad galore r512 tf32 randomized, refresh_batch 24", 0, 1, 1, refresh_batch=24)
    one("slimgrad galore r512 tf32 randomized, GEMM per tensor", 0, 1, 1, batched=0)
    one("slimgrad galore r512 fp32 randomized", 0, 1, 0)
    if not args.no_exact:
        one("slimgrad galore r512 tf32 exact (syevd)", 0, 0, 1, refresh_reps=1)
    one("slimgrad subtrack r512 tf32", 1, 1, 1)
    one("slimgrad subtrack r512 tf32, 16 lanes", 1, 1, 1, lanes=16)
    one("slimgrad subtrack++ r512 tf32 (recovery scaling, limiter 1.01)", 1, 1, 1, limiter=1.01)
    one("slimgrad subtrack r512 fp32", 1, 1, 0)
    torch.cuda.synchronize()
    if args.official_layers > 0:
        official_galore(args, results, row, timed, ref)


def official_galore(args, results, row, timed, ref):
    """The official GaLore AdamW (pip galore-torch 1.0) on the first args.official_layers layers,
    scaled to args.layers (its step is one chain of per-tensor kernels, linear in the tensors).
    transformers and bitsandbytes are stubbed: GaLoreAdamW needs neither."""
    import types
    for mod in ["transformers", "transformers.utils", "transformers.utils.versions",
                "bitsandbytes", "bitsandbytes.optim", "bitsandbytes.optim.optimizer"]:
        sys.modules.setdefault(mod, types.ModuleType(mod))
    sys.modules["transformers.utils.versions"].require_version = lambda *a, **k: None
    sys.modules["bitsandbytes.optim.optimizer"].Optimizer2State = object
    try:
        from galore_torch import GaLoreAdamW
    except Exception as e:  # noqa: BLE001
        print(f"official GaLore: import failed: {e}", flush=True)
        return
    layers = args.official_layers
    shapes = SHAPES * layers
    params = [torch.nn.Parameter(torch.randn(r, c, device="cuda") * 0.02) for r, c in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    T = 200
    opt = GaLoreAdamW([{"params": params, "rank": args.rank, "update_proj_gap": T, "scale": 0.25,
                        "proj_type": "std"}], lr=1e-2, weight_decay=0.0)
    scale = args.layers / layers
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    out = {"layers": layers, "scale": scale, "allow_tf32_default": tf32_before}
    torch.backends.cuda.matmul.allow_tf32 = False
    first, _, _ = timed(opt.step, 0, 1)
    steady, lo, hi = timed(opt.step, 2, 10)
    refresh = first - steady
    amort = (steady + refresh / T) * scale
    print(f"official GaLore AdamW ({layers} layers, x{scale:g}): first step {first:.0f} ms, "
          f"steady {steady:.2f} ms, refresh ~{refresh:.0f} ms", flush=True)
    row(f"official galore-torch steady (fp32, x{scale:g})", steady * scale, LOWRANK_BPP, ref,
        f"{layers} layers measured: {steady:.2f} ms")
    row(f"official galore-torch amortised /{T} (x{scale:g})", amort, LOWRANK_BPP, ref,
        f"refresh {refresh * scale:.0f} ms scaled")
    torch.backends.cuda.matmul.allow_tf32 = True
    steady32, _, _ = timed(opt.step, 2, 10)
    row(f"official galore-torch steady (allow_tf32, x{scale:g})", steady32 * scale, LOWRANK_BPP,
        ref, f"{layers} layers measured: {steady32:.2f} ms")
    torch.backends.cuda.matmul.allow_tf32 = tf32_before
    out.update({"first_ms": first, "steady_ms": steady, "refresh_ms": refresh,
                "amortised_ms_scaled": amort, "steady_tf32_ms": steady32})
    results["official_galore"] = out
    del opt, params
    torch.cuda.empty_cache()


def gwt_rows(lib, row, timed, args, precision, W, G, R, K, n, gs, ref, gbytes, only_steady=False):
    """GWT (Haar, 2 levels, HF-Adam, lr 1e-2) with and without the limiter and the finite check,
    the limiter in two passes or optimistic (pass A steps with rho = 1; pass B only for limited
    tensors). Each limiter configuration is timed twice: the steady step after 120 warm-up steps
    on the same gradients, where no tensor is limited any more, and with every gradient scaled by 16
    (exactly undone afterwards), which makes the limiter scale every tensor for dozens of steps.
    `gbytes`: bytes per gradient element (G is read once more by the finite check and pass B)."""
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    wbytes = 4 if precision == 0 else 2
    pass_a = 2 * wbytes + gbytes + 4  # W read + written, G read, a quarter's moments r + w
    pass_b = 2 * wbytes + gbytes + 2  # W read + written, G read, a quarter's moments read
    first = gbytes + 2  # the two-pass step's first pass: G and a quarter's moments read
    tag = "" if precision == 0 else " bf16 params"
    # (check: 0 off, 1 on, 2 off with the optimistic limiter step; gamma; label; bytes/param)
    configs = [(1, 1.01, "limiter 1.01 + check", pass_a + first),
               (0, 1.01, "limiter 1.01, no check, two passes", pass_a + first),
               (2, 1.01, "limiter 1.01, no check, optimistic", pass_a),
               (1, 0.0, "no limiter, check", pass_a + gbytes),
               (0, 0.0, "no limiter, no check", pass_a)]
    if only_steady:
        configs = configs[:1]
    for check, gamma, label, base in configs:
        h = lib.sg_gwt_create(precision, check, gamma, 0.25, n, W, G, None, R, K, 1e-2, 0.9,
                              0.999, 1e-6, 0.0)
        if not h:
            print(f"gwt {label}: creation failed", flush=True)
            continue
        for _ in range(120):
            lib.sg_step(h, stream)
        ms, lo, hi = timed(lambda: lib.sg_step(h, stream), 3, args.reps)
        lim = lib.sg_limited(h) if gamma > 0 else 0
        row(f"slimgrad gwt{tag} ({label}), steady", ms, base, ref,
            f"limited tensors in the last step {lim}; min {lo:.3f} max {hi:.3f}")
        if gamma > 0 and not only_steady:
            for g in gs:
                g.mul_(16.0)
            lib.sg_step(h, stream)
            lim_first = lib.sg_limited(h)
            ms, lo, hi = timed(lambda: lib.sg_step(h, stream), 1, args.reps)
            lim_last = lib.sg_limited(h)
            for g in gs:
                g.div_(16.0)
            row(f"slimgrad gwt{tag} ({label}), limiter active", ms,
                base + (pass_b if check == 2 else 0), ref,
                f"limited tensors: first step {lim_first}, last {lim_last} of {n}; "
                f"min {lo:.3f} max {hi:.3f}")
        lib.sg_destroy(h)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--lanes", type=int, default=8)
    ap.add_argument("--refresh-batch", type=int, default=64)
    ap.add_argument("--no-exact", action="store_true", help="skip the exact-SVD refresh timing")
    ap.add_argument("--official-layers", type=int, default=4,
                    help="layers for the official GaLore AdamW (its SVD refresh takes seconds "
                         "per tensor; the time is scaled to --layers); 0 skips it")
    ap.add_argument("--only-lowrank", action="store_true")
    ap.add_argument("--only-adam", action="store_true",
                    help="fused AdamW, then slimgrad's fp32 and 8-bit Adam with and without the "
                         "non-finite check, alternating (no low-rank, GWT or bf16 rows)")
    ap.add_argument("--only-gwt", action="store_true",
                    help="torch fused AdamW and the GWT rows only (fp32 and bf16 parameters)")
    args = ap.parse_args()

    lib = ctypes.CDLL(args.lib)
    vp, lp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_long)
    pp = ctypes.POINTER(ctypes.c_void_p)
    d = ctypes.c_double
    lib.sg_adam_create.restype = vp
    lib.sg_adam_create.argtypes = [ctypes.c_int] * 5 + [pp, pp, pp, lp, lp, d, d, d, d, d]
    lib.sg_gwt_create.restype = vp
    lib.sg_gwt_create.argtypes = [ctypes.c_int, ctypes.c_int, d, d, ctypes.c_int, pp, pp, pp, lp,
                                  lp, d, d, d, d, d]
    lib.sg_step.argtypes = [vp, vp]
    lib.sg_limited.argtypes = [vp]
    lib.sg_state_bytes.restype = ctypes.c_ulonglong
    lib.sg_state_bytes.argtypes = [vp]
    lib.sg_destroy.argtypes = [vp]
    lib.sg_lowrank_create.restype = vp
    lib.sg_workspace_bytes.restype = ctypes.c_ulonglong
    lib.sg_workspace_bytes.argtypes = [vp]
    lib.sg_lowrank_create.argtypes = ([ctypes.c_int] * 5 + [d] + [ctypes.c_int] * 3 + [d] +
                                      [ctypes.c_int] +
                                      [pp, pp, lp, lp] + [d] * 6)
    lib.sg_refresh.argtypes = [vp, vp]

    torch.manual_seed(0)
    dev = torch.cuda.get_device_properties(0)
    shapes = SHAPES * args.layers
    nparam = sum(r * c for r, c in shapes)
    print(f"device: {dev.name}; torch {torch.__version__}; {len(shapes)} tensors, "
          f"{nparam / 1e9:.3f} B parameters", flush=True)
    bw = copy_bandwidth(args.warmup, args.reps)
    print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)", flush=True)

    results = {"device": dev.name, "torch": torch.__version__, "params": nparam,
               "copy_GBps": bw / 1e9, "rows": []}

    def row(name, ms, bytes_per_param, ref_ms, extra=""):
        floor_ms = bytes_per_param * nparam / bw * 1e3
        r = {"method": name, "ms": ms, "ratio_to_fused_adamw": ms / ref_ms if ref_ms else None,
             "bytes_per_param": bytes_per_param, "floor_ms": floor_ms,
             "fraction_of_floor": floor_ms / ms, "note": extra}
        results["rows"].append(r)
        ratio = f"{ms / ref_ms:5.2f}x" if ref_ms else "   - "
        print(f"{name:42s} {ms:8.3f} ms  {ratio}  floor {floor_ms:7.3f} ms "
              f"({100 * floor_ms / ms:5.1f}% of bandwidth floor) {extra}", flush=True)

    def run_set(dtype, grad_dtype, label):
        ws = [torch.randn(r, c, device="cuda", dtype=dtype) * 0.02 for r, c in shapes]
        gs = [torch.randn(r, c, device="cuda", dtype=grad_dtype) * 1e-3 for r, c in shapes]
        return ws, gs

    def arrays(ws, gs, copies=None):
        n = len(ws)
        W = (ctypes.c_void_p * n)(*[w.data_ptr() for w in ws])
        G = (ctypes.c_void_p * n)(*[g.data_ptr() for g in gs])
        C = (ctypes.c_void_p * n)(*[c.data_ptr() for c in copies]) if copies else None
        R = (ctypes.c_long * n)(*[w.shape[0] for w in ws])
        K = (ctypes.c_long * n)(*[w.shape[1] for w in ws])
        return n, W, G, C, R, K

    def bench_handle(h, name, bpp, ref_ms, note=""):
        if not h:
            print(f"{name}: creation failed", flush=True)
            return None
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        ms, lo, hi = timed(lambda: lib.sg_step(h, stream), args.warmup, args.reps)
        row(name, ms, bpp, ref_ms, f"state {lib.sg_state_bytes(h) / 1e9:.2f} GB; "
            f"min {lo:.3f} max {hi:.3f} {note}")
        lib.sg_destroy(h)
        return ms

    # ---- fp32 parameters and gradients -------------------------------------------------------
    ws, gs = run_set(torch.float32, torch.float32, "fp32")
    params = [torch.nn.Parameter(w) for w in ws]
    for p, g in zip(params, gs):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                            fused=True)
    ref, lo, hi = timed(opt.step, args.warmup, args.reps)
    row("torch AdamW fused (fp32)", ref, 28, ref, f"min {lo:.3f} max {hi:.3f}")
    ref2, _, _ = timed(opt.step, 1, args.reps)
    print(f"  (torch AdamW fused again: {ref2:.3f} ms)", flush=True)
    del opt
    torch.cuda.empty_cache()

    n, W, G, C, R, K = arrays(ws, gs)
    if args.only_adam:
        for rep in range(2):
            for check in (0, 1):
                h = lib.sg_adam_create(0, 0, 0, check, n, W, G, None, R, K, 1e-3, 0.9, 0.999,
                                       1e-8, 0.01)
                bench_handle(h, f"slimgrad adamw fp32{' + check' if check else ''} ({rep})",
                             32 if check else 28, ref)
                h = lib.sg_adam_create(2, 2, 0, check, n, W, G, None, R, K, 1e-3, 0.9, 0.999,
                                       1e-8, 0.01)
                bench_handle(h, f"slimgrad adam8bit{' + check' if check else ''} ({rep})",
                             (16 if check else 12) + 4 * (1 + 4 / 256), ref)
        ref3, _, _ = timed(torch.optim.AdamW(params, lr=1e-3, fused=True).step, args.warmup,
                           args.reps)
        print(f"  (torch AdamW fused at the end: {ref3:.3f} ms)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0
    if not args.only_gwt:
        lowrank_section(lib, args, results, row, timed, shapes, n, W, G, R, K, ref)
    if args.only_lowrank:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0
    if not args.only_gwt:
        h = lib.sg_adam_create(0, 0, 0, 0, n, W, G, None, R, K, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        bench_handle(h, "slimgrad adamw fp32 (torch convention)", 28, ref)
        h = lib.sg_adam_create(2, 2, 0, 0, n, W, G, None, R, K, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        bench_handle(h, "slimgrad adam8bit (q8 block 256, bnb)", 12 + 4 * (1 + 4 / 256), ref)
        h = lib.sg_adam_create(1, 0, 0, 0, n, W, G, None, R, K, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        bench_handle(h, "slimgrad adamw, bf16 moments", 20, ref)
    gwt_rows(lib, row, timed, args, 0, W, G, R, K, n, gs, ref, 4)
    torch.cuda.synchronize()
    del params, ws, gs, W, G
    torch.cuda.empty_cache()

    # ---- bf16 parameters and gradients (the peers' pure-bf16 runs) ---------------------------
    ws, gs = run_set(torch.bfloat16, torch.bfloat16, "bf16")
    params = [torch.nn.Parameter(w) for w in ws]
    for p, g in zip(params, gs):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    ref_bf, lo, hi = timed(opt.step, args.warmup, args.reps)
    row("torch AdamW fused (bf16 params+state)", ref_bf, 14, ref, f"min {lo:.3f} max {hi:.3f}")
    del opt
    torch.cuda.empty_cache()
    n, W, G, C, R, K = arrays(ws, gs)
    if not args.only_gwt:
        h = lib.sg_adam_create(1, 0, 1, 0, n, W, G, None, R, K, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        bench_handle(h, "slimgrad adamw bf16 params, bf16 moments", 14, ref,
                     f"vs bf16 torch {ref_bf:.3f}")
        h = lib.sg_adam_create(0, 0, 1, 0, n, W, G, None, R, K, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        bench_handle(h, "slimgrad adamw bf16 params, fp32 moments", 22, ref)
    gwt_rows(lib, row, timed, args, 1, W, G, R, K, n, gs, ref, 2, only_steady=True)
    del params, ws, W
    torch.cuda.empty_cache()
    if args.only_gwt:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0

    # ---- fp32 master weights, bf16 gradients, bf16 model copy -------------------------------
    masters = [torch.randn(r, c, device="cuda") * 0.02 for r, c in shapes]
    copies = [torch.empty(r, c, device="cuda", dtype=torch.bfloat16) for r, c in shapes]
    n, W, G, C, R, K = arrays(masters, gs, copies)
    h = lib.sg_adam_create(0, 0, 2, 0, n, W, G, C, R, K, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    bench_handle(h, "slimgrad adamw fp32 master, bf16 grads", 8 + 2 + 16 + 2, ref)
    h = lib.sg_adam_create(2, 2, 2, 0, n, W, G, C, R, K, 1e-3, 0.9, 0.999, 1e-8, 0.01)
    bench_handle(h, "slimgrad adam8bit fp32 master, bf16 grads", 8 + 2 + 2 + 4 * (1 + 4 / 256), ref)
    del masters, copies, gs
    torch.cuda.empty_cache()

    # ---- Haar DWT forward + inverse of 4096 x 11008 -----------------------------------------
    x = torch.randn(4096, 11008, device="cuda")
    c = torch.empty_like(x)
    y = torch.empty_like(x)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    lib.sg_dwt_roundtrip.argtypes = [vp, vp, vp, ctypes.c_long, ctypes.c_long, vp]
    ms, lo, hi = timed(lambda: lib.sg_dwt_roundtrip(x.data_ptr(), c.data_ptr(), y.data_ptr(),
                                                    4096, 11008, stream), args.warmup, 50)
    err = (y - x).abs().max().item()
    floor = 16 * x.numel() / bw * 1e3
    print(f"haar L2 fwd+inv 4096x11008: {ms:.3f} ms, floor {floor:.3f} ms = "
          f"{100 * floor / ms:.1f}% of copy bandwidth (max |x - inv(fwd(x))| = {err:.2e})",
          flush=True)
    results["dwt"] = {"ms": ms, "floor_ms": floor, "fraction": floor / ms, "roundtrip_err": err}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
