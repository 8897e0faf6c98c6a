"""`n2n inspect` and `n2n verify` (docs/commands.md) on the shipped examples and on checkpoints
exported from ordinary torch.nn modules; the executor against the examples' torch.nn modules."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import EXAMPLE_NAMES, assert_close, example_paths, n2n_exe, requires_cuda
from n2nsurgery import load_model, model_from_state_dict, save_model, verify
from n2nsurgery.cli import app
from n2nsurgery.examples import MLP_YAML, build
from n2nsurgery.executor import run

VERIFY_KEYS = {"passed", "outputs", "device", "probes", "seed", "atol", "rtol", "intermediates"}
OUTPUT_KEYS = {"name", "name_b", "shape", "max_abs", "max_rel", "bound", "passed", "nonfinite_a", "nonfinite_b", "numel"}


@pytest.fixture
def wide_console(monkeypatch):
    """Tables wide enough that no cell folds, whatever the terminal: node names stay whole."""
    from n2nsurgery.cli.common import console

    monkeypatch.setattr(console, "width", 400)


def _json(result) -> dict:
    return json.loads(result.stdout)


def _perturbed(tmp_path, name: str, key: str, delta: float, index=0, dtype=None) -> str:
    """A copy of a shipped example's checkpoint with one element of one tensor moved by `delta`."""
    state = load_file(example_paths(name)[0])
    t = state[key].clone()
    t.view(-1)[index] += delta
    state[key] = t
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path = str(tmp_path / f"{name}-perturbed.safetensors")
    save_file(state, path, metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------- executor


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_executor_matches_the_example_module(name):
    """The shipped files are what `examples.build(name)` says: same function, as plain PyTorch runs it."""
    model = load_model(*example_paths(name))
    module = build(name)
    torch.manual_seed(1)
    x = torch.randn(16, *model.arch.inputs["x"].shape)
    (got,) = run(model, {"x": x})
    with torch.no_grad():
        want = module(x)
    assert_close(got, want, 1e-6)
    assert float(want.abs().max()) > 0.1  # a real signal, not a degenerate all-zero output


@pytest.mark.filterwarnings("ignore:'n2nsurgery.examples' found in sys.modules:RuntimeWarning")
def test_shipped_examples_rebuild_byte_for_byte(tmp_path, monkeypatch):
    """`python -m n2nsurgery.examples FOLDER` (as the README says) remakes every shipped file exactly."""
    import runpy
    import sys

    from conftest import RECIPES

    monkeypatch.setattr(sys, "argv", ["n2nsurgery.examples", str(tmp_path)])
    runpy.run_module("n2nsurgery.examples", run_name="__main__", alter_sys=False)
    made = sorted(p.name for p in tmp_path.iterdir())
    assert {f"{n}.{ext}" for n in EXAMPLE_NAMES for ext in ("safetensors", "yaml")} <= set(made)
    for name in made:
        assert (tmp_path / name).read_bytes() == (RECIPES / name).read_bytes(), name


# ----------------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_inspect_table(runner, wide_console, name):
    ckpt, arch = example_paths(name)
    result = runner.invoke(app, ["inspect", ckpt, "--arch", arch])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # the table is human output: stderr
    model = load_model(ckpt, arch)
    for node in model.arch.nodes:
        assert node.name in result.stderr
    assert f"{len(model.arch.nodes)} nodes, {model.parameter_count():,} parameters" in result.stderr


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_inspect_json(runner, name):
    ckpt, arch = example_paths(name)
    result = runner.invoke(app, ["inspect", ckpt, "--arch", arch, "--json"])
    assert result.exit_code == 0, result.output
    info = _json(result)
    model = load_model(ckpt, arch)
    state = load_file(ckpt)
    assert info["name"] == name and info["source"] == ckpt
    assert [n["name"] for n in info["nodes"]] == [n.name for n in model.arch.nodes]
    assert info["inputs"] == {"x": {"shape": list(model.arch.inputs["x"].shape), "dtype": "float32"}}
    assert info["outputs"] == model.arch.outputs
    for n in info["nodes"]:
        assert tuple(n["output_shape"]) == model.shapes[n["name"]]
        for role, p in n["params"].items():
            assert p["shape"] == list(state[p["key"]].shape)
            assert p["dtype"] == "float32" or role == "num_batches_tracked"
    # Every tensor of an example is used by some node: the totals count all of them.
    assert info["totals"]["tensors"] == len(state)
    assert info["totals"]["parameters"] == sum(v.numel() for v in state.values() if v.is_floating_point())
    assert info["totals"]["nodes"] == len(model.arch.nodes)
    final = next(n for n in info["nodes"] if n["name"] == model.arch.outputs[0])
    assert final["output_shape"] == [10]


def test_inspect_json_counts_a_tied_tensor_once(runner, tmp_path):
    arch = tmp_path / "tied.yaml"
    arch.write_text(
        "format: n2n-arch/1\ninputs: {x: {shape: [4], dtype: float32}}\nnodes:\n"
        "  - {name: a, op: linear, in: x, params: {weight: shared.weight}}\n"
        "  - {name: b, op: linear, in: a, params: {weight: shared.weight}}\noutputs: [b]\n"
    )
    ckpt = str(tmp_path / "tied.safetensors")
    save_file({"shared.weight": torch.randn(4, 4)}, ckpt)
    info = _json(runner.invoke(app, ["inspect", ckpt, "--arch", str(arch), "--json"]))
    assert info["totals"] == {"nodes": 2, "parameters": 16, "tensors": 1}


def test_inspect_reads_the_embedded_architecture(runner, tmp_path):
    out = str(tmp_path / "cnn.safetensors")
    save_model(load_model(*example_paths("cnn")), out)
    result = runner.invoke(app, ["inspect", out, "--json"])  # no --arch
    assert result.exit_code == 0, result.output
    assert _json(result)["name"] == "cnn"


# -------------------------------------------------------- a checkpoint from a torch.nn state_dict


class _Net(nn.Module):
    """An ordinary model whose state_dict keys have dots: features.0.weight, classifier.1.bias..."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(6 * 5 * 4, 7))

    def forward(self, x):
        return self.classifier(self.features(x))


_NET_YAML = """\
format: n2n-arch/1
name: torch-net
inputs:
  x: {shape: [3, 10, 8], dtype: float32}
nodes:
  - {name: features.0, op: conv2d, in: x, padding: 1}
  - {name: features.1, op: batchnorm, in: features.0}
  - {name: features.2, op: relu, in: features.1}
  - {name: features.3, op: max_pool2d, in: features.2, kernel_size: 2}
  - {name: features.4, op: conv2d, in: features.3, padding: 1, groups: 3}
  - {name: features.5, op: batchnorm, in: features.4}
  - {name: features.6, op: relu, in: features.5}
  - {name: classifier.0, op: flatten, in: features.6}
  - {name: classifier.1, op: dropout, in: classifier.0, p: 0.2}
  - {name: classifier.2, op: linear, in: classifier.1}
outputs: [classifier.2]
"""


@pytest.fixture
def torch_export(tmp_path):
    """(module, checkpoint, arch): a torch.nn model's state_dict saved by the safetensors library."""
    from n2nsurgery.examples import randomize_batchnorm

    torch.manual_seed(3)
    module = randomize_batchnorm(_Net(), seed=3).eval()
    ckpt = str(tmp_path / "net.safetensors")
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, ckpt)
    arch = tmp_path / "net.yaml"
    arch.write_text(_NET_YAML)
    return module, ckpt, str(arch)


def test_state_dict_export_runs_like_the_module(torch_export):
    module, ckpt, arch = torch_export
    x = torch.randn(8, 3, 10, 8)
    (got,) = run(load_model(ckpt, arch), {"x": x})
    with torch.no_grad():
        assert_close(got, module(x), 1e-6)


def test_inspect_state_dict_export(runner, wide_console, torch_export):
    module, ckpt, arch = torch_export
    result = runner.invoke(app, ["inspect", ckpt, "--arch", arch, "--json"])
    assert result.exit_code == 0, result.output
    info = _json(result)
    nodes = {n["name"]: n for n in info["nodes"]}
    assert nodes["features.0"]["params"]["weight"] == {"key": "features.0.weight", "shape": [6, 3, 3, 3], "dtype": "float32"}
    assert "bias" not in nodes["features.4"]["params"]
    assert nodes["classifier.0"]["output_shape"] == [120]
    assert info["totals"]["parameters"] == sum(v.numel() for v in module.state_dict().values() if v.is_floating_point())
    table = runner.invoke(app, ["inspect", ckpt, "--arch", arch])
    assert table.exit_code == 0
    assert "features.4" in table.stderr and "classifier.2" in table.stderr


def test_verify_state_dict_export_against_itself(runner, torch_export):
    _, ckpt, arch = torch_export
    result = runner.invoke(app, ["verify", ckpt, ckpt, "--arch", arch, "--json"])
    assert result.exit_code == 0, result.output
    assert _json(result)["outputs"][0]["name"] == "classifier.2"


# ------------------------------------------------------------------------------------ verify


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_verify_passes_against_itself(runner, name):
    ckpt, arch = example_paths(name)
    result = runner.invoke(app, ["verify", ckpt, ckpt, "--arch", arch])
    assert result.exit_code == 0, result.output
    assert "pass" in result.stderr and "equal within" in result.stderr
    assert "device cpu" in result.stderr or "device cuda" in result.stderr  # auto says which ran


def test_verify_fails_beyond_tolerance(runner, tmp_path):
    ckpt, arch = example_paths("mlp")
    bad = _perturbed(tmp_path, "mlp", "fc3.bias", 0.01, index=3)  # moves output 3 by exactly 0.01
    result = runner.invoke(app, ["verify", ckpt, bad, "--arch", arch, "--json"])
    assert result.exit_code == 1, result.output
    report = _json(result)
    assert report["passed"] is False
    (out,) = report["outputs"]
    assert out["passed"] is False and out["name"] == "fc3"
    assert abs(out["max_abs"] - 0.01) < 1e-6
    assert out["max_rel"] > 0 and out["max_abs"] > out["bound"]


def test_verify_failure_table_names_output_and_errors(runner, tmp_path):
    ckpt, arch = example_paths("cnn")
    bad = _perturbed(tmp_path, "cnn", "conv1.weight", 0.5)  # deep in the graph, spreads everywhere
    result = runner.invoke(app, ["verify", ckpt, bad, "--arch", arch])
    assert result.exit_code == 1
    assert "FAIL" in result.stderr and "fc" in result.stderr and "differ" in result.stderr
    assert "Traceback" not in result.output


def test_verify_passes_below_tolerance(runner, tmp_path):
    ckpt, arch = example_paths("mlp")
    close = _perturbed(tmp_path, "mlp", "fc3.bias", 2e-6)  # atol is 1e-5 for float32
    result = runner.invoke(app, ["verify", ckpt, close, "--arch", arch, "--json"])
    assert result.exit_code == 0, result.output
    (out,) = _json(result)["outputs"]
    assert 1e-6 < out["max_abs"] < 3e-6  # the difference is seen, and judged small enough


def test_verify_tolerance_options(runner, tmp_path):
    ckpt, arch = example_paths("mlp")
    bad = _perturbed(tmp_path, "mlp", "fc3.bias", 0.01)
    assert runner.invoke(app, ["verify", ckpt, bad, "--arch", arch, "--atol", "0.02"]).exit_code == 0
    assert runner.invoke(app, ["verify", ckpt, bad, "--arch", arch, "--atol", "0", "--rtol", "1"]).exit_code == 0
    assert runner.invoke(app, ["verify", ckpt, bad, "--arch", arch, "--atol", "0.005", "--rtol", "0"]).exit_code == 1
    assert runner.invoke(app, ["verify", ckpt, bad, "--arch", arch, "--atol", "-1"]).exit_code == 2


def test_verify_json_shape(runner):
    ckpt, arch = example_paths("resnet")
    result = runner.invoke(app, ["verify", ckpt, ckpt, "--arch", arch, "--json", "--probes", "10", "--seed", "7", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = _json(result)
    assert set(report) == VERIFY_KEYS
    assert report["passed"] is True and report["probes"] == 10 and report["seed"] == 7 and report["device"] == "cpu"
    assert (report["atol"], report["rtol"]) == (1e-5, 1e-4)
    (out,) = report["outputs"]
    assert set(out) == OUTPUT_KEYS
    assert out["shape"] == [10] and out["max_abs"] == 0.0 and out["max_rel"] == 0.0
    assert result.stderr == ""  # --json: nothing for humans


def test_verify_multiple_outputs_reported_separately(runner, tmp_path):
    arch = tmp_path / "two.yaml"
    arch.write_text(MLP_YAML.replace("outputs: [fc3]", "outputs: [fc3, relu1]"))
    ckpt, _ = example_paths("mlp")
    bad = _perturbed(tmp_path, "mlp", "fc3.weight", 1.0)  # fc3 changes, relu1 does not
    report = _json(runner.invoke(app, ["verify", ckpt, bad, "--arch", str(arch), "--json"]))
    by_name = {o["name"]: o for o in report["outputs"]}
    assert by_name["fc3"]["passed"] is False and by_name["relu1"]["passed"] is True
    assert by_name["relu1"]["max_abs"] == 0.0 and by_name["relu1"]["shape"] == [32]


def test_verify_models_with_different_inputs_exit_2(runner):
    a, arch_a = example_paths("mlp")
    b, arch_b = example_paths("cnn")
    result = runner.invoke(app, ["verify", a, b, "--arch-a", arch_a, "--arch-b", arch_b])
    assert result.exit_code == 2
    assert "different inputs" in result.stderr and "Traceback" not in result.output


def test_verify_different_output_shapes_fail(runner, tmp_path):
    a, arch = example_paths("mlp")
    arch_b = tmp_path / "b.yaml"
    arch_b.write_text(MLP_YAML.replace("outputs: [fc3]", "outputs: [fc2]"))
    result = runner.invoke(app, ["verify", a, a, "--arch-a", arch, "--arch-b", str(arch_b), "--json"])
    assert result.exit_code == 1
    (out,) = _json(result)["outputs"]
    assert out["name"] == "fc3" and out["name_b"] == "fc2" and out["passed"] is False


def test_verify_b_falls_back_to_arch_a_or_its_own(runner, tmp_path):
    ckpt, arch = example_paths("inception")
    carried = str(tmp_path / "carried.safetensors")
    save_model(load_model(ckpt, arch), carried)
    assert runner.invoke(app, ["verify", ckpt, ckpt, "--arch-a", arch]).exit_code == 0  # B uses --arch-a
    assert runner.invoke(app, ["verify", ckpt, carried, "--arch-a", arch]).exit_code == 0  # B its own
    assert runner.invoke(app, ["verify", carried, ckpt, "--arch-b", arch]).exit_code == 0


def test_verify_probes_and_seed_change_the_probes():
    model = load_model(*example_paths("mlp"))
    other = model_from_state_dict(MLP_YAML, {**load_file(example_paths("mlp")[0]), "fc1.bias": torch.zeros(32)})
    r1 = verify(model, other, probes=8, seed=1, device="cpu")
    r2 = verify(model, other, probes=8, seed=2, device="cpu")
    r1b = verify(model, other, probes=8, seed=1, device="cpu")
    assert r1.max_abs == r1b.max_abs  # same seed, same probes, same figures
    assert r1.max_abs != r2.max_abs
    assert verify(model, other, probes=100, device="cpu").probes == 100  # more than one chunk of 64


@pytest.mark.parametrize("atol, rtol", [(float("nan"), None), (None, float("inf")), (-1.0, None)])
def test_verify_rejects_meaningless_tolerances(atol, rtol):
    from n2nsurgery.errors import N2NError

    model = load_model(*example_paths("mlp"))
    with pytest.raises(N2NError, match="finite and not negative"):
        verify(model, model, atol=atol, rtol=rtol, device="cpu")


@pytest.mark.parametrize("dtype, tol", [(torch.float16, (1e-3, 5e-3)), (torch.bfloat16, (1e-2, 3e-2))])
def test_half_precision_default_tolerances(runner, tmp_path, dtype, tol):
    ckpt, arch = example_paths("cnn")
    half = _perturbed(tmp_path, "cnn", "fc.bias", 0.0, dtype=dtype)  # a plain cast of the float32 model
    report = _json(runner.invoke(app, ["verify", half, half, "--arch", arch, "--json"]))
    assert (report["atol"], report["rtol"]) == tol
    # The cast model against the float32 original: the least precise dtype sets the default, and
    # rounding to half precision stays within it, while float32's tolerance would reject it.
    cast = runner.invoke(app, ["verify", ckpt, half, "--arch", arch, "--json"])
    assert cast.exit_code == 0, cast.output
    assert (_json(cast)["atol"], _json(cast)["rtol"]) == tol
    assert _json(cast)["outputs"][0]["max_abs"] > 1e-5
    strict = runner.invoke(app, ["verify", ckpt, half, "--arch", arch, "--atol", "1e-5", "--rtol", "1e-4"])
    assert strict.exit_code == 1


# ----------------------------------------------------------------------------- real processes


def _pipe(producer: list, consumer: list) -> subprocess.CompletedProcess:
    """Run `producer | consumer` with real OS pipes (no shell)."""
    first = subprocess.Popen(producer, stdout=subprocess.PIPE)
    second = subprocess.Popen(consumer, stdin=first.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first.stdout.close()  # so the producer sees a broken pipe if the consumer exits early
    out, err = second.communicate(timeout=120)
    assert first.wait(timeout=120) == 0
    return subprocess.CompletedProcess(consumer, second.returncode, out, err)


def _cat() -> list:
    return [shutil.which("cat")] if shutil.which("cat") else [__import__("sys").executable, "-c", "import sys,shutil; shutil.copyfileobj(open(sys.argv[1],'rb'), sys.stdout.buffer)"]


def test_verify_through_a_real_pipe(tmp_path):
    ckpt, arch = example_paths("resnet")
    ok = _pipe(_cat() + [ckpt], [n2n_exe(), "verify", ckpt, "-", "--arch", arch])
    assert ok.returncode == 0, ok.stderr.decode()
    assert "equal within" in ok.stderr.decode() and ok.stdout == b""

    bad = _perturbed(tmp_path, "resnet", "fc.weight", 0.5)
    differ = _pipe(_cat() + [bad], [n2n_exe(), "verify", ckpt, "-", "--arch", arch, "--json"])
    assert differ.returncode == 1
    assert json.loads(differ.stdout)["passed"] is False


def test_stdin_as_a_in_verify(tmp_path):
    ckpt, arch = example_paths("mlp")
    done = _pipe(_cat() + [ckpt], [n2n_exe(), "verify", "-", ckpt, "--arch", arch, "--json"])
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["passed"] is True


def test_console_script_errors_without_traceback(tmp_path):
    done = subprocess.run([n2n_exe(), "inspect", str(tmp_path / "nope.safetensors")], capture_output=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.decode().strip() == f"error: {tmp_path / 'nope.safetensors'}: no such file"
    assert done.stdout == b""


# --------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_verify_on_cuda(runner, name):
    ckpt, arch = example_paths(name)
    result = runner.invoke(app, ["verify", ckpt, ckpt, "--arch", arch, "--device", "cuda", "--json"])
    assert result.exit_code == 0, result.output
    assert _json(result)["device"].startswith("cuda")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_cuda_executor_matches_cpu_with_tf32_off(name):
    """TF32 would give ~1e-3 relative error; verify's math must match the CPU to float32 precision."""
    model = load_model(*example_paths(name))
    torch.manual_seed(0)
    x = torch.randn(64, *model.arch.inputs["x"].shape)
    (cpu,) = run(model, {"x": x}, "cpu")
    (gpu,) = run(model, {"x": x}, "cuda")
    assert_close(gpu.cpu(), cpu, 1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_without_a_gpu_exits_2(runner):
    ckpt, arch = example_paths("mlp")
    result = runner.invoke(app, ["verify", ckpt, ckpt, "--arch", arch, "--device", "cuda"])
    assert result.exit_code == 2
    assert "no CUDA device" in result.stderr and "--device cpu" in result.stderr
