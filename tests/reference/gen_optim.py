#!/usr/bin/env python3
"""Reference data for slimgrad's optimizer engine: the official peer code on small problems.

Run with /usr/bin/python3 (Debian's torch 1.13, numpy, pywt) from the repository root:

    /usr/bin/python3 tests/reference/gen_optim.py [--galore-wheel W] [--apollo-wheel W]

Writes tests/data/optim_reference.safetensors (F32 tensors + string metadata), read by
tests/optim/test_peers.cpp. Per case <c> and parameter <p>:
  w.<c>.<p>        initial weights (2-D m×n in PyTorch's out×in layout; a bias is 1-D)
  g.<c>.<p>.<k>    the gradient of step k = 0..K-1
  out.<c>.<p>      the peer's weights after the K steps
  P.<c>.<p>.<e>    (APOLLO only) the projection matrix the peer drew for epoch e (refresh e)
metadata: "cases" (comma list), "case.<c>" (JSON: peer, K, hyper-parameters, parameter names),
plus versions and the seed.

The peers, and how each is run:
  adamw         torch.optim.AdamW(lr 1e-2, weight_decay 0.1, amsgrad off, foreach=False)
  galore        the official GaLore AdamW (galore_torch 1.0 wheel, imported from the unpacked
                wheel; `transformers` and `bitsandbytes` are stubbed: only require_version and an
                unused 8-bit base class are imported from them). rank 4, update_proj_gap 3 < K,
                scale 0.25, proj_type std, both orientations. GaLore's SVD signs are made
                canonical (see canonical_signs) so that the C++ SvdProjection, which fixes the
                same sign per singular vector, sees the same basis; the raw-sign run is also
                made and its deviation reported in the metadata.
  adafactor_*   the official GaLore Adafactor (= HF transformers' Adafactor) without rank:
                manual lr (relative_step/scale_parameter off) and HF defaults, each with and
                without beta1.
  gwt           GWT's WaveAdamW step (zqOuO/GWT galore_torch/waveadamw.py; the repository is not
                on PyPI) transcribed in torch below, with pywt's wavedec/waverec (haar, level 2,
                mode zero, axis -1) for the transform; limiter 1.01, scale 0.25, eps 1e-6.
  apollo_*      the official APOLLO AdamW (apollo_torch 1.0.3 wheel), run unmodified; the
                matrices its projector draws (torch.Generator) are saved so that the C++ side can
                replay "the update given the same projection matrix".
  adam8bit      bitsandbytes' kOptimizerStatic8bit2StateBlockwise (block 256) and, for tensors
                below min_8bit_size 4096, kOptimizer32bit2State, written here in float32 numpy
                (csrc/kernels.cu @ 95f9af30, algorithms.md §6.5), with the dynamic maps of
                tests/reference/gen_stores.py. Deviations from the CUDA kernel: IEEE division and
                powf where the kernel uses __fdividef and __powf (≤ 2 ulp).
"""
import argparse
import contextlib
import json
import math
import os
import struct
import sys
import tempfile
import types
import zipfile

import numpy as np
import pywt
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")
OUT = os.path.join(DATA, "optim_reference.safetensors")
SEED = 20250214

sys.path.insert(0, HERE)
from gen_stores import create_dynamic_map  # noqa: E402  (bitsandbytes' maps, shared)


# ---- safetensors writer (numpy + json + struct) -----------------------------------------------
def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": {k: str(v) for k, v in sorted(metadata.items())}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
    return 8 + len(text) + offset


# ---- loading the peers' wheels ----------------------------------------------------------------
def stub_modules():
    """`transformers` and `bitsandbytes` are imported by the wheels but not needed by the code we
    run: require_version only checks the torch version, Optimizer2State is the base class of the
    8-bit variants we do not use."""
    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    mod("transformers")
    mod("transformers.utils")
    mod("transformers.utils.versions", require_version=lambda *a, **k: None)
    mod("bitsandbytes")
    mod("bitsandbytes.optim")
    mod("bitsandbytes.optim.optimizer", Optimizer2State=type("Optimizer2State", (object,), {}))
    mod("bitsandbytes.functional")
    # apollo_torch/q_apollo.py (the quantised variant, not run here) decorates a method with
    # torch._disable_dynamo, which torch 1.13 lacks: a no-op decorator stands in for it.
    if not hasattr(torch, "_disable_dynamo"):
        torch._disable_dynamo = lambda fn: fn


def import_wheel(path, package, tmpdir):
    with zipfile.ZipFile(path) as z:
        z.extractall(os.path.join(tmpdir, package))
    sys.path.insert(0, os.path.join(tmpdir, package))
    return __import__(package)


# ---- problem data -----------------------------------------------------------------------------
def f32(a):
    return np.asarray(a, dtype=np.float32)


def make_grads(rng, shape, k_steps, row_scales=None):
    """Random normal gradients, a different scale per step (and optionally per row)."""
    grads = []
    for _ in range(k_steps):
        s = 10.0 ** rng.uniform(-0.5, 0.5)
        g = rng.standard_normal(shape) * s
        if row_scales is not None:
            g = g * (row_scales[:, None] if len(shape) == 2 else row_scales)
        grads.append(f32(g))
    return grads


def spectral_grads(rng, shape, k_steps, decay=0.7):
    """G = U diag(s) Vᵀ with random orthonormal U, V and s_i = c·decay^i, c varying per step: the
    singular values are separated by (1 − decay)·s_i, so the top-r singular vectors are defined to
    about 2^-24·s_1/gap (≤ 1e-6 for r ≤ 4), and GaLore's basis is well conditioned."""
    m, n = shape
    q = min(m, n)
    grads = []
    for _ in range(k_steps):
        u, _ = np.linalg.qr(rng.standard_normal((m, q)))
        v, _ = np.linalg.qr(rng.standard_normal((n, q)))
        s = (10.0 ** rng.uniform(-0.5, 0.5)) * decay ** np.arange(q)
        grads.append(f32((u * s) @ v.T))
    return grads


class Case:
    def __init__(self, name, peer, k_steps, hyper):
        self.name, self.peer, self.k, self.hyper = name, peer, k_steps, hyper
        self.params = []  # (pname, w0, grads)
        self.out = {}
        self.extra = {}  # additional tensors (APOLLO matrices)

    def add(self, pname, w0, grads):
        assert len(grads) == self.k
        self.params.append((pname, f32(w0), [f32(g) for g in grads]))

    def torch_params(self):
        return [torch.nn.Parameter(torch.from_numpy(w.copy())) for _, w, _ in self.params]

    def run(self, opt, tparams):
        for k in range(self.k):
            for p, (_, _, grads) in zip(tparams, self.params):
                p.grad = torch.from_numpy(grads[k].copy())
            opt.step()
        for p, (pname, _, _) in zip(tparams, self.params):
            self.out[pname] = p.detach().numpy().copy()

    def tensors(self):
        t = {}
        for pname, w0, grads in self.params:
            t[f"w.{self.name}.{pname}"] = w0
            for k, g in enumerate(grads):
                t[f"g.{self.name}.{pname}.{k}"] = g
            t[f"out.{self.name}.{pname}"] = self.out[pname]
        t.update(self.extra)
        return t

    def meta(self):
        d = {"peer": self.peer, "K": self.k, "params": [p for p, _, _ in self.params]}
        d.update(self.hyper)
        return json.dumps(d, sort_keys=True)


# ---- torch.optim.AdamW ------------------------------------------------------------------------
def case_adamw(rng):
    c = Case("adamw", "torch.optim.AdamW (torch " + torch.__version__ + ", foreach=False)", 8,
             {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1})
    # Row scales down to 1e-9 make ε matter: there the torch and HF placements of ε differ by
    # a factor of about 1/sqrt(1 − β2^t) in the denominator.
    for pname, shape in (("a", (10, 16)), ("b", (16, 10))):
        rows = 10.0 ** rng.uniform(-9, 0, size=shape[0])
        c.add(pname, rng.standard_normal(shape), make_grads(rng, shape, c.k, rows))
    c.add("bias", rng.standard_normal(16) * 0.1, make_grads(rng, (16,), c.k, 10.0 ** rng.uniform(-9, 0, 16)))
    tp = c.torch_params()
    opt = torch.optim.AdamW(tp, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=False,
                            foreach=False)
    c.run(opt, tp)
    return c


# ---- GaLore -----------------------------------------------------------------------------------
def canonical_flip(x):
    """True when x must be negated: its entry of largest magnitude (first on ties) must be
    positive; the rule of transforms::canonical_sign_flip."""
    a = np.abs(x)
    i = int(np.argmax(a))
    srt = np.sort(a)[::-1]
    assert srt[0] - srt[1] > 1e-3 * srt[0], "sign rule undecided within the SVD's accuracy"
    return x[i] < 0


@contextlib.contextmanager
def galore_signs(galore_torch, mode, log):
    """Wraps GaLoreProjector.get_orthogonal_matrix: mode 'canonical' makes each basis vector's
    sign canonical (a valid SVD: the pair (u_i, v_i) flips together, and only the basis side is
    kept), 'raw' keeps LAPACK's signs, 'flip_refresh' negates the first basis vector of every
    refresh after the first (to show that signs matter once a refresh mixes bases)."""
    proj = galore_torch.galore_projector.GaLoreProjector
    original = proj.get_orthogonal_matrix

    def wrapped(self, weights, rank, type):
        b = original(self, weights, rank, type).clone()
        vecs = b if type == "right" else b.t()  # rows of Vh[:r] / columns of U[:, :r]
        for i in range(vecs.shape[0]):
            flip = canonical_flip(vecs[i].numpy())
            log.append(bool(flip))
            if mode == "canonical" and flip:
                vecs[i] = -vecs[i]
        count = getattr(self, "_refreshes", 0)
        self._refreshes = count + 1
        if mode == "flip_refresh" and count > 0:
            vecs[0] = -vecs[0]
        return b

    proj.get_orthogonal_matrix = wrapped
    try:
        yield
    finally:
        proj.get_orthogonal_matrix = original


def case_galore(rng, galore_torch):
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.1, "rank": 4,
             "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}
    c = Case("galore", "galore_torch 1.0 AdamW (official wheel), canonical SVD signs", 8, hyper)
    c.add("left", rng.standard_normal((12, 20)) * 0.5, spectral_grads(rng, (12, 20), c.k))   # m < n
    c.add("right", rng.standard_normal((20, 12)) * 0.5, spectral_grads(rng, (20, 12), c.k))  # m ≥ n
    c.add("bias", rng.standard_normal(16) * 0.1, make_grads(rng, (16,), c.k))

    def run(mode, gap=3):
        tp = c.torch_params()
        groups = [{"params": tp[:2], "rank": 4, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"},
                  {"params": tp[2:]}]
        opt = galore_torch.GaLoreAdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1,
                                       no_deprecation_warning=True)
        log = []
        with galore_signs(galore_torch, mode, log):
            c.run(opt, tp)
        return dict(c.out), log

    def dev(a, b):
        return max(float(np.abs(a[p] - b[p]).max()) for p in ("left", "right"))

    # The sign question, measured: with one basis for the whole run (T > K) LAPACK's signs and the
    # canonical ones give the same weights up to rounding (a flipped basis vector flips its
    # coefficients and first moment, and the back-projection flips them back); once a refresh
    # carries the moments into a new basis, a sign that differs between the two runs changes the
    # result at first order, so the comparison needs the same sign rule on both sides.
    no_refresh = dev(run("raw", gap=100)[0], run("canonical", gap=100)[0])
    raw, flips = run("raw")
    flipped, _ = run("flip_refresh")
    canon, _ = run("canonical")
    c.out = canon
    c.hyper["raw_sign_flips"] = f"{sum(flips)} of {len(flips)} basis vectors had a non-canonical LAPACK sign"
    c.hyper["raw_vs_canonical_max_dev_without_refresh"] = no_refresh
    c.hyper["raw_vs_canonical_max_dev"] = dev(raw, canon)
    c.hyper["flip_at_refresh_max_dev"] = dev(flipped, canon)
    print(f"galore: {c.hyper['raw_sign_flips']}; max |Δw| raw vs canonical signs: {no_refresh:.3e} "
          f"without a refresh (T > K), {dev(raw, canon):.3e} with refreshes; one basis vector negated "
          f"at each later refresh: {dev(flipped, canon):.3e}")
    return c


# ---- Adafactor (GaLore's copy of HF transformers' Adafactor) ----------------------------------
def case_adafactor(rng, galore_torch, name, manual_lr, beta1):
    kw = dict(beta1=beta1)
    if manual_lr:
        kw.update(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=0.1)
    hyper = {"manual_lr": manual_lr, "lr": 1e-2 if manual_lr else None, "beta1": beta1,
             "relative_step": not manual_lr, "scale_parameter": not manual_lr,
             "weight_decay": 0.1 if manual_lr else 0.0, "eps1": 1e-30, "eps2": 1e-3,
             "clip_threshold": 1.0, "decay_rate": -0.8}
    c = Case(name, "galore_torch 1.0 Adafactor (HF transformers' Adafactor), no rank", 8, hyper)
    c.add("a", rng.standard_normal((8, 12)) * 0.5, make_grads(rng, (8, 12), c.k, 10.0 ** rng.uniform(-3, 0, 8)))
    c.add("b", rng.standard_normal((12, 8)) * 0.5, make_grads(rng, (12, 8), c.k))
    c.add("bias", rng.standard_normal(16) * 0.1, make_grads(rng, (16,), c.k))
    tp = c.torch_params()
    c.run(galore_torch.GaLoreAdafactor(tp, **kw), tp)
    return c


# ---- GWT: WaveAdamW's step, transcribed from zqOuO/GWT galore_torch/waveadamw.py -------------
class WaveAdamW(torch.optim.Optimizer):
    """The official WaveAdamW step (HF-AdamW on the level-L approximation, details divided by the
    approximation's denominator and the Fira limiter, inverse DWT, × scale), with pywt for the
    transform in place of the repository's vendored ptwt (same coefficients for haar)."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": True})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                state = self.state[p]
                size = grad.size()
                if "step" not in state:
                    state["step"] = 0
                if "wave_type" in group:
                    wave = [torch.from_numpy(np.ascontiguousarray(x)) for x in
                            pywt.wavedec(grad.numpy(), group["wave_type"], level=group["level"],
                                         mode=group["boundary"], axis=-1)]
                    lenth = len(wave)
                    grad = wave[0]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=(1.0 - beta1))
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    bias_correction1 = 1.0 - beta1 ** state["step"]
                    bias_correction2 = 1.0 - beta2 ** state["step"]
                    step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
                norm_grad = exp_avg / denom
                if "wave_type" in group:
                    if "scaled_grad" in state:
                        scaled_grad_norm = torch.norm(norm_grad)
                        limiter = max(scaled_grad_norm / (state["scaled_grad"] + 1e-8), 1.01) / 1.01
                        norm_grad = norm_grad / limiter
                        state["scaled_grad"] = scaled_grad_norm / limiter
                        for i in range(group["level"]):
                            size_w = wave[i + 1].size()
                            wave[i + 1] = wave[i + 1] / (denom[..., :size_w[-1]] * limiter)
                            denom = torch.repeat_interleave(denom, 2, -1)
                    else:
                        state["scaled_grad"] = torch.norm(norm_grad)
                        for i in range(group["level"]):
                            size_w = wave[i + 1].size()
                            wave[i + 1] = wave[i + 1] / (denom[..., :size_w[-1]])
                            denom = torch.repeat_interleave(denom, 2, -1)
                    rec = pywt.waverec([norm_grad.numpy()] + [wave[i + 1].numpy() for i in range(lenth - 1)],
                                       group["wave_type"], mode=group["boundary"], axis=-1)
                    norm_grad = torch.from_numpy(np.ascontiguousarray(rec))[..., :size[-1]] * group["scale"]
                p.add_(norm_grad, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))


def case_gwt(rng):
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.1, "wavelet": "haar",
             "level": 2, "boundary": "zero", "scale": 0.25, "limiter": 1.01}
    c = Case("gwt", "GWT WaveAdamW step (zqOuO/GWT waveadamw.py) transcribed, pywt transform", 8, hyper)
    c.add("odd", rng.standard_normal((10, 37)) * 0.5, make_grads(rng, (10, 37), c.k, 10.0 ** rng.uniform(-3, 0, 10)))
    c.add("tall", rng.standard_normal((16, 10)) * 0.5, make_grads(rng, (16, 10), c.k))
    c.add("bias", rng.standard_normal(16) * 0.1, make_grads(rng, (16,), c.k))
    tp = c.torch_params()
    groups = [{"params": tp[:2], "wave_type": "haar", "level": 2, "boundary": "zero", "scale": 0.25},
              {"params": tp[2:]}]
    c.run(WaveAdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1), tp)
    return c


# ---- APOLLO -----------------------------------------------------------------------------------
def case_apollo(rng, apollo_torch, name, rank, scale, scale_type, scale_front):
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.1, "rank": rank,
             "update_proj_gap": 4, "scale": scale, "scale_type": scale_type, "scale_front": scale_front,
             "proj": "random", "proj_type": "std", "limiter": 1.01}
    c = Case(name, "apollo_torch 1.0.3 APOLLO AdamW (official wheel), its own random matrices saved", 8, hyper)
    c.add("left", rng.standard_normal((8, 12)) * 0.5, make_grads(rng, (8, 12), c.k, 10.0 ** rng.uniform(-2, 0, 8)))
    c.add("right", rng.standard_normal((12, 8)) * 0.5, make_grads(rng, (12, 8), c.k))
    c.add("bias", rng.standard_normal(16) * 0.1, make_grads(rng, (16,), c.k))
    tp = c.torch_params()
    groups = [{"params": tp[:2], "rank": rank, "proj": "random", "update_proj_gap": 4, "scale": scale,
               "proj_type": "std", "scale_type": scale_type},
              {"params": tp[2:]}]
    opt = apollo_torch.APOLLOAdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1,
                                   scale_front=scale_front)
    projector = sys.modules["apollo_torch.random_projector"].GradientProjector
    original = projector.update_ortho_matrix
    drawn = {}

    def record(self, full_rank_grad, proj_type):
        original(self, full_rank_grad, proj_type)
        drawn.setdefault(id(self), []).append(self.ortho_matrix.numpy().copy())

    projector.update_ortho_matrix = record
    try:
        c.run(opt, tp)
    finally:
        projector.update_ortho_matrix = original
    for p, (pname, _, _) in zip(tp[:2], c.params[:2]):
        mats = drawn[id(opt.state[p]["projector"])]
        assert len(mats) == (c.k + 3) // 4
        for e, mat in enumerate(mats):
            c.extra[f"P.{name}.{pname}.{e}"] = mat
    return c


def apollo_distribution(apollo_torch):
    """Moments of APOLLO's projection entries (stable_randn(...)/sqrt(r)) over a large draw."""
    rp = sys.modules["apollo_torch.random_projector"]
    r = 64
    gp = rp.GradientProjector(r, proj_type="std", seed=7)
    x = gp.get_orthogonal_matrix(torch.zeros(512, 256), r, type="right", seed=7).numpy().astype(np.float64)
    x = x.reshape(-1)
    z = x * math.sqrt(r)
    return {"rank": r, "count": int(x.size), "mean": float(x.mean()), "var": float(x.var()),
            "var_times_r": float(x.var() * r), "frac_within_1sd": float(np.mean(np.abs(z) < 1.0)),
            "frac_within_2sd": float(np.mean(np.abs(z) < 2.0)), "kurtosis": float(np.mean(z ** 4))}


# ---- 8-bit blockwise Adam (bitsandbytes kernels, float32) --------------------------------------
F = np.float32


def quantize_2d(code, x, signed):
    """kernels.cu quantize_2D: 7-step binary search from index 127, then the float midpoint."""
    x = F(x)
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = (F(-1.0) if signed else F(0.0)), F(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if x > val:
        mid = (upper + val) * F(0.5)
        return upper_pivot if x > mid else pivot
    mid = (lower + val) * F(0.5)
    return lower_pivot if x < mid else pivot


class Bnb8bitAdamW:
    """AdamW8bit (optim_bits 8, block_wise, percentile_clipping 100 → gnorm_scale 1,
    min_8bit_size 4096) for one parameter, as the kernels compute it."""

    def __init__(self, numel, lr, beta1, beta2, eps, weight_decay, block=256, min_8bit_size=4096):
        self.lr, self.b1, self.b2, self.eps, self.wd = F(lr), F(beta1), F(beta2), F(eps), F(weight_decay)
        self.block, self.step_count = block, 0
        self.eight_bit = numel >= min_8bit_size
        if self.eight_bit:
            self.code1 = create_dynamic_map(True).numpy().astype(np.float32)
            self.code2 = create_dynamic_map(False).numpy().astype(np.float32)
            self.c1 = np.zeros(numel, dtype=np.uint8)
            self.c2 = np.zeros(numel, dtype=np.uint8)
            nblocks = (numel + block - 1) // block
            self.absmax1 = np.zeros(nblocks, dtype=np.float32)
            self.absmax2 = np.zeros(nblocks, dtype=np.float32)
        else:
            self.s1 = np.zeros(numel, dtype=np.float32)
            self.s2 = np.zeros(numel, dtype=np.float32)

    def step(self, p, g):
        p, g = p.reshape(-1).astype(np.float32), g.reshape(-1).astype(np.float32)
        self.step_count += 1
        t = self.step_count
        one = F(1.0)
        correction1 = one - self.b1 ** F(t)
        correction2 = np.sqrt(one - self.b2 ** F(t)).astype(np.float32)
        step_size = (-self.lr * correction2) / correction1
        decay = one - self.lr * self.wd
        if not self.eight_bit:  # kOptimizer32bit2State, ADAM
            self.s1 = self.s1 * self.b1 + (one - self.b1) * g
            self.s2 = self.s2 * self.b2 + (one - self.b2) * (g * g)
            p = p + step_size * (self.s1 / (np.sqrt(self.s2) + self.eps * correction2))
            if self.wd > 0:
                p = p * decay
            return p
        out = p.copy()
        for b0 in range(0, p.size, self.block):
            blk = slice(b0, min(b0 + self.block, p.size))
            bi = b0 // self.block
            s2 = self.code2[self.c2[blk]] * self.absmax2[bi]
            s2 = s2 * self.b2 + ((one - self.b2) * g[blk] * g[blk])
            s1 = self.code1[self.c1[blk]] * self.absmax1[bi]
            s1 = s1 * self.b1 + ((one - self.b1) * g[blk])
            m1, m2 = F(np.abs(s1).max()), F(np.abs(s2).max())
            self.absmax1[bi], self.absmax2[bi] = m1, m2
            q = out[blk] + step_size * (s1 / (np.sqrt(s2) + correction2 * self.eps))
            if self.wd > 0:
                q = q * decay
            out[blk] = q
            for j in range(s1.size):
                c = quantize_2d(self.code1, s1[j] / m1, True)
                if np.signbit(self.code1[c]) != np.signbit(s1[j]):
                    c = c + 1 if s1[j] > 0 else c - 1
                self.c1[b0 + j] = c
                self.c2[b0 + j] = quantize_2d(self.code2, s2[j] / m2, False)
        return out


def case_adam8bit(rng):
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "block": 256,
             "min_8bit_size": 4096}
    c = Case("adam8bit", "bitsandbytes AdamW8bit kernels (kernels.cu @ 95f9af30) in float32 numpy", 6, hyper)
    c.add("w", rng.standard_normal((64, 64)) * 0.5, make_grads(rng, (64, 64), c.k, 10.0 ** rng.uniform(-3, 0, 64)))
    c.add("bias", rng.standard_normal(16) * 0.1, make_grads(rng, (16,), c.k))
    for pname, w0, grads in c.params:
        opt = Bnb8bitAdamW(w0.size, 1e-2, 0.9, 0.999, 1e-8, 0.1)
        p = w0.copy()
        for g in grads:
            p = opt.step(p, g)
        c.out[pname] = p.reshape(w0.shape)
    return c


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--galore-wheel", default="/tmp/pipdl/galore_torch-1.0-py3-none-any.whl")
    parser.add_argument("--apollo-wheel", default="/tmp/pipdl/apollo_torch-1.0.3-py3-none-any.whl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"numpy seed {SEED}")
    rng = np.random.default_rng(SEED)
    stub_modules()
    with tempfile.TemporaryDirectory() as tmp:
        galore_torch = import_wheel(args.galore_wheel, "galore_torch", tmp)
        apollo_torch = import_wheel(args.apollo_wheel, "apollo_torch", tmp)
        cases = [case_adamw(rng), case_galore(rng, galore_torch)]
        for name, manual, beta1 in (("adafactor_lr", True, None), ("adafactor_lr_b1", True, 0.9),
                                    ("adafactor_hf", False, None), ("adafactor_hf_b1", False, 0.9)):
            cases.append(case_adafactor(rng, galore_torch, name, manual, beta1))
        cases.append(case_gwt(rng))
        for name, rank, scale, stype, front in (("apollo_channel", 4, 1.0, "channel", False),
                                                ("apollo_channel_front", 4, 4.0, "channel", True),
                                                ("apollo_tensor", 1, 128.0, "tensor", False),
                                                ("apollo_tensor_front", 1, 128.0, "tensor", True)):
            cases.append(case_apollo(rng, apollo_torch, name, rank, scale, stype, front))
        dist = apollo_distribution(apollo_torch)
        cases.append(case_adam8bit(rng))
    tensors, meta = {}, {}
    for c in cases:
        tensors.update(c.tensors())
        meta["case." + c.name] = c.meta()
    meta["cases"] = ",".join(c.name for c in cases)
    meta["apollo_distribution"] = json.dumps(dist, sort_keys=True)
    meta["generator"] = "tests/reference/gen_optim.py"
    meta["seed"] = str(SEED)
    meta["versions"] = f"torch {torch.__version__}, numpy {np.__version__}, pywt {pywt.__version__}, " \
                       f"galore_torch 1.0, apollo_torch 1.0.3"
    size = write_safetensors(OUT, tensors, meta)
    print(f"{OUT}: {len(cases)} cases, {len(tensors)} tensors, {size} bytes")
    print("apollo distribution:", json.dumps(dist))


if __name__ == "__main__":
    sys.exit(main())
