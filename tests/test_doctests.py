"""Every ``>>>`` example in the package's docstrings runs, and prints what it says.

Each module's examples run in a fresh folder holding a copy of ``recipes/`` (so examples read
``recipes/mlp.safetensors`` and may write files of their own), with the module's globals and
``n2n`` (``import n2nsurgery as n2n``). An example that cannot run does not belong in a
docstring: make it self-contained or write it as a plain code block.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import shutil

import pytest

import n2nsurgery
from conftest import RECIPES

MODULES = sorted(m.name for m in pkgutil.walk_packages(n2nsurgery.__path__, "n2nsurgery."))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    shutil.copytree(RECIPES, tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=FLAGS)
    for test in finder.find(module, name, globs={**vars(module), "n2n": n2nsurgery}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed (output above)"
