"""Shared test helpers: where the shipped examples live, a CLI runner, and a max-|Δ| assertion.

Kept small on purpose; test files add their own helpers next to the tests that use them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
EXAMPLE_NAMES = ("mlp", "cnn", "resnet", "inception")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_TORCHVISION_LIBRARY = []  # the Library must outlive the import, or its definitions go away


def load_torchvision() -> bool:
    """Import torchvision if it is installed (False when it is not), even one built for another torch.

    The wheel the index serves beside a CPU torch may be built against another torch: its C++
    extension cannot load, and ``import torchvision`` fails registering the detection operators
    ("operator torchvision::nms does not exist"). The classification models are pure Python;
    defining those two schemas and importing again lets them load (GUIDE §5). transformers
    imports torchvision whenever it is installed, so this runs before any test, not only the
    zoo's. With a matching torchvision the first import succeeds and nothing is defined.
    """
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the half-imported package
        if not _TORCHVISION_LIBRARY:
            lib = torch.library.Library("torchvision", "DEF")
            for schema in _TORCHVISION_SCHEMAS:
                lib.define(schema)
            _TORCHVISION_LIBRARY.append(lib)
        import torchvision  # noqa: F401
    return True


load_torchvision()

# One intra-op thread for the whole suite (N2N_TEST_THREADS overrides): the tests run many small
# ops, and on a shared 2-core machine two threads spin against the other load: a RegNet forward
# took 2.7 s instead of 7 ms, and the fast path 285 s instead of 117 s.
torch.set_num_threads(int(os.environ.get("N2N_TEST_THREADS", "1")))


def example_paths(name: str) -> tuple[str, str]:
    """(checkpoint, architecture) of a shipped example, as strings for the CLI."""
    return str(RECIPES / f"{name}.safetensors"), str(RECIPES / f"{name}.yaml")


def load_benchmark(filename: str):
    """A script of benchmarks/ as a module (they are scripts, not a package), for tests that run
    a tiny configuration of it."""
    import importlib.util

    name = "n2n_bench_" + filename.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def n2n_exe() -> str:
    """The installed `n2n` console script next to this interpreter (for real subprocesses)."""
    path = os.path.join(os.path.dirname(sys.executable), "n2n")
    if not os.path.exists(path):
        pytest.skip("the n2n console script is not installed next to this Python")
    return path


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, after checking the shapes agree exactly."""
    assert tuple(a.shape) == tuple(b.shape), f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    """Same shape and max |got - want| <= tol (never a signed sum, where errors could cancel)."""
    d = max_abs_diff(got, want)
    assert d <= tol, f"max |Δ| = {d:.3g} > {tol:g}"


@pytest.fixture
def runner() -> CliRunner:
    """Typer's runner; `result.stdout` and `result.stderr` are kept apart."""
    return CliRunner()


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    """A developer's N2N_DEBUG=1 would add tracebacks that the error tests assert are absent."""
    monkeypatch.delenv("N2N_DEBUG", raising=False)


def pytest_terminal_summary(terminalreporter):
    """Print the acceptance rates of the property and fuzz tests (tests/acceptance.py)."""
    from acceptance import RESULTS

    if RESULTS:
        terminalreporter.section("acceptance rates")
        for line in RESULTS:
            terminalreporter.write_line(line)
