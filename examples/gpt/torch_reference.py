#!/usr/bin/env python3
"""The PyTorch counterpart of slimgrad-gpt: nanoGPT's model (bias=False, dropout 0, tied head,
its initialisation), torch.optim.AdamW with nanoGPT's parameter groups (decay on 2-D weights),
the same byte tokens, 90/10 split, cosine schedule with warmup and clipping. For the step-time
comparison of README.md (same machine, same threads) and as a loss reference.

    python3 examples/gpt/torch_reference.py --data FILE [--steps 2000] [--threads 2] [--json F]
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class Attention(nn.Module):
    def __init__(self, c, heads, block):
        super().__init__()
        self.c_attn = nn.Linear(c, 3 * c, bias=False)
        self.c_proj = nn.Linear(c, c, bias=False)
        self.heads = heads
        self.register_buffer("mask", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        if hasattr(F, "scaled_dot_product_attention"):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # torch < 2.0: nanoGPT's slow path
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, c, heads, block):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c), Attention(c, heads, block)
        self.ln_2 = LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c, bias=False), nn.GELU(),
                                 nn.Linear(4 * c, c, bias=False))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab, block, layers, heads, c):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(block, c)
        self.h = nn.ModuleList(Block(c, heads, block) for _ in range(layers))
        self.ln_f = LayerNorm(c)
        self.lm_head = nn.Linear(c, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("c_proj.weight", "2.weight")) \
                    else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for b in self.h:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    raw = open(a.data, "rb").read()
    vocab = sorted(set(raw))
    lut = {b: i for i, b in enumerate(vocab)}
    data = torch.tensor([lut[b] for b in raw], dtype=torch.long)
    n = len(data) * 9 // 10
    train, val = data[:n], data[n:]

    def batch(split):
        ix = torch.randint(len(split) - a.block, (a.batch,))
        x = torch.stack([split[i:i + a.block] for i in ix])
        y = torch.stack([split[i + 1:i + 1 + a.block] for i in ix])
        return x, y

    model = GPT(len(vocab), a.block, a.layers, a.heads, a.width)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.99))

    def lr_at(it):
        if it < a.warmup:
            return a.lr * (it + 1) / (a.warmup + 1)
        ratio = (it - a.warmup) / max(1, a.steps - a.warmup)
        return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (a.lr - a.min_lr)

    step_ms = []
    loss = None
    for it in range(a.steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        x, y = batch(train)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_ms.append(1000 * (time.perf_counter() - t0))
    model.eval()
    with torch.no_grad():
        val_loss = sum(model(*batch(val)).item() for _ in range(a.eval_batches)) / a.eval_batches
    out = {"torch": torch.__version__, "threads": a.threads, "steps": a.steps,
           "train_loss": loss.item(), "val_loss": val_loss,
           "median_step_ms": statistics.median(step_ms)}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
