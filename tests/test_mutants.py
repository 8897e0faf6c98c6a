"""The suite catches the bugs it exists to catch: under each mutant, a small subset of it fails.

Each mutant (tests/mutants.py) plants one known Net2Net bug into n2nsurgery. For each, pytest
runs in a subprocess with ``N2N_MUTANT=<name>`` and the plugin loaded, on a few test files or
ids chosen to cover that bug, and must FAIL: exit 1 ("tests failed"), not 0, and not a usage,
collection or no-tests error (which would mean the mutant or the subset went stale). One
control run without a mutant, on every subset together, must pass, so a failure is the mutant's
doing and not a broken subset.

Slow (a pytest process per mutant): excluded by ``-m "not slow"``, run by the full suite.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

# The CLI property: its acceptance floors make "refuse everything" a failure, and it is several
# times cheaper than the API one (which has the same floors) on a loaded machine.
PROPERTY = "tests/test_property_graphs.py::test_cli_requests_preserve_the_function_or_exit_2"

# mutant -> the tests that must notice it.
SUBSETS = {
    "widen-refuses-everything": [PROPERTY],
    "deepen-refuses-everything": [PROPERTY],
    "consumer-columns-unscaled": ["tests/test_widen.py::test_mlp"],
    "batchnorm-stats-last-replica-only": ["tests/test_widen.py::test_conv_batchnorm_and_nonsquare_flatten"],
    "identity-conv-off-centre": ["tests/test_deepen.py::test_conv2d_identity_kernel_sizes"],
    "verify-signed-sums": ["tests/test_verify_cancellation.py"],
}

TIMEOUT_S = 300  # per run; each takes seconds, so this only stops a hang


def run_pytest(targets: list, mutant: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("N2N_MUTANT", None)
    if mutant:
        env["N2N_MUTANT"] = mutant
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "mutants", *targets]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _tail(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr)[-3000:]


@pytest.mark.slow
def test_every_subset_passes_without_a_mutant():
    targets = sorted({t for subset in SUBSETS.values() for t in subset})
    result = run_pytest(targets, None)
    assert result.returncode == 0, f"the control run failed (exit {result.returncode}):\n{_tail(result)}"


@pytest.mark.slow
@pytest.mark.parametrize("mutant", sorted(SUBSETS))
def test_mutant_makes_a_test_fail(mutant):
    result = run_pytest(SUBSETS[mutant], mutant)
    assert result.returncode != 0, f"no test noticed mutant {mutant!r}:\n{_tail(result)}"
    assert result.returncode == 1, (
        f"mutant {mutant!r}: exit {result.returncode} is not 'tests failed' (4: usage, e.g. a stale mutant; "
        f"5: no tests collected; 2: a collection error):\n{_tail(result)}"
    )


def test_every_mutant_has_a_subset():
    """A mutant added to the plugin without tests to catch it would never be checked."""
    import mutants

    assert set(mutants.MUTANTS) == set(SUBSETS)
