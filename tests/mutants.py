"""A pytest plugin that breaks n2nsurgery on purpose, to check that the suite notices.

With ``N2N_MUTANT=<name>`` in the environment, the mutant of that name is patched into
n2nsurgery when pytest starts; without it, this plugin does nothing. It is loaded explicitly,
never by default::

    N2N_MUTANT=widen-refuses-everything PYTHONPATH=tests python -m pytest -q -x -p mutants tests/test_property_graphs.py

:mod:`test_mutants` runs a small subset of the suite under each mutant and requires it to FAIL.

Each mutant is one small function below whose docstring says what it breaks. They target the
code as it is today (function names in :mod:`n2nsurgery.widen`, :mod:`n2nsurgery.deepen`,
:mod:`n2nsurgery.verify`); when that code is refactored, retarget the mutant to the new place of
the same behaviour. A mutant that finds nothing to patch stops the run with a usage error
(exit 4), so a stale one cannot pass silently.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Callable

import pytest

ENV = "N2N_MUTANT"
MUTANTS: dict[str, Callable[[], None]] = {}


def mutant(name: str):
    """Register the decorated function as the mutant `name`."""

    def register(fn):
        MUTANTS[name] = fn
        return fn

    return register


def replace_everywhere(module_name: str, attr: str, replacement) -> None:
    """Replace function `attr` of `module_name` in that module AND in every loaded n2nsurgery
    module that imported it by name (``from .widen import widen``), so no caller keeps the
    original."""
    module = importlib.import_module(module_name)
    original = getattr(module, attr, None)
    if original is None:
        raise pytest.UsageError(f"mutant: {module_name}.{attr} no longer exists; retarget the mutant in tests/mutants.py")
    for name, mod in list(sys.modules.items()):
        if name == "n2nsurgery" or name.startswith("n2nsurgery."):
            for key, value in list(vars(mod).items()):
                if value is original:
                    setattr(mod, key, replacement)


def _load_everything() -> None:
    """Import the package and its CLI, so module-level ``from x import y`` copies exist to patch."""
    for name in ("n2nsurgery", "n2nsurgery.widen", "n2nsurgery.deepen", "n2nsurgery.verify", "n2nsurgery.recipe", "n2nsurgery.cli"):
        importlib.import_module(name)


# ------------------------------------------------------------------------------ the mutants


@mutant("widen-refuses-everything")
def _widen_refuses_everything():
    """``widen()`` refuses every request with an ordinary N2NError (exit 2): a tool that never
    does anything wrong because it never does anything."""
    from n2nsurgery.errors import N2NError

    def widen(model, layer, width, **kwargs):
        raise N2NError(f"mutant: refusing to widen {layer!r}")

    replace_everywhere("n2nsurgery.widen", "widen", widen)


@mutant("deepen-refuses-everything")
def _deepen_refuses_everything():
    """``deepen()`` refuses every request with an ordinary N2NError (exit 2)."""
    from n2nsurgery.errors import N2NError

    def deepen(model, after, **kwargs):
        raise N2NError(f"mutant: refusing to deepen after {after!r}")

    replace_everywhere("n2nsurgery.deepen", "deepen", deepen)


@mutant("consumer-columns-unscaled")
def _consumer_columns_unscaled():
    """A consumer's input columns are gathered with the unit map but NOT multiplied by the
    replica's share (1/count): the replicas' outputs are counted twice downstream.
    Target: the "cols" remaps handed to ``n2nsurgery.remap._apply``."""
    import torch

    original = importlib.import_module("n2nsurgery.remap")._apply

    def _apply(tensor, dims, noise, seed, key):
        unscaled = {}
        for dim, r in dims.items():  # each a widen.Remap: (map, kind, node, ...)
            if r.kind == "cols":
                r = dataclasses.replace(r, map=dataclasses.replace(r.map, share=torch.ones_like(r.map.share)))
            unscaled[dim] = r
        return original(tensor, unscaled, noise, seed, key)

    replace_everywhere("n2nsurgery.remap", "_apply", _apply)


@mutant("batchnorm-stats-last-replica-only")
def _batchnorm_stats_last_replica_only():
    """A widened batchnorm's running statistics are copied from the source channel for the LAST
    new channel only; the other new channels keep zeroed memory (the bug of a public port,
    docs/design.md#the-safety-chain). Target: ``n2nsurgery.remap._apply`` on running stats."""
    original = importlib.import_module("n2nsurgery.remap")._apply

    def _apply(tensor, dims, noise, seed, key):
        out = original(tensor, dims, noise, seed, key)
        if key.endswith((".running_mean", ".running_var")) and 0 in dims:
            new = dims[0].map.new.nonzero().flatten()
            out[new[:-1]] = 0
        return out

    replace_everywhere("n2nsurgery.remap", "_apply", _apply)


@mutant("identity-conv-off-centre")
def _identity_conv_off_centre():
    """deepen's identity convolution puts its 1 at index ``k//2 + 1`` (a 1-indexed port) instead
    of the centre ``k//2`` (wrapping to 0 for k = 1, where there is no other place).
    Target: the ``insert.identity`` builder of every conv op in ``n2nsurgery.ops.REGISTRY``
    (``ops/conv.py``)."""
    import torch

    from n2nsurgery.ops import REGISTRY

    def off_centre(nd):
        def identity(width, kernel_size, dtype):
            w = torch.zeros((width, width) + (kernel_size,) * nd, dtype=torch.float32)
            off = ((kernel_size // 2 + 1) % kernel_size,) * nd
            idx = torch.arange(width)
            w[(idx, idx) + off] = 1.0
            return {"weight": w.to(dtype), "bias": torch.zeros(width, dtype=dtype)}

        return identity

    hit = False
    for name, op in list(REGISTRY.items()):
        if op.insert is not None and op.insert.word == "conv":
            nd = len(op.insert.weight_shape(1, 1, 3)) - 2
            REGISTRY[name] = dataclasses.replace(op, insert=dataclasses.replace(op.insert, identity=off_centre(nd)))
            hit = True
    if not hit:
        raise pytest.UsageError("mutant: no conv op with an insert rule; retarget the mutant in tests/mutants.py")


@mutant("verify-signed-sums")
def _verify_signed_sums():
    """Verification measures ``|Σ(y_B − y_A)|`` instead of ``max|y_B − y_A|``, so errors of
    opposite sign cancel. Target: ``n2nsurgery.verify.compare_outputs``."""
    original = importlib.import_module("n2nsurgery.verify").compare_outputs

    def compare_outputs(a, b, ya, yb, atol, rtol):
        checks = original(a, b, ya, yb, atol, rtol)
        for i, (ta, tb) in enumerate(zip(ya, yb)):
            c = checks[i]
            if ta.shape == tb.shape and c.max_abs != float("inf"):
                signed = abs(float((tb.double() - ta.double()).sum()))
                scale = float(ta.double().abs().max()) if ta.numel() else 0.0
                rel = signed / scale if scale else 0.0
                checks[i] = dataclasses.replace(c, max_abs=signed, max_rel=rel, passed=signed <= c.bound)
        return checks

    replace_everywhere("n2nsurgery.verify", "compare_outputs", compare_outputs)


# ------------------------------------------------------------------------------ the hooks


def _no_shrinking() -> None:
    """A failing property test would otherwise spend minutes shrinking an example nobody reads."""
    try:
        import hypothesis_profiles  # noqa: F401  (registers "ci")
        from hypothesis import Phase, settings
    except ImportError:
        return
    settings.register_profile("mutant", settings.get_profile("ci"), phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("mutant")


def pytest_configure(config):
    name = os.environ.get(ENV)
    if not name:
        return
    if name not in MUTANTS:
        raise pytest.UsageError(f"{ENV}={name!r} is not a mutant; known: {', '.join(sorted(MUTANTS))}")
    _load_everything()
    MUTANTS[name]()
    _no_shrinking()


def pytest_report_header(config):
    name = os.environ.get(ENV)
    return f"n2nsurgery mutant: {name}" if name else None
