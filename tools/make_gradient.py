#!/usr/bin/env python3
"""Writes the weight gradients of a small character-level MLP on real English text.

Model: the previous 8 characters -> embedding (32 each, concatenated: 256) -> hidden 256
(tanh) -> logits over the characters of the text. It is trained briefly with Adam (so the
gradient is a mid-training one, not the one at initialisation), then the cross-entropy gradient
is taken on a fresh batch. Output (safetensors, written with numpy + json + struct):
  hidden.weight  256 x 256   dL/dW1 (out x in, PyTorch's layout)
  out.weight     V x 256     dL/dW2
Text: --text, else tinyshakespeare.txt beside the repository (../shared/data), else a text
every Debian system has (/usr/share/common-licenses/GPL-3).

  python3 tools/make_gradient.py OUT.safetensors [--text PATH] [--steps N] [--seed S]
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CANDIDATES = [os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt"),
              "/work/shared/data/tinyshakespeare.txt",
              "/usr/share/common-licenses/GPL-3"]
CONTEXT, EMBED, HIDDEN = 8, 32, 256


def write_safetensors(path, tensors, metadata):
    header, buf = {"__metadata__": metadata}, b""
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [len(buf), len(buf) + len(data)]}
        buf += data
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + buf)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--text")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    path = args.text or next((p for p in CANDIDATES if os.path.isfile(p)), None)
    if path is None:
        sys.exit("make_gradient.py: no text found; pass --text PATH")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    data = np.fromiter((lookup[c] for c in text), dtype=np.int64, count=len(text))
    V = len(vocab)

    rng = np.random.default_rng(args.seed)
    params = {"E": rng.standard_normal((V, EMBED)).astype(np.float32),
              "W1": (rng.standard_normal((HIDDEN, CONTEXT * EMBED)) /
                     np.sqrt(CONTEXT * EMBED)).astype(np.float32),
              "b1": np.zeros(HIDDEN, np.float32),
              "W2": (rng.standard_normal((V, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32),
              "b2": np.zeros(V, np.float32)}

    def loss_and_grads(batch):
        pos = rng.integers(CONTEXT, len(data), size=batch)
        ctx = data[pos[:, None] - np.arange(CONTEXT, 0, -1)[None, :]]   # (B, 8)
        x = params["E"][ctx].reshape(batch, CONTEXT * EMBED)            # (B, 256)
        h = np.tanh(x @ params["W1"].T + params["b1"])
        logits = h @ params["W2"].T + params["b2"]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        y = data[pos]
        loss = float(-np.mean(np.log(p[np.arange(batch), y] + 1e-12)))
        dlogits = p
        dlogits[np.arange(batch), y] -= 1.0
        dlogits /= batch
        dh = (dlogits @ params["W2"]) * (1.0 - h * h)
        dx = (dh @ params["W1"]).reshape(batch, CONTEXT, EMBED)
        onehot = np.zeros((batch * CONTEXT, params["E"].shape[0]), np.float32)
        onehot[np.arange(batch * CONTEXT), ctx.reshape(-1)] = 1.0
        dE = onehot.T @ dx.reshape(batch * CONTEXT, EMBED)
        return loss, {"E": dE, "W1": dh.T @ x, "b1": dh.sum(0), "W2": dlogits.T @ h,
                      "b2": dlogits.sum(0)}

    t0 = time.time()
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    first = None
    for step in range(1, args.steps + 1):  # Adam, lr 3e-3
        loss, g = loss_and_grads(128)
        first = loss if first is None else first
        for k in params:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v2[k] = 0.999 * v2[k] + 0.001 * g[k] * g[k]
            mh, vh = m[k] / (1 - 0.9**step), v2[k] / (1 - 0.999**step)
            params[k] -= (3e-3 * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
    loss, g = loss_and_grads(2048)
    write_safetensors(args.out, {"hidden.weight": g["W1"].astype(np.float32),
                                 "out.weight": g["W2"].astype(np.float32)},
                      {"text": os.path.basename(path), "steps": str(args.steps),
                       "loss": f"{loss:.4f}"})
    print(f"make_gradient: {os.path.normpath(path)} ({len(text)} chars, vocab {V}); "
          f"MLP {CONTEXT}x{EMBED} -> {HIDDEN} -> {V}, {args.steps} Adam steps in "
          f"{time.time() - t0:.1f} s, loss {first:.2f} -> {loss:.2f}")
    print(f"make_gradient: wrote {args.out}: hidden.weight {g['W1'].shape[0]}x"
          f"{g['W1'].shape[1]}, out.weight {g['W2'].shape[0]}x{g['W2'].shape[1]} (float32)")


if __name__ == "__main__":
    main()
