"""Verification measures the largest difference, so errors of opposite sign never cancel.

A checkpoint-comparison bug seen in public code is ``|Σ(y_old − y_new)|``: two outputs moved by
+δ and −δ sum to zero and pass. These tests move two outputs of the shipped MLP by +δ and −δ
and require ``n2n verify`` to report max |Δ| = δ and fail.
"""

from __future__ import annotations

import json

from safetensors.torch import load_file, save_file

from conftest import example_paths
from n2nsurgery.cli import app

DELTA = 0.01


def _opposite_shifts(tmp_path) -> str:
    """The MLP with output 0 moved by +DELTA and output 1 by -DELTA (fc3 is its output layer)."""
    state = load_file(example_paths("mlp")[0])
    bias = state["fc3.bias"].clone()
    bias[0] += DELTA
    bias[1] -= DELTA
    state["fc3.bias"] = bias
    path = str(tmp_path / "shifted.safetensors")
    save_file(state, path, metadata={"format": "pt"})
    return path


def test_opposite_errors_do_not_cancel(runner, tmp_path):
    ckpt, arch = example_paths("mlp")
    result = runner.invoke(app, ["verify", ckpt, _opposite_shifts(tmp_path), "--arch", arch, "--json"])
    assert result.exit_code == 1, result.output
    (out,) = json.loads(result.stdout)["outputs"]
    assert out["passed"] is False
    assert abs(out["max_abs"] - DELTA) < 1e-6, out
