"""benchmarks/convergence.py on a tiny configuration: the Net2Net students start at the teacher.

Skipped without scikit-learn (the ``bench`` extra); CI installs only ``.[test]``.
"""

from __future__ import annotations

import sys

import pytest

from conftest import load_benchmark

pytest.importorskip("sklearn")

TINY = dict(seeds=1, teacher_steps=50, student_steps=10, eval_every=5)


@pytest.fixture(scope="module")
def bench():
    module = load_benchmark("convergence.py")
    yield module
    sys.modules.pop(module.__name__, None)


@pytest.fixture(scope="module")
def results(bench):
    import torch

    torch.set_num_threads(1)
    return bench.run_experiments(bench.Config(**TINY), log=lambda msg: None)


def test_json_has_the_documented_shape(bench, results):
    out = bench.summary(results)
    assert set(out) == {"wider", "deeper"}
    assert set(out["wider"]["methods"]) == {"net2net", "random_pad", "random_init"}
    assert set(out["deeper"]["methods"]) == {"net2net", "random_init"}
    for experiment in out.values():
        assert set(experiment) == {"teacher_val_acc", "teacher_train_acc", "methods"}
        assert isinstance(experiment["teacher_val_acc"], float) and isinstance(experiment["teacher_train_acc"], float)
        for curve in experiment["methods"].values():
            assert set(curve) == {"steps", "val_acc"}
            assert curve["steps"] == [0, 5, 10]
            assert len(curve["val_acc"]) == 3 and all(0.0 <= a <= 1.0 for a in curve["val_acc"])


def test_net2net_students_start_at_the_teacher(bench, results):
    for name, experiment in results.items():
        teacher = experiment["teacher_val_acc"]
        assert teacher > 0.5, f"{name}: the teacher did not learn ({teacher:.3f})"
        for method in ("net2net", bench.EXTRA):
            for _, acc in experiment["methods"][method]["curves"]:
                assert abs(acc[0] - teacher) <= 0.005, f"{name}/{method}: step 0 at {acc[0]:.4f}, teacher {teacher:.4f}"
        # random init starts near chance: the comparison above is not vacuous
        for _, acc in experiment["methods"]["random_init"]["curves"]:
            assert acc[0] < teacher - 0.2


def test_start_check_rejects_a_student_that_is_not_the_teacher(bench):
    import torch

    data = bench.load_digits_split(0.3)
    cfg = bench.Config(**TINY)
    teacher, _ = bench.train_teacher(data, cfg)
    with pytest.raises(AssertionError, match="logits differ"):
        bench.check_starts_at_teacher(teacher, bench.random_pad(teacher, seed=1), data, "random pad")
    # and the Net2Net students load into the plain torch.nn modules and compute the teacher's logits
    for student in (bench.net2net_wider(teacher, seed=3), bench.net2net_deeper(teacher)):
        bench.check_starts_at_teacher(teacher, student, data, "net2net")
        with torch.no_grad():
            assert torch.allclose(student(data[2]), teacher(data[2]), rtol=0, atol=1e-4 * float(teacher(data[2]).abs().max()))


def test_plots_and_table(bench, results, tmp_path):
    pytest.importorskip("matplotlib")
    paths = bench.plot(results, tmp_path, "-tiny")
    assert [p.name for p in paths] == ["wider-tiny.png", "deeper-tiny.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    table = bench.markdown_table(results)
    assert "| net2net | 0.01 |" in table and "random_pad" in table


def test_the_underfit_regime_has_a_teacher_that_does_not_fit_its_data(bench):
    import torch

    torch.set_num_threads(1)
    cfg = bench.Config(**TINY, regime="underfit")
    results = bench.run_experiments(cfg, log=lambda msg: None)  # asserts the teacher's train accuracy
    for name, experiment in results.items():
        assert experiment["teacher_train_acc"] <= bench.UNDERFIT_MAX_TRAIN_ACC
        for _, acc in experiment["methods"]["net2net"]["curves"]:
            assert abs(acc[0] - experiment["teacher_val_acc"]) <= 0.005, name
    # the deeper student keeps the tiny teacher's widths; the wider one has the full widths
    teacher, _ = bench.train_teacher(bench.load_digits_split(0.3), cfg)
    assert bench.widths_of(bench.net2net_deeper(teacher)) == bench.TINY_WIDTHS
    assert bench.widths_of(bench.net2net_wider(teacher, seed=0)) == bench.FULL_WIDTHS
