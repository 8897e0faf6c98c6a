"""n2nsurgery: grow trained networks wider or deeper without changing what they compute.

The Python API mirrors the CLI::

    import n2nsurgery as n2n

    teacher = n2n.load_model("recipes/cnn.safetensors", "recipes/cnn.yaml")
    result = n2n.verify(teacher, teacher)          # same function: result.passed is True
    n2n.save_model(teacher, "copy.safetensors")    # carries its architecture from now on
"""

__version__ = "0.1.0"

from .commit import CommitResult, commit  # noqa: E402
from .arch import Architecture, load_architecture, parse_architecture  # noqa: E402
from .errors import N2NError, VerificationFailed  # noqa: E402
from .model import Model, load_model, model_from_state_dict, save_model  # noqa: E402
from .verify import VerifyResult, verify  # noqa: E402

__all__ = [
    "Architecture",
    "CommitResult",
    "commit",
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
