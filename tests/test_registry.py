"""The op registry owns what ops know (issue 13): a new op is one definition, nothing else changes.

* an op registered here, in the test, is widened and deepened through with no other change;
* the planner collects each member's allowed fill modes first and draws one map last: a made-up
  op that allows only ``tile`` (or only ``zero``) is planned for, or refused by name;
* no module outside ``n2nsurgery/ops`` names an op, and the package imports without cycles.
"""

import ast
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from n2nsurgery.arch import Architecture, InputSpec, Node
from n2nsurgery.deepen import deepen
from n2nsurgery.errors import N2NError
from n2nsurgery.inspect import describe
from n2nsurgery.model import Model, TensorStore
from n2nsurgery.ops import register, unregister
from n2nsurgery.ops.base import Activation, Interval, OpDef, widen_passthrough
from n2nsurgery.ops.units import Constraint, PlanError, UnitSpace, choose_fill
from n2nsurgery.verify import verify
from n2nsurgery.widen import plan_group, widen

SRC = os.path.join(os.path.dirname(__file__), "..", "src", "n2nsurgery")


def _same(in_shapes, p, a):
    return tuple(in_shapes[0])


@pytest.fixture
def op_named():
    """Register throwaway ops for one test; unregister them after, whatever happens."""
    names = []

    def add(op: OpDef) -> OpDef:
        register(op)
        names.append(op.name)
        return op

    yield add
    for name in names:
        unregister(name)


def _mlp(middle: list, width: int = 5) -> Model:
    """x[6] -> fc1 (width) -> *middle ops -> fc2 (3), output fc2."""
    gen = torch.Generator().manual_seed(0)
    nodes = [Node("fc1", "linear", ["x"])]
    for i, op in enumerate(middle):
        nodes.append(Node(f"m{i}", op, [nodes[-1].name]))
    nodes.append(Node("fc2", "linear", [nodes[-1].name]))
    tensors = {
        "fc1.weight": torch.randn(width, 6, generator=gen),
        "fc1.bias": torch.randn(width, generator=gen),
        "fc2.weight": torch.randn(3, width, generator=gen),
        "fc2.bias": torch.randn(3, generator=gen),
    }
    for i, op in enumerate(middle):
        if op == "batchnorm":
            tensors[f"m{i}.running_mean"] = torch.randn(width, generator=gen)
            tensors[f"m{i}.running_var"] = torch.rand(width, generator=gen) + 0.5
    arch = Architecture(inputs={"x": InputSpec("x", (6,))}, nodes=nodes, outputs=["fc2"])
    return Model(arch, TensorStore.from_tensors(tensors)).check()


def _clamp0(op_named):
    """A new activation, max(v, 0) written another way: identity on non-negative values."""
    return op_named(
        OpDef(
            name="clamp0",
            forward=lambda xs, p, a: torch.clamp(xs[0], min=0.0),
            infer_shape=_same,
            value_range=lambda r, a: Interval(max(r[0].lo, 0.0), max(r[0].hi, 0.0)),
            widen=widen_passthrough,
            activation=Activation(identity_on=lambda attrs, r: r.lo >= 0, where="v ≥ 0"),
        )
    )


def test_a_new_op_is_widened_and_deepened_through_with_nothing_else_changed(op_named):
    _clamp0(op_named)
    teacher = _mlp(["clamp0"])
    student, report = widen(teacher, "fc1", 9, split="random", seed=3)
    assert report.members == ["fc1", "m0", "fc2"]
    assert verify(teacher, student).passed
    deeper, rep = deepen(student, "m0")  # the default activation: the same one, clamp0
    assert [n["op"] for n in rep.to_dict()["nodes"]] == ["linear", "clamp0"]
    assert verify(teacher, deeper).passed
    info = {n["name"]: n for n in describe(teacher)["nodes"]}
    assert info["m0"]["deepen_after"] == "identity+clamp0"
    assert info["fc1"]["widen"] == {"group": ["fc1"]}


def test_a_new_activation_is_refused_by_its_own_rule(op_named):
    _clamp0(op_named)
    with pytest.raises(N2NError, match=r"clamp0\(v\) = v only for v ≥ 0"):
        deepen(_mlp(["clamp0"]), "fc1", activation="clamp0")


def test_unregistering_restores_the_registry(op_named):
    _clamp0(op_named)
    from n2nsurgery.deepen import activations

    assert "clamp0" in activations()
    unregister("clamp0")
    assert "clamp0" not in activations()


# ------------------------------------------------------------------------- the planner


def _only(op_named, name: str, modes: set):
    return op_named(
        OpDef(name=name, forward=lambda xs, p, a: xs[0], infer_shape=_same, widen=widen_passthrough, fill_modes=frozenset(modes))
    )


def test_a_tile_only_member_gets_a_tile_map(op_named):
    _only(op_named, "tileonly", {"tile"})
    teacher = _mlp(["tileonly"])
    ctx = plan_group(teacher, "fc1", 10)
    assert ctx.fill == "tile"
    assert ctx.map_of("fc1")[1].src.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    student, _ = widen(teacher, "fc1", 15)
    assert verify(teacher, student).passed


def test_a_tile_only_member_refuses_a_width_that_is_not_a_multiple_and_is_named(op_named):
    _only(op_named, "tileonly", {"tile"})
    with pytest.raises(N2NError, match=r"at node 'm0', it allows only the fill modes tile"):
        widen(_mlp(["tileonly"]), "fc1", 7)


def test_a_zero_only_member_gets_zero_new_units(op_named):
    _only(op_named, "zeroonly", {"zero"})
    teacher = _mlp(["relu", "zeroonly"])  # relu keeps a zero unit zero
    student, _ = widen(teacher, "fc1", 8)
    w = student.tensors.get("fc1.weight")
    assert torch.equal(w[:5], teacher.tensors.get("fc1.weight")) and not w[5:].any()
    assert not student.tensors.get("fc1.bias")[5:].any()
    assert torch.equal(student.tensors.get("fc2.weight")[:, :5], teacher.tensors.get("fc2.weight"))
    assert verify(teacher, student).passed


def test_a_member_that_forbids_every_mode_is_named(op_named):
    _only(op_named, "zeroonly", {"zero"})
    # batchnorm allows copy and tile only (bn(0) != 0): nothing is left for zeroonly.
    with pytest.raises(N2NError, match=r"at node 'm1', it allows only the fill modes zero"):
        widen(_mlp(["batchnorm", "zeroonly"]), "fc1", 8)


def test_sigmoid_keeps_zero_fill_out():
    space = UnitSpace(rows=4)
    space.add(Constraint("s", frozenset({"copy", "tile"})))
    assert choose_fill(space, 6) == "copy"
    with pytest.raises(PlanError) as e:
        choose_fill(space, 6, wanted="zero")
    assert e.value.node == "s"


def test_blocks_draw_whole_units():
    space = UnitSpace(rows=6)
    space.add(Constraint("heads", None, block=3))
    assert space.count == 2
    with pytest.raises(PlanError, match="multiple of 3"):
        choose_fill(space, 7)
    from n2nsurgery.ops.units import UnitMap

    m = UnitMap.draw(6, 12, "equal", torch.Generator().manual_seed(0), "tile", block=3)
    assert m.src.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    assert math.isclose(float(m.share.sum()), 6.0)


def test_average_fill_rows_are_the_mean_of_old_rows(op_named):
    _only(op_named, "avgonly", {"average"})
    teacher = _mlp(["avgonly"])
    student, _ = widen(teacher, "fc1", 7)
    w, w0 = student.tensors.get("fc1.weight"), teacher.tensors.get("fc1.weight")
    assert torch.allclose(w[5], w0.mean(0)) and torch.allclose(w[6], w0.mean(0))
    assert verify(teacher, student).passed  # fc2's new columns are 0: the function is kept


# ----------------------------------------------------------------- no op names outside ops/


def _modules(under=SRC):
    for root, _, files in os.walk(under):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(root, f)


def _outside_ops():
    ops_dir = os.path.join(SRC, "ops")
    return [p for p in _modules() if not os.path.abspath(p).startswith(os.path.abspath(ops_dir))]


def _is_op_attr(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "op"


def _str_consts(node) -> list:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def test_no_module_outside_ops_compares_an_op_with_a_name():
    from n2nsurgery.ops import REGISTRY

    found = []
    for path in _outside_ops():
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left] + list(node.comparators)
                if any(_is_op_attr(s) for s in sides) and any(_str_consts(s) for s in sides):
                    found.append(f"{path}:{node.lineno} compares .op with a name")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Node":
                for kw in node.keywords:
                    if kw.arg == "op" and _str_consts(kw.value):
                        found.append(f"{path}:{node.lineno} builds a node of a named op")
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)):
                names = _str_consts(node.value)
                if len(names) >= 2 and all(n in REGISTRY for n in names):
                    found.append(f"{path}:{node.lineno} lists ops by name")
    assert not found, "\n".join(found)


def test_op_modules_import_nothing_above_ops():
    """ops/ is below widen.py, deepen.py and the rest: it never imports them (not even inside a
    function, which is how an import cycle hides)."""
    bad = []
    for path in _modules(os.path.join(SRC, "ops")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and (node.level >= 2 or (node.module or "").startswith("n2nsurgery") and not (node.module or "").startswith("n2nsurgery.ops")):
                bad.append(f"{path}:{node.lineno} from {'.' * node.level}{node.module} import ...")
    assert not bad, "\n".join(bad)


def test_no_function_imports_widen_or_deepen_to_dodge_a_cycle():
    bad = []
    for path in _modules():
        for fn in ast.walk(ast.parse(open(path).read())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] in ("widen", "units") and "ops" in path.split(os.sep)[-2:-1]:
                        bad.append(f"{path}:{node.lineno}")
    assert not bad, "\n".join(bad)


def test_every_module_imports_first_in_a_fresh_package():
    """Each module of the package imported first (the package's modules dropped from
    sys.modules before each), in one fresh interpreter: a module-level cycle fails here."""
    script = r"""
import importlib, pkgutil, sys
import torch  # noqa: F401  (kept loaded: only our package is re-imported)
import n2nsurgery
names = ["n2nsurgery"] + [m.name for m in pkgutil.walk_packages(n2nsurgery.__path__, "n2nsurgery.")]
failed = []
for name in names:
    for k in [k for k in sys.modules if k == "n2nsurgery" or k.startswith("n2nsurgery.")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", "import n2nsurgery.ops.merge"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


CONTEXT_API = {"shape", "attrs", "map_of", "assign", "remap", "set_attr", "constrain", "defer", "refuse", "head_plan", "readers", "has_param", "param_shape", "scale"}


def test_op_rules_use_only_the_context_api():
    """Rules call the documented WidenContext methods; they never reach into its internals."""
    used = set()
    for path in _modules(os.path.join(SRC, "ops")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ctx":
                used.add(node.attr)
    assert used <= CONTEXT_API, used - CONTEXT_API


def test_a_remap_can_scale_old_units_and_set_new_ones():
    """More than gathers: old entries scaled (a norm's γ × √(n/q)), new entries a fixed value."""
    from n2nsurgery.ops.units import UnitMap
    from n2nsurgery.remap import Remap, _apply

    m = UnitMap.draw(3, 5, "equal", torch.Generator().manual_seed(0), "zero")
    out = _apply(torch.tensor([1.0, 2.0, 3.0]), {0: Remap(m, "copy", "n", scale_old=0.5, new_value=7.0)}, 0.0, 0, "k")
    assert out.tolist() == [0.5, 1.0, 1.5, 7.0, 7.0]
    rows = _apply(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), {0: Remap(m, "rows", "n")}, 0.0, 0, "k")
    assert rows.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]
