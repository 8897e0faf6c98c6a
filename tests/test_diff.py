"""`n2n diff`: nodes added/removed/changed, tensors added/removed/reshaped, parameter counts."""

from __future__ import annotations

import json

import pytest

from conftest import RECIPES, example_paths
from n2nsurgery import examples, load_model, model_from_state_dict
from n2nsurgery.cli import app
from n2nsurgery.deepen import deepen
from n2nsurgery.diff import diff_models, summarize
from n2nsurgery.widen import widen


@pytest.fixture
def cnn():
    return load_model(*example_paths("cnn"))


def test_widen_reshapes_tensors_and_adds_no_nodes(cnn):
    student, _ = widen(cnn, "conv1", 12)
    d = diff_models(cnn, student)
    assert d.nodes_added == d.nodes_removed == d.nodes_changed == []
    assert d.tensors_added == d.tensors_removed == []
    reshaped = {t.key: (t.old_shape, t.new_shape) for t in d.tensors_reshaped}
    assert reshaped == {
        "conv1.weight": ([8, 3, 3, 3], [12, 3, 3, 3]),
        "conv1.bias": ([8], [12]),
        "bn1.weight": ([8], [12]),
        "bn1.bias": ([8], [12]),
        "bn1.running_mean": ([8], [12]),
        "bn1.running_var": ([8], [12]),
        "conv2.weight": ([8, 8, 3, 3], [8, 12, 3, 3]),
    }
    added = 4 * 27 + 4 + 4 * 4 + 8 * 4 * 9  # conv1 rows and bias, bn1's four vectors, conv2 columns
    assert d.parameters == {"a": cnn.parameter_count(), "b": cnn.parameter_count() + added}
    assert d.nodes == {"a": 9, "b": 9}
    assert not d.empty
    assert summarize(d) == f"7 tensors reshaped; params {cnn.parameter_count():,} → {cnn.parameter_count() + added:,}"


def test_deepen_adds_nodes_and_tensors_and_rewires_a_consumer(cnn):
    student, _ = deepen(cnn, "relu1", op="conv", name="extra")
    d = diff_models(cnn, student)
    assert [(n["name"], n["op"], n["inputs"]) for n in d.nodes_added] == [("extra", "conv2d", ["relu1"]), ("extra_relu", "relu", ["extra"])]
    assert [(c.name, c.changes) for c in d.nodes_changed] == [("pool1", {"inputs": [["relu1"], ["extra_relu"]]})]
    assert {t["key"]: t["shape"] for t in d.tensors_added} == {"extra.weight": [8, 8, 3, 3], "extra.bias": [8]}
    assert d.tensors_reshaped == [] and d.tensors_removed == []
    assert d.parameters["b"] - d.parameters["a"] == 8 * 8 * 9 + 8
    assert summarize(d).startswith("+2 nodes (extra, extra_relu); 1 node changed (pool1); +2 tensors; params")


def test_removed_tensors_and_changed_values():
    sd = examples.build("mlp").state_dict()
    a = model_from_state_dict(examples.MLP_YAML, sd)
    sd_b = {k: v.clone() for k, v in sd.items() if k != "fc3.bias"}  # fc3 loses its (optional) bias
    sd_b["fc1.bias"][0] += 1.0
    b = model_from_state_dict(examples.MLP_YAML, sd_b)
    d = diff_models(a, b)
    assert d.tensors_removed == [{"key": "fc3.bias", "shape": [10], "dtype": "float32"}]
    assert d.tensors_values_changed == [] and d.values_compared is False
    d = diff_models(a, b, values=True)
    assert d.tensors_values_changed == ["fc1.bias"] and d.values_compared is True
    assert d.parameters["a"] - d.parameters["b"] == 10


def test_same_model_is_an_empty_diff(runner, cnn):
    assert diff_models(cnn, cnn, values=True).empty
    ckpt, arch = example_paths("cnn")
    r = runner.invoke(app, ["diff", ckpt, ckpt, "--arch", arch])
    assert r.exit_code == 0
    assert "no differences" in r.stderr and r.stdout == ""


def test_cli_table_and_json(runner, tmp_path, monkeypatch):
    from n2nsurgery.cli.common import console

    monkeypatch.setattr(console, "_width", 200)
    ckpt, arch = example_paths("cnn")
    out = tmp_path / "student.safetensors"
    assert runner.invoke(app, ["apply", ckpt, str(RECIPES / "cnn-wider-deeper.yaml"), "--arch", arch, "-o", str(out)]).exit_code == 0

    r = runner.invoke(app, ["diff", ckpt, str(out), "--arch-a", arch])  # B carries its own architecture
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    for text in ("relu2_deep", "conv2d", "conv1.weight", "[8, 3, 3, 3]", "[64, 3, 3, 3]", "fc.weight", "[10, 96]", "[10, 1536]",
                 "parameters 1,842 →", "nodes 9 → 12"):
        assert text in r.stderr, text

    r = runner.invoke(app, ["diff", ckpt, str(out), "--arch-a", arch, "--json"])
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["a"] == ckpt and doc["b"] == str(out)
    assert [n["name"] for n in doc["nodes_added"]] == ["relu2_deep", "relu2_deep_bn", "relu2_deep_relu"]
    assert {c["name"] for c in doc["nodes_changed"]} == {"flat"}
    shapes = {t["key"]: (t["old_shape"], t["new_shape"]) for t in doc["tensors_reshaped"]}
    assert shapes["fc.weight"] == ([10, 96], [10, 128 * 4 * 3])
    assert shapes["conv2.weight"] == ([8, 8, 3, 3], [128, 64, 3, 3])
    assert doc["parameters"]["a"] == 1842 and doc["parameters"]["b"] == load_model(str(out)).parameter_count()


def test_cli_reads_a_side_from_stdin(runner, tmp_path):
    ckpt, arch = example_paths("mlp")
    student, _ = widen(load_model(ckpt, arch), "fc2", 40)
    from n2nsurgery import save_model

    path = tmp_path / "s.safetensors"
    save_model(student, str(path))
    r = runner.invoke(app, ["diff", ckpt, "-", "--arch-a", arch, "--json"], input=path.read_bytes())
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["b"] == "<stdin>"
    assert {t["key"] for t in doc["tensors_reshaped"]} == {"fc2.weight", "fc2.bias", "fc3.weight"}


def test_cli_errors(runner):
    ckpt, arch = example_paths("mlp")
    r = runner.invoke(app, ["diff", "-", "-", "--arch", arch])
    assert r.exit_code == 2 and "only one of A and B can be '-'" in r.stderr
    r = runner.invoke(app, ["diff", ckpt, "missing.safetensors", "--arch", arch])
    assert r.exit_code == 2 and "missing.safetensors: no such file" in r.stderr and "Traceback" not in r.output
