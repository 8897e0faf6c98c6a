"""The op registry. Importing this package registers every op; ``get_op(name)`` finds one.

To add an op, write one :class:`~n2nsurgery.ops.base.OpDef` in a module here and import the module
below. Nothing else in the tool needs to change.
"""

from . import activations, batchnorm, conv, linear, merge, pooling, shape_ops  # noqa: F401  (registers)
from . import attention, chunk, embedding, linear_t, norms  # noqa: F401  (registers the transformer ops)
from .base import REGISTRY, Interval, OpDef, get_op

__all__ = ["REGISTRY", "Interval", "OpDef", "get_op"]
