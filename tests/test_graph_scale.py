"""Graph size (issue 12): the walks are linear in the node count (no timing asserted here; the
figures are in benchmarks/bench_graph.py)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from bench_graph import blocks, ladder  # noqa: E402

from n2nsurgery import widen as widen_mod  # noqa: E402
from n2nsurgery.inspect import describe  # noqa: E402


def _count_dispatches(monkeypatch):
    calls = {"n": 0}
    real = widen_mod.WidenContext._dispatch

    def counting(self, node, event):
        calls["n"] += 1
        return real(self, node, event)

    monkeypatch.setattr(widen_mod.WidenContext, "_dispatch", counting)
    return calls


def test_a_20k_node_widen_completes():
    model = ladder(20_000)
    student, report = widen_mod.widen(model, "fc5000", 8)
    assert report.new_width == 8 and len(student.arch.nodes) == len(model.arch.nodes)


@pytest.mark.parametrize("small, big", [(1_000, 4_000)])
def test_inspect_walks_grow_linearly(monkeypatch, small, big):
    calls = _count_dispatches(monkeypatch)
    describe(ladder(small))
    few = calls["n"]
    calls["n"] = 0
    describe(ladder(big))
    assert calls["n"] <= 4.5 * few  # 4x the nodes: about 4x the rule calls, not 16x


def test_a_residual_stream_is_walked_once_by_inspect(monkeypatch):
    """80 blocks share one residual stream: inspect walks it once, not once per writer."""
    model = blocks(80)
    calls = _count_dispatches(monkeypatch)
    info = describe(model)
    stream = [n for n in info["nodes"] if n["name"].endswith("down_proj")]
    assert len(stream) == 160 and all("group" in n["widen"] for n in stream)
    assert calls["n"] < 20 * len(model.arch.nodes)
