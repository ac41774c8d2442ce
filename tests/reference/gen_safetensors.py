#!/usr/bin/env python3
"""Writes tests/data/python_written.safetensors with plain numpy + json + struct.

An independent writer for tests/io/test_safetensors.cpp (no safetensors package): tensors of
every dtype slimgrad supports, with values chosen to be exact in their dtype, laid out in the
buffer in an order different from their names, the metadata last in the header, and the
header padded with spaces to a multiple of 8 bytes as the format allows.

Run: /usr/bin/python3 tests/reference/gen_safetensors.py
"""
import json
import os
import struct

import numpy as np


def bf16_bits(values):
    """BF16 bit patterns of float32 values whose low 16 bits are zero (exact in BF16)."""
    f = np.asarray(values, dtype=np.float32)
    bits = f.view(np.uint32)
    assert np.all(bits & 0xFFFF == 0), "value not exact in bfloat16"
    return (bits >> 16).astype(np.uint16)


tensors = [  # (name, dtype, array) in buffer order: deliberately not sorted by name
    ("weight", "F32", (np.arange(12, dtype=np.float32) * 0.5 - 2.25).reshape(3, 4)),
    ("double", "F64", np.array([[np.pi, np.e], [-1.0 / 3.0, 1e300]], dtype=np.float64)),
    ("bf16", "BF16", bf16_bits([1.0, -2.5, 0.15625, 2.0**100])),
    ("half", "F16", np.array([[0, 1, -1], [0.5, 65504, 2.0**-14]], dtype=np.float16)),
    ("u8", "U8", np.array([0, 1, 127, 128, 255], dtype=np.uint8)),
    ("i8", "I8", np.array([-128, -1, 0, 127], dtype=np.int8)),
    ("i32", "I32", np.array([[-(2**31), -1], [0, 2**31 - 1]], dtype=np.int32)),
    ("i64", "I64", np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64)),
    ("scalar", "F32", np.array(42.0, dtype=np.float32)),
    ("empty", "F32", np.zeros((0, 3), dtype=np.float32)),
    ("a_first_name", "F32", np.array([-0.0, 1e-45, 3.4028235e38], dtype=np.float32)),
]

header = {}
buffer = b""
for name, dtype, arr in tensors:
    data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": dtype, "shape": list(arr.shape),
                    "data_offsets": [len(buffer), len(buffer) + len(data)]}
    buffer += data
header["__metadata__"] = {"format": "pt", "writer": "tests/reference/gen_safetensors.py",
                          "unicode": "\u03bb\u2192\u221e"}

text = json.dumps(header, ensure_ascii=False).encode("utf-8")
text += b" " * ((8 - len(text) % 8) % 8)
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data",
                   "python_written.safetensors")
with open(out, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    f.write(buffer)
print(f"wrote {os.path.normpath(out)}: {8 + len(text) + len(buffer)} bytes")
