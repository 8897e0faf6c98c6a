"""torchvision's model zoo, imported and grown: the library's module is the judge.

For each model (built from torchvision's definition with random weights and non-default norm
statistics; see tests/zoo_models.py): the import computes what the module computes; every layer
`n2n inspect` marks widenable is widened, and the student, put back into torchvision's own
module at the new widths with ``load_state_dict(strict=True)``, computes the teacher's function;
every node inspect marks deepenable is deepened, and the student (a layer torchvision's class
has no place for, so run by n2n) computes the module-built teacher's function. The default run
takes a sample of layers per model; ``-m slow`` takes all of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from n2nsurgery import N2NError, from_module
from n2nsurgery.deepen import deepen
from n2nsurgery.executor import run
from n2nsurgery.inspect import describe
from n2nsurgery.widen import widen

from conftest import max_abs_diff
from zoo_models import ZOO, at_widths, build

# |Δ| relative to the teacher's largest output. float32 through 20-60 layers rounds to about
# 1e-6 to 1e-5 of the output (checked per model); a wrong consumer moves it 10 times RTOL or more.
RTOL = 5e-5
PROBES = 4


def _probes(side: int) -> torch.Tensor:
    return torch.randn(PROBES, 3, side, side, generator=torch.Generator().manual_seed(7))


def _relative(want: torch.Tensor, got: torch.Tensor) -> float:
    """max |Δ| (shapes checked) relative to the teacher's largest output."""
    return max_abs_diff(got, want) / float(want.double().abs().max())


@dataclass
class Imported:
    name: str
    teacher: torch.nn.Module
    model: object  # the imported n2n Model
    x: torch.Tensor  # probes
    want: torch.Tensor  # the teacher module's outputs on them
    info: dict  # what `n2n inspect --json` says of the model


# VGG's classifier (120M weights) takes seconds to build: every VGG test is in the slow run.
_MODELS = [pytest.param(n, marks=pytest.mark.slow) if n.startswith("vgg") else n for n in sorted(ZOO)]


@pytest.fixture(scope="module", params=_MODELS)
def zoo(request) -> Imported:
    """One model, built and imported once; pytest groups the tests by it, so one is held at a
    time (VGG's classifier alone is 500 MB)."""
    name = request.param
    side = ZOO[name].side
    teacher = build(name)
    model = from_module(teacher, torch.randn(1, 3, side, side), probes=2)
    x = _probes(side)
    with torch.no_grad():
        want = teacher(x)
    # Two preconditions of a judge with teeth: the output depends on the input (else any
    # student passes), and float32 rounding stays well under RTOL (else nothing could).
    spread = float((want - want.mean(0)).abs().max() / want.abs().max())
    assert spread > 0.02, f"{name}: the teacher's outputs barely differ between inputs ({spread:.2g})"
    with torch.no_grad():
        exact = copy.deepcopy(teacher).double()(x.double())
    assert _relative(exact, want) < RTOL / 4, f"{name}: float32 rounding is {_relative(exact, want):.2g} of the output"
    return Imported(name, teacher, model, x, want, describe(model))


def _widenable(info) -> list:
    return [(n["name"], n["widen"].get("multiple_of", 1)) for n in info["nodes"] if n["widen"] and "group" in n["widen"]]


def _deepenable(info) -> list:
    return [(n["name"], n["deepen_after"]) for n in info["nodes"] if n["deepen_after"] != "no"]


def _sample(items: list, must: tuple, k: int = 3) -> list:
    """The named layers plus k spread evenly over the list (first, middle, last, ...)."""
    picked = [it for it in items if it[0] in must]
    assert len(picked) == len(must), f"sample names layers the model lacks: {set(must) - {it[0] for it in picked}}"
    step = max(1, (len(items) - 1) / max(1, k - 1))
    for i in range(k):
        it = items[min(len(items) - 1, round(i * step))]
        if it not in picked:
            picked.append(it)
    return picked


def _wider(model, layer: str, multiple: int) -> int:
    """About half as many units again, rounded up to the multiple inspect asks for."""
    node = model.arch.node(layer)
    n = model.shapes[layer][0] if node.op.startswith("conv") else model.shapes[layer][-1]
    width = n + max(1, n // 2)
    return -(-width // multiple) * multiple


# ---------------------------------------------------------------------------------- import


def test_import_computes_what_the_module_computes(zoo):
    assert _relative(zoo.want, run(zoo.model, {"x": zoo.x})[0]) <= RTOL
    # Node names are module paths: the keys are exactly the module's own state_dict keys.
    assert set(zoo.model.tensors.keys()) == set(zoo.teacher.state_dict())


def test_inspect_refuses_only_what_cannot_be_exact(zoo):
    """Refusals are not passes: each must be one the model is known to need (its classifier, a
    channel shuffle), and most layers must widen."""
    name, info = zoo.name, zoo.info
    refused = {n["name"]: n["widen"]["refused"] for n in info["nodes"] if n["widen"] and "refused" in n["widen"]}
    unexpected = {k: v for k, v in refused.items() if not any(r in v for r in ZOO[name].refusals)}
    assert not unexpected, unexpected
    layers = len(refused) + len(_widenable(info))
    floor = 0.6 if name.startswith("shufflenet") else 0.9
    assert len(_widenable(info)) >= floor * layers, f"{len(_widenable(info))}/{layers} widenable"
    assert len(_deepenable(info)) == len(info["nodes"])  # a layer fits after every value here


# ---------------------------------------------------------------------------------- widen


def _check_widen(zoo: Imported, layers: list) -> None:
    teacher, model, x, want, name = zoo.teacher, zoo.model, zoo.x, zoo.want, zoo.name
    worst = {}
    for layer, multiple in layers:
        student, _ = widen(model, layer, _wider(model, layer, multiple), seed=1)
        module = at_widths(teacher, student)  # strict: every key, every shape
        with torch.no_grad():
            worst[layer] = _relative(want, module(x))
    bad = {k: v for k, v in worst.items() if v > RTOL}
    assert not bad, f"inexact in torchvision's module: {bad}"
    print(f"{name}: {len(worst)} layers widened, worst relative |Δ| {max(worst.values()):.2g}")


def test_widen_a_sample_of_layers_loads_back_into_torchvision(zoo):
    _check_widen(zoo, _sample(_widenable(zoo.info), ZOO[zoo.name].must))


@pytest.mark.slow
def test_widen_every_widenable_layer_loads_back_into_torchvision(zoo):
    _check_widen(zoo, _widenable(zoo.info))


# ---------------------------------------------------------------------------------- deepen


def _check_deepen(zoo: Imported, nodes: list) -> None:
    model, x, want, name = zoo.model, zoo.x, zoo.want, zoo.name
    worst = {}
    for node, kind in nodes:
        student, _ = deepen(model, node, op="residual" if kind == "residual" else "auto", seed=1)
        worst[node] = _relative(want, run(student, {"x": x})[0])
    bad = {k: v for k, v in worst.items() if v > RTOL}
    assert not bad, f"inexact against the torchvision teacher: {bad}"
    print(f"{name}: {len(worst)} nodes deepened, worst relative |Δ| {max(worst.values()):.2g}")


def test_deepen_a_sample_of_nodes_against_the_torchvision_teacher(zoo):
    _check_deepen(zoo, _sample(_deepenable(zoo.info), ()))


@pytest.mark.slow
def test_deepen_after_every_deepenable_node_against_the_torchvision_teacher(zoo):
    _check_deepen(zoo, _deepenable(zoo.info))


# ---------------------------------------------------------------------------------- the judge


def test_the_judge_catches_a_consumer_that_is_off(zoo):
    """The widened layer's consumer weights off by 10% must fail in torchvision's module: the
    check can fail. (All of its columns: a single new unit may be one the probes never fire.)"""
    layer = ZOO[zoo.name].must[0]
    student, _ = widen(zoo.model, layer, _wider(zoo.model, layer, dict(_widenable(zoo.info))[layer]), seed=1)
    module = at_widths(zoo.teacher, student)
    teacher_shapes = {k: v.shape for k, v in zoo.teacher.state_dict().items()}
    consumer = next(k for k, v in module.state_dict().items() if v.dim() >= 2 and v.shape[1] != teacher_shapes[k][1])
    weight = module.get_parameter(consumer)
    with torch.no_grad():
        weight.data = weight.data * 1.1  # a new tensor: the student's own is shared with the model
        assert _relative(zoo.want, module(zoo.x)) > 10 * RTOL, consumer


def test_channel_shuffle_refusal_says_why():
    """ShuffleNet's shuffle splits the channel axis into (groups, C/groups) and transposes."""
    from zoo_models import build as build_model

    model = from_module(build_model("shufflenet_v2_x0_5"), torch.randn(1, 3, 32, 32), probes=2)
    with pytest.raises(N2NError, match="a channel shuffle interleaves groups"):
        widen(model, "stage2.0.branch2.5", 48)


@pytest.mark.slow
def test_googlenet_imports_at_224_where_its_pools_round_up():
    """GoogLeNet's max pools use ceil_mode=True; at 224x224 the rounding up changes their sizes
    (112 -> 56 -> 28 -> 14 -> 7), which the import must reproduce exactly."""
    teacher = build("googlenet")
    model = from_module(teacher, torch.randn(1, 3, 224, 224), probes=2)
    pools = [model.arch.node(f"maxpool{i}") for i in (1, 2, 3, 4)]  # the stride-2 ones
    assert all(n.resolved_attrs()["ceil_mode"] for n in pools)
    assert [model.shapes[n.name][1] for n in pools] == [56, 28, 14, 7]  # floor: 55, 27, 13, 6
