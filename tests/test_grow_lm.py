"""benchmarks/grow_lm.py on a tiny configuration: n2n's grown students start at the teacher's
loss, the naive copy does not, and the JSON holds the curves.

Skipped without transformers (the test and bench extras); the plots also need matplotlib.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import load_benchmark

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    module = load_benchmark("grow_lm.py")
    yield module
    sys.modules.pop(module.__name__, None)


@pytest.fixture(scope="module")
def tiny(bench):
    # Teacher: 1 layer, hidden 16, 2 heads over 1 KV head; student: 2 layers, hidden 32, 4 over 2.
    return bench.Config(
        seeds=1, teacher_steps=20, student_steps=6, eval_every=3, batch_size=4, seq_len=32, warmup=2, eval_windows=8,
        teacher=bench.Sizes(hidden=16, heads=2, kv_heads=1, intermediate=32, layers=1),
        student=bench.Sizes(hidden=32, heads=4, kv_heads=2, intermediate=64, layers=2),
    )


@pytest.fixture(scope="module")
def out(bench, tiny):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    return bench.summary(bench.run_experiment(tiny, log=lambda msg: None), wall_s=0.0)


def test_grown_students_start_at_the_teacher_and_the_naive_copy_does_not(bench, out):
    teacher = out["teacher"]["val_loss"]
    start = out["headline"]["step0_val_loss"]
    for method in bench.GROWN:
        assert start[method] == pytest.approx(teacher, rel=1e-4), method
    assert abs(start["naive_copy"] - teacher) > 1e-2  # pasting into a corner is not function-preserving
    assert start["scratch"] > teacher  # a random byte model starts near ln 256
    assert start["scratch"] == pytest.approx(start["scratch_long"])  # the same init


def test_json_has_the_curves_on_both_axes(bench, out, tiny):
    out = json.loads(json.dumps(out))  # what the file holds
    assert set(out["methods"]) == set(bench.METHODS)
    teacher_flops = out["teacher"]["flops"]
    assert teacher_flops == tiny.teacher_steps * out["teacher"]["flops_per_step"]
    for method, data in out["methods"].items():
        steps = data["steps"]
        assert steps[0] == 0 and steps == sorted(steps)
        assert steps[-1] == tiny.student_steps + (out["student"]["scratch_long_extra_steps"] if method == "scratch_long" else 0)
        assert len(data["val_loss"]) == len(steps) == len(data["compute_flops"]) == len(data["val_loss_per_seed"][0])
        start = teacher_flops if method in bench.FROM_TEACHER else 0.0
        assert data["compute_flops"][0] == start
        assert data["compute_flops"][-1] == pytest.approx(start + steps[-1] * out["student"]["flops_per_step"])
    assert out["student"]["config"]["hidden_size"] == 32 and out["student"]["config"]["num_hidden_layers"] == 2
    assert [s["field"] for s in out["student"]["grow_plan"]] == ["hidden_size", "num_key_value_heads", "intermediate_size", "num_hidden_layers"]
    files = out["corpus"]["files"]
    assert [f["path"] for f in files] == list(bench.STDLIB_FILES)
    assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) and f["size"] > 0 for f in files)
    assert out["headline"]["equal_steps"] == tiny.student_steps


def test_what_training_did_with_the_new_units(out):
    """The default growth's copies stay copies (equal shares: identical gradients), --split random's
    do not; the zero-padded residual coordinates move in both (the tool draws their readers' new
    columns at random, so they get gradient; with zero readers they stayed exactly 0)."""
    end = {m: out["methods"][m]["at_the_end"][0] for m in ("n2n", "n2n_random")}
    assert end["n2n"]["mlp_units_still_copies"] == 64 - 32 and end["n2n"]["kv_heads_still_copies"] == 1
    assert end["n2n_random"]["mlp_units_still_copies"] == 0 and end["n2n_random"]["kv_heads_still_copies"] == 0
    assert end["n2n"]["residual_new_dims_max_abs"] > 0.0 and end["n2n_random"]["residual_new_dims_max_abs"] > 0.0


def test_a_missing_corpus_file_stops_the_run_naming_it(bench, monkeypatch):
    monkeypatch.setattr(bench, "STDLIB_FILES", bench.STDLIB_FILES + ("no_such_module_n2n.py",))
    with pytest.raises(SystemExit, match="no_such_module_n2n.py is not in this Python's standard library"):
        bench.load_corpus()


def test_table_and_plots(bench, out, tmp_path):
    table = bench.markdown_table(out)
    assert "| n2n | " in table and "| scratch_long | " in table
    pytest.importorskip("matplotlib")
    paths = bench.plot(out, tmp_path, "-tiny")
    assert [p.name for p in paths] == ["grow_lm-tiny-steps.png", "grow_lm-tiny-compute.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
