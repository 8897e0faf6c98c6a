"""The op registry. Importing this package registers every op; ``get_op(name)`` finds one.

To add an op, write one :class:`~n2nsurgery.ops.base.OpDef` in a module here and import the module
below (or, from outside, call :func:`register`; :func:`unregister` removes it again). Nothing else
in the tool needs to change: widen, deepen and inspect read what they need from the OpDef.
"""

from . import activations, batchnorm, conv, linear, merge, pooling, shape_ops  # noqa: F401  (registers)
from . import attention, chunk, embedding, linear_t, norms  # noqa: F401  (registers the transformer ops)
from . import zoo  # noqa: F401  (registers the model-zoo ops: hardswish, softmax, groupnorm, ...)
from .base import REGISTRY, Interval, OpDef, activation_names, get_op, insertable, register, unregister
from .units import Event, UnitMap

__all__ = ["REGISTRY", "Event", "Interval", "OpDef", "UnitMap", "activation_names", "get_op", "insertable", "register", "unregister"]
