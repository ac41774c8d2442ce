#!/usr/bin/env python3
"""Reference data for slimgrad's Flora rule (include/slimgrad/optim/flora.hpp, algorithms.md §6.4).

The official Flora (BorealisAI/flora-opt, flora_opt/optimizers/torch/flora.py, `flora_step_`)
is not on PyPI and imports bitsandbytes and accelerate at module level, so its step is
transcribed here in torch, line for line, with one change: the projection matrices. The official
code draws them with torch.Generator from per-tensor integer seeds (`stable_randn(...) /
math.sqrt(rank)`, a new seed every kappa steps); slimgrad draws them from Philox with key (seed,
tensor id, epoch) and standard deviation 1/sqrt(rank) (tests/reference/gen_philox.py reproduces
that generator independently). Here `projection(epoch)` returns slimgrad's matrix for the epoch
the official code would be at, so both sides run the same update given the same matrices.

Writes tests/data/flora_reference.safetensors in the format of `slimgrad replay` (w.NAME,
g.NAME.K) plus out.NAME (the weights after K steps) and the hyper-parameters as metadata.
Run: /usr/bin/python3 tests/reference/gen_flora.py
"""
import json
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gen_optim import f32, make_grads, write_safetensors  # noqa: E402
from gen_philox import gaussians  # noqa: E402

OUT = os.path.join(HERE, "..", "data", "flora_reference.safetensors")
SEED = 20261122


def tensor_id(name):
    """FNV-1a, 64 bits (core/orientation.hpp tensor_id)."""
    h = 0xCBF29CE484222325
    for c in name.encode():
        h ^= c
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def philox_projection(seed, name, epoch, shape, rank):
    """slimgrad's P of a tensor of `shape` for `epoch`: r x m when m < n, else n x r."""
    m, n = shape
    rows, cols = (rank, m) if m < n else (n, rank)
    vals = gaussians(seed, tensor_id(name), epoch, rows * cols, 1.0 / math.sqrt(rank))
    return torch.from_numpy(vals.reshape(rows, cols).copy())


class FloraTranscription:
    """flora_step_ of the official code (quantization off, no accelerator), per parameter."""

    def __init__(self, params, names, lr, rank, kappa, eps, clip_threshold, decay_rate, beta1,
                 weight_decay, scale_parameter, relative_step, seed):
        self.params, self.names = params, names
        self.g = dict(lr=lr, rank=rank, kappa=kappa, eps=eps, clip_threshold=clip_threshold,
                      decay_rate=decay_rate, beta1=beta1, weight_decay=weight_decay,
                      scale_parameter=scale_parameter, relative_step=relative_step,
                      warmup_init=False, factorize_second_moment=True)
        self.seed = seed
        self.state = {id(p): {"epoch": 0} for p in params}  # the official state["seed"]

    @staticmethod
    def _rms(t):
        return t.norm(2) / (t.numel() ** 0.5)

    def _get_lr(self, state):
        g = self.g
        rel = g["lr"]
        if g["relative_step"]:
            rel = min(1e-2, 1.0 / math.sqrt(state["step"]))
        scale = max(g["eps"][1], state["RMS"]) if g["scale_parameter"] else 1.0
        return scale * rel

    def _get_options(self, shape):
        g = self.g
        factored = len(shape) == 2 and g["factorize_second_moment"]
        use_first_moment = g["beta1"] is not None and g["beta1"] > 0
        factored_momentum = (use_first_moment and g["rank"] is not None and g["rank"] > 0
                             and factored and min(shape) >= g["rank"]
                             and max(shape) / min(shape) <= 4)
        return factored, use_first_moment, factored_momentum

    @staticmethod
    def _approx_sq_grad(row, col):
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        return torch.mul(r_factor, c_factor)

    def step_one(self, p, name, grad):
        g = self.g
        state = self.state[id(p)]
        shape = grad.shape
        factored, use_first_moment, factored_momentum = self._get_options(shape)
        if "step" not in state:
            state["step"] = 0
            if use_first_moment:
                if not factored_momentum:
                    state["exp_avg"] = torch.zeros_like(grad)
                else:
                    cshape = (g["rank"], shape[-1]) if shape[0] < shape[-1] else (shape[0], g["rank"])
                    state["exp_avg"] = torch.zeros(cshape).to(grad)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(shape[:-1]).to(grad)
                state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:]).to(grad)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["RMS"] = 0
        state["step"] += 1
        state["RMS"] = self._rms(p)
        lr = self._get_lr(state)
        b1 = g["beta1"]
        beta2t = 1.0 - math.pow(state["step"], g["decay_rate"])
        update = (grad**2) + g["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=(1.0 - beta2t))
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=(1.0 - beta2t))
            update = self._approx_sq_grad(row, col)
            update.mul_(grad)
        else:
            v = state["exp_avg_sq"]
            v.mul_(beta2t).add_(update, alpha=(1.0 - beta2t))
            update = v.rsqrt().mul_(grad)
        if use_first_moment:
            if not factored_momentum:
                update = update * (1 - b1) + state["exp_avg"] * b1
                state["exp_avg"].copy_(update)
            else:
                def projection(epoch):
                    return philox_projection(self.seed, name, epoch, tuple(shape), g["rank"])

                def down_proj(epoch, tensor):
                    if tensor.shape[0] < tensor.shape[-1]:
                        return projection(epoch) @ tensor
                    return tensor @ projection(epoch)

                def up_proj(epoch, shp, ctensor):
                    if shp[0] < shp[-1]:
                        return projection(epoch).t() @ ctensor
                    return ctensor @ projection(epoch).t()

                current = state["epoch"]
                raw_update = update.clone()
                update.copy_(update * (1 - b1)
                             + up_proj(current, update.shape, state["exp_avg"]) * b1)
                if state["step"] % g["kappa"] == 0:
                    nxt = current + 1
                    state["exp_avg"].copy_(
                        down_proj(nxt, up_proj(current, grad.shape, state["exp_avg"])))
                    state["epoch"] = nxt
                    current = nxt
                state["exp_avg"].copy_(
                    state["exp_avg"] * b1 + down_proj(current, raw_update) * (1 - b1))
        update.div_((self._rms(update) / g["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if g["weight_decay"] != 0:
            p.add_(p, alpha=(-g["weight_decay"] * lr))
        p.add_(-update)

    @torch.no_grad()
    def step(self, grads):
        for p, name, grad in zip(self.params, self.names, grads):
            self.step_one(p, name, grad)


def main():
    rng = np.random.default_rng(SEED)
    k_steps = 8
    hyper = dict(lr=0.01, rank=4, kappa=3, eps1=1e-30, eps2=1e-3, clip_threshold=1.0,
                 decay_rate=-0.8, beta1=0.9, weight_decay=0.01, scale_parameter=True,
                 relative_step=False, seed=7)
    # left: m < n (C is r x n); right: m >= n (C is m x r); tall: aspect 8 > 4, momentum kept
    # whole; vec: a vector (elementwise second moment, whole momentum).
    shapes = {"left": (12, 40), "right": (40, 16), "tall": (64, 8), "vec": (16,)}
    names = list(shapes)
    w0 = {n: f32(rng.standard_normal(s) * 0.5) for n, s in shapes.items()}
    grads = {n: make_grads(rng, s, k_steps) for n, s in shapes.items()}
    params = [torch.nn.Parameter(torch.from_numpy(w0[n].copy())) for n in names]
    opt = FloraTranscription(params, names, lr=hyper["lr"], rank=hyper["rank"],
                             kappa=hyper["kappa"], eps=(hyper["eps1"], hyper["eps2"]),
                             clip_threshold=hyper["clip_threshold"],
                             decay_rate=hyper["decay_rate"], beta1=hyper["beta1"],
                             weight_decay=hyper["weight_decay"],
                             scale_parameter=hyper["scale_parameter"],
                             relative_step=hyper["relative_step"], seed=hyper["seed"])
    for k in range(k_steps):
        opt.step([torch.from_numpy(grads[n][k].copy()) for n in names])
    tensors = {}
    for n, p in zip(names, params):
        tensors[f"w.{n}"] = w0[n]
        for k in range(k_steps):
            tensors[f"g.{n}.{k}"] = grads[n][k]
        tensors[f"out.{n}"] = p.detach().numpy().copy()
    meta = {"generator": "tests/reference/gen_flora.py", "torch": torch.__version__,
            "K": k_steps, "params": json.dumps(names), "hyper": json.dumps(hyper, sort_keys=True)}
    size = write_safetensors(OUT, tensors, meta)
    print(f"wrote {OUT} ({size} bytes)")


if __name__ == "__main__":
    main()
