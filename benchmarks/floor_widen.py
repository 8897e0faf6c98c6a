#!/usr/bin/env python
"""The least work a Python widening of bench_scale's dense checkpoint can do (not the tool).

A baseline for ``bench_scale.py``, not a surgery tool: it knows the benchmark's architecture
(a chain of float32 linear layers ``fcI.weight``/``fcI.bias``) and widens ``fcK`` with no
checks beyond the NaN/Inf scan, no architecture parsing, no verification, no torch and no CLI
framework. It writes the same tensors as ``n2n widen --no-verify`` would (its own unit map, so
not the same bytes) with everything that makes a widening fast:

* Python with numpy only (torch is what dominates ``n2n``'s start-up);
* the output header computed first, data page-aligned, untouched tensors copied file to file
  by the kernel (``copy_file_range``) at aligned offsets;
* the three remapped tensors gathered with numpy and written with ``pwrite``;
* every untouched tensor scanned for NaN/Inf in place through a memory map.

What it takes against ``cp`` of the same file is what no Python tool can beat on the machine:

    python benchmarks/floor_widen.py CKPT LAYER_INDEX NEW_WIDTH OUT
"""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np

ALIGN = 2 << 20


def main(src: str, k: int, width: int, dest: str) -> None:
    fd = os.open(src, os.O_RDONLY)
    n = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
    header = json.loads(os.pread(fd, n, 8))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    rows = {f"fc{k}.weight", f"fc{k}.bias"}  # the widened layer's units
    cols = {f"fc{k + 1}.weight"}  # the next layer's inputs
    old = header[f"fc{k}.weight"]["shape"][0]
    g = np.concatenate([np.arange(old), np.random.default_rng(0).integers(0, old, width - old)])
    share = (1.0 / np.bincount(g, minlength=old)[g]).astype(np.float32)

    out, pos = {}, 0
    for key in sorted(header, key=lambda key: (-(_size(header[key]["shape"]) % ALIGN == 0), key)):
        shape = list(header[key]["shape"])
        if key in rows:
            shape[0] = width
        if key in cols:
            shape[1] = width
        size = _size(shape)
        out[key] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    head = json.dumps({"__metadata__": meta, **dict(sorted(out.items()))}, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % ALIGN)
    tmp = dest + ".tmp"
    ofd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(ofd, struct.pack("<Q", len(head)) + head)
    obase = 8 + len(head)

    mm = np.memmap(src, dtype=np.uint8, mode="r")

    def array(key):
        a, b = header[key]["data_offsets"]
        return mm[base + a : base + b].view(np.float32).reshape(header[key]["shape"])

    for key in out:
        if key in rows or key in cols:
            continue
        if not np.isfinite(array(key)).all():
            sys.exit(f"{key}: NaN or Inf")
        a, b = header[key]["data_offsets"]
        left, at, to = b - a, base + a, obase + out[key]["data_offsets"][0]
        while left:
            done = os.copy_file_range(fd, ofd, left, at, to)
            left, at, to = left - done, at + done, to + done
    for key in sorted(rows | cols):
        x = array(key)
        y = np.take(x, g, axis=0) if key in rows else np.take(x, g, axis=1) * share
        os.pwrite(ofd, np.ascontiguousarray(y, dtype=np.float32).data, obase + out[key]["data_offsets"][0])
    os.close(ofd)
    os.replace(tmp, dest)


def _size(shape) -> int:
    return 4 * int(np.prod(shape))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
