"""n2nsurgery: grow trained networks wider or deeper without changing what they compute.

The Python API mirrors the CLI::

    import n2nsurgery as n2n

    teacher = n2n.load_model("recipes/cnn.safetensors", "recipes/cnn.yaml")
    result = n2n.verify(teacher, teacher)          # same function: result.passed is True
    n2n.save_model(teacher, "copy.safetensors")    # carries its architecture from now on
"""

__version__ = "0.1.0"

import importlib
import sys
import types

from .errors import N2NError, VerificationFailed

# The API's names, each with the module that defines it. They are imported on first use
# (PEP 562), not here: importing torch takes about a second, and `n2n --help`, `n2n --version`
# and usage errors import this package without needing torch at all.
_LAZY = {
    "CommitResult": "commit",
    "commit": "commit",
    "Architecture": "arch",
    "load_architecture": "arch",
    "parse_architecture": "arch",
    "Model": "model",
    "load_model": "model",
    "model_from_state_dict": "model",
    "save_model": "model",
    "VerifyResult": "verify",
    "verify": "verify",
    "from_module": "importer",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """This package, keeping ``n2nsurgery.verify`` the function as it always was.

    Importing a submodule sets it as an attribute of its package, so the first
    ``import n2nsurgery.verify`` (by the CLI, or by :func:`verify` itself) would replace the
    function with the module of the same name. Eager imports rebound the function afterwards;
    here the module is simply not bound (it stays in ``sys.modules``).
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "Architecture",
    "CommitResult",
    "commit",
    "from_module",
    "Model",
    "N2NError",
    "VerificationFailed",
    "VerifyResult",
    "load_architecture",
    "load_model",
    "model_from_state_dict",
    "parse_architecture",
    "save_model",
    "verify",
]
