"""Importing a torch.nn.Module (torch.fx) and checking an architecture against its module.

The judge is always the user's own module: an imported model must compute what the module
computes, and a widened student must load back into the module's class built at the new width
(``load_state_dict(strict=True)``) and compute the teacher's function there.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import n2nsurgery
from n2nsurgery import N2NError, VerificationFailed, from_module, load_model, save_model
from n2nsurgery.cli import app
from n2nsurgery.importer import compare_with_module
from n2nsurgery.widen import widen

from conftest import max_abs_diff

# ------------------------------------------------------------------------------- the modules


class MLP(nn.Module):
    def __init__(self, hidden: int = 6):
        super().__init__()
        self.fc1 = nn.Linear(5, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CNN(nn.Module):
    """Batchnorm with non-default running statistics, dropout, a flatten spelled as a view."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(0.5)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(width * 3 * 3, 4)

    def forward(self, x):
        x = self.pool(self.drop(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.view(x.size(0), -1))


class Residual(nn.Module):
    """A residual block with `+`, a module called twice, and torch.flatten(x, 1)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv2(self.relu(self.bn1(self.conv1(x))))
        return self.head(torch.flatten(self.relu(x + y), 1))


class Concat(nn.Module):
    """Two branches concatenated on the channel axis, then pooled and flattened as a method."""

    def __init__(self, a: int = 3, b: int = 5):
        super().__init__()
        self.left = nn.Conv2d(2, a, 1)
        self.right = nn.Conv2d(2, b, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(a + b, 2)

    def forward(self, x):
        y = torch.cat([self.left(x), torch.sigmoid(self.right(x))], dim=1)
        return self.fc(self.pool(y).flatten(1))


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and non-default batchnorm statistics (defaults would hide a wrong eps or order)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
    return module.eval()


def _round_trip(module, example, tmp_path):
    """Import, write, load back: the model the CLI user would hold."""
    model = from_module(module, example)
    path = str(tmp_path / "imported.safetensors")
    save_model(model, path)
    return load_model(path)


def _judge(teacher: nn.Module, student_module: nn.Module, example: torch.Tensor) -> float:
    """max |Δ| between two modules' outputs on random inputs of the example's shape."""
    x = torch.randn((32,) + tuple(example.shape[1:]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return max_abs_diff(teacher.eval()(x), student_module.eval()(x))


def _load_student(cls, student, **widths) -> nn.Module:
    module = cls(**widths)
    module.load_state_dict({k: student.tensors.get(k) for k in student.tensors.keys()}, strict=True)
    return module


# --------------------------------------------------------------- import, grow, load back


@pytest.mark.parametrize(
    "cls, example, layer, widths",
    [
        (MLP, torch.randn(2, 5), "fc1", {"hidden": 10}),
        (CNN, torch.randn(2, 3, 6, 6), "conv1", {"width": 7}),
        (Residual, torch.randn(2, 3, 4, 4), "conv1", {"width": 9}),
        (Concat, torch.randn(2, 2, 5, 5), "right", {"b": 8}),
    ],
    ids=["mlp", "cnn-bn-dropout-view", "residual-add", "concat"],
)
def test_imported_model_widens_and_loads_back_into_the_module(cls, example, layer, widths, tmp_path):
    teacher = _randomize(cls())
    model = _round_trip(teacher, example, tmp_path)
    assert compare_with_module(teacher, model).passed
    width = next(iter(widths.values()))
    student, _ = widen(model, layer, width)
    grown = _load_student(cls, student, **widths)  # the user's class at the new width is the judge
    assert _judge(teacher, grown, example) < 1e-5


def test_node_names_are_module_paths_and_keys_the_state_dict():
    teacher = _randomize(CNN())
    model = from_module(teacher, torch.randn(2, 3, 6, 6))
    names = [n.name for n in model.arch.nodes]
    assert names[:2] == ["conv1", "bn1"] and "fc" in names
    assert "drop" not in names  # dropout is the identity at inference: folded
    assert set(model.tensors.keys()) == set(teacher.state_dict())
    assert model.arch.node("bn1").attrs.get("eps", 1e-5) == 1e-5


def test_a_module_called_twice_shares_its_parameters():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    model = from_module(_randomize(Twice()), torch.randn(2, 4))
    second = model.arch.nodes[-1]
    assert second.name != "fc" and second.params == {"weight": "fc.weight", "bias": "fc.bias"}


def test_from_module_is_in_the_public_api():
    assert "from_module" in n2nsurgery.__all__ and n2nsurgery.from_module is from_module


def test_the_module_is_left_in_its_training_mode():
    teacher = CNN().train()
    from_module(teacher, torch.randn(2, 3, 6, 6))
    assert teacher.training


def test_a_module_in_training_mode_is_traced_as_at_inference():
    """A branch on self.training (stochastic depth, an auxiliary head) takes its inference path."""

    class TrainOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.aux = nn.LSTM(4, 4)  # used in training only: never met at inference

        def forward(self, x):
            if self.training:
                return self.aux(x)
            return self.fc(F.dropout(x, 0.2, self.training))

    teacher = _randomize(TrainOnly()).train()
    model = from_module(teacher, torch.randn(2, 4))
    assert [n.op for n in model.arch.nodes] == ["linear"] and teacher.training


# -------------------------------------------------------------------------------- refusals


def test_an_unsupported_module_names_its_path_and_type():
    class WithLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4))

        def forward(self, x):
            return self.enc(x)

    with pytest.raises(N2NError) as e:
        from_module(WithLSTM(), torch.randn(2, 4))
    msg = str(e.value)
    assert "'enc.1'" in msg and "LSTM" in msg and "supported:" in msg and "Linear" in msg
    assert "\n" not in msg


def test_an_op_the_registry_lacks_is_refused_by_name(monkeypatch):
    from n2nsurgery import importer

    monkeypatch.setitem(importer.MODULES, nn.Tanh, ("no_such_op", importer._none))
    with pytest.raises(N2NError, match=r"module 'act' \(Tanh\): the op set lacks 'no_such_op'"):
        from_module(MLP(), torch.randn(2, 5))


def test_an_untraceable_module_gives_the_tracers_reason_in_one_line():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    with pytest.raises(N2NError) as e:
        from_module(Branchy(), torch.randn(2, 4))
    msg = str(e.value)
    assert msg.startswith("cannot trace Branchy with torch.fx:") and "control flow" in msg and "\n" not in msg


def test_a_view_that_does_not_keep_the_batch_axis_is_refused():
    class Viewer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).view(-1, 2, 2)

    with pytest.raises(N2NError, match=r"only a view that keeps the batch axis, x.view\(x.size\(0\), ...\)"):
        from_module(Viewer(), torch.randn(2, 4))


def test_an_import_that_differs_from_the_module_is_exit_1(monkeypatch):
    """Checked at the door: a mapping that computes something else never gets out."""
    from n2nsurgery import importer

    monkeypatch.setitem(importer.MODULES, nn.Tanh, ("sigmoid", importer._none))  # a wrong mapping
    with pytest.raises(VerificationFailed) as e:
        from_module(_randomize(MLP()), torch.randn(2, 5))
    assert e.value.exit_code == 1 and "differs from MLP" in str(e.value)


# --------------------------------------------------------------------------------- the CLI

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, a=3, b=5):
        super().__init__()
        self.left = nn.Conv2d(2, a, 1)
        self.right = nn.Conv2d(2, b, 3, padding=1)
        self.bn = nn.BatchNorm2d(a + b)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(a + b, 2)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(y))), 1))


def make():
    torch.manual_seed(0)
    return Net()


def lstm():
    return nn.LSTM(4, 4)
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    (tmp_path / "h13nets.py").write_text(textwrap.dedent(NETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_import_writes_a_checkpoint_carrying_its_architecture(runner, nets):
    out, arch = nets / "net.safetensors", nets / "net.yaml"
    r = runner.invoke(app, ["import", "h13nets:make", "--input-shape", "2,5,5", "-o", str(out), "--arch-out", str(arch)])
    assert r.exit_code == 0, r.output
    model = load_model(str(out))  # no --arch: the checkpoint carries it
    assert model.arch.to_yaml() == arch.read_text()
    assert model.history[-1]["op"] == "import"
    r = runner.invoke(app, ["verify", "--module", "h13nets:make", str(out)])
    assert r.exit_code == 0, r.output


def test_cli_verify_module_catches_swapped_concat_inputs(runner, nets):
    """The issue's case: swapped concat inputs fit every shape but compute something else."""
    out = nets / "net.safetensors"
    assert runner.invoke(app, ["import", "h13nets:make", "--input-shape", "2,5,5", "-o", str(out)]).exit_code == 0
    text = load_model(str(out)).arch.to_yaml()
    swapped = text.replace("in: [left, right]", "in: [right, left]")
    assert swapped != text
    (nets / "swapped.yaml").write_text(swapped)
    r = runner.invoke(app, ["verify", "--module", "h13nets:make", str(out), "--arch", "swapped.yaml"])
    assert r.exit_code == 1, r.output


def test_cli_import_a_missing_factory_is_exit_2(runner, nets):
    r = runner.invoke(app, ["import", "h13nets:nope", "--input-shape", "2,5,5", "-o", "x.safetensors"])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: 'h13nets:nope': module 'h13nets' has no 'nope'") and "make" in r.stderr
    assert "Traceback" not in r.output and not (nets / "x.safetensors").exists()


@pytest.mark.parametrize("spec, needle", [("no_such_mod:make", "cannot import module"), ("h13nets", "MODULE:FACTORY"),
                                          ("h13nets:lstm", "LSTM")])
def test_cli_import_bad_factories_are_exit_2(runner, nets, spec, needle):
    r = runner.invoke(app, ["import", spec, "--input-shape", "4", "-o", "x.safetensors"])
    assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (nets / "x.safetensors").exists()


def test_cli_import_bad_input_shape_is_exit_2(runner, nets):
    r = runner.invoke(app, ["import", "h13nets:make", "--input-shape", "2,five", "-o", "x.safetensors"])
    assert r.exit_code == 2 and "--input-shape" in r.stderr


def test_cli_verify_module_refuses_tensors_that_do_not_load(runner, nets):
    out = nets / "net.safetensors"
    assert runner.invoke(app, ["import", "h13nets:make", "--input-shape", "2,5,5", "-o", str(out)]).exit_code == 0
    (nets / "h13other.py").write_text("from torch import nn\n\ndef make():\n    return nn.Linear(2, 2)\n")
    r = runner.invoke(app, ["verify", "--module", "h13other:make", str(out)])
    assert r.exit_code == 2 and "do not load into h13other:make" in r.stderr


def test_cli_import_that_differs_from_the_module_is_exit_1_and_writes_nothing(runner, nets, monkeypatch):
    from n2nsurgery import importer

    monkeypatch.setitem(importer.FUNCTIONS, torch.relu, ("sigmoid", importer._unary))  # a wrong mapping
    out, arch = nets / "net.safetensors", nets / "net.yaml"
    r = runner.invoke(app, ["import", "h13nets:make", "--input-shape", "2,5,5", "-o", str(out), "--arch-out", str(arch)])
    assert r.exit_code == 1 and "differs from Net" in r.stderr, r.output
    assert not out.exists() and not arch.exists()


def test_cli_verify_module_takes_one_checkpoint(runner, nets):
    out = nets / "net.safetensors"
    assert runner.invoke(app, ["import", "h13nets:make", "--input-shape", "2,5,5", "-o", str(out)]).exit_code == 0
    r = runner.invoke(app, ["verify", "--module", "h13nets:make", str(out), str(out)])
    assert r.exit_code == 2 and "drop B" in r.stderr


class GroupNormMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.gn(self.conv(x)).mean((2, 3)))


def test_zoo_ops_import_once_registered_and_are_refused_by_name_before():
    """groupnorm and mean come with the zoo ops: exact once they are in the registry, refused by
    name until then (whichever this tree has)."""
    from n2nsurgery.ops import REGISTRY

    teacher, example = _randomize(GroupNormMean()), torch.randn(2, 2, 4, 4)
    missing = [op for op in ("groupnorm", "mean") if op not in REGISTRY]
    if missing:
        with pytest.raises(N2NError, match=f"the op set lacks '{missing[0]}'"):
            from_module(teacher, example)
    else:
        assert compare_with_module(teacher, from_module(teacher, example)).passed


# ------------------------------------------------- what the model zoo's forwards spell out


class LayerScaled(nn.Module):
    """ConvNeXt's spellings: a channels-first layer norm as permute + F.layer_norm + permute,
    and a bare parameter multiplied in (``self.gamma * x``), neither one a module call."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm_weight = nn.Parameter(torch.ones(width))
        self.norm_bias = nn.Parameter(torch.zeros(width))
        self.gamma = nn.Parameter(torch.full((width, 1, 1), 0.5))
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, (y.shape[-1],), self.norm_weight, self.norm_bias, 1e-6).permute(0, 3, 1, 2)
        return self.head(self.gamma * y)


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle: sizes read off the tensor, a view into (groups, C/groups),
    a transpose, and a view back; then a chunk into two halves, swapped by a one-input-each cat."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        left, right = x.chunk(2, dim=1)
        return self.head(torch.cat([torch.cat([right]), left], 1))


class CeilPool(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.fc = nn.Linear(width * 5 * 5, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def test_a_bare_layer_scale_and_a_functional_layer_norm_import_and_widen():
    teacher, example = _randomize(LayerScaled()), torch.randn(2, 3, 5, 5)
    model = from_module(teacher, example)
    ops = {n.name: n.op for n in model.arch.nodes}
    assert ops["gamma"] == "layer_scale" and "layernorm" in ops.values()
    assert set(model.tensors.keys()) == set(teacher.state_dict())
    student, _ = widen(model, "conv", 8)  # a uniform 2-fold tile: the layer norm's statistics stay
    grown = _load_student(LayerScaled, student, width=8)
    assert _judge(teacher, grown, example) < 1e-5


def test_a_channel_shuffle_imports_exactly_and_refuses_to_widen_through_the_shuffle():
    teacher, example = _randomize(Shuffle()), torch.randn(2, 3, 4, 4)
    model = from_module(teacher, example)
    assert [n.op for n in model.arch.nodes].count("reshape") == 2
    assert compare_with_module(teacher, model).passed
    with pytest.raises(N2NError, match="a channel shuffle interleaves groups"):
        widen(model, "conv", 12)


def test_an_average_pool_that_rounds_up_and_skips_padding_imports_and_widens():
    teacher, example = _randomize(CeilPool()), torch.randn(2, 3, 8, 8)
    model = from_module(teacher, example)
    attrs = model.arch.node("pool").resolved_attrs()
    assert attrs["ceil_mode"] is True and attrs["count_include_pad"] is False
    assert model.shapes["pool"] == (4, 5, 5)  # rounding down would give 4x4
    student, _ = widen(model, "conv", 6)
    assert _judge(teacher, _load_student(CeilPool, student, width=6), example) < 1e-5


@pytest.mark.parametrize(
    "forward, needle",
    [
        (lambda self, x: self.fc(x).view(x.size(0) * 2, -1), "arithmetic on the batch size"),
        (lambda self, x: self.fc(x) + self.offset, "'offset' is a tensor the forward reads directly"),
        (lambda self, x: self.fc(x) * self.constant, "not in the module's state_dict"),
    ],
    ids=["batch-arithmetic", "parameter-added", "constant-tensor"],
)
def test_what_the_zoo_spellings_cannot_follow_is_refused_by_name(forward, needle):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.offset = nn.Parameter(torch.zeros(4))
            self.register_buffer("constant", torch.ones(4), persistent=False)

    Odd.forward = forward
    with pytest.raises(N2NError, match=needle):
        from_module(Odd(), torch.randn(2, 4))
