"""Elementwise activations and dropout: one input, same shape out, no parameters.

Each declares the range of values it can produce, which is what Net2DeeperNet needs to know:
an identity layer followed by φ is exact only where φ(v) = v for every value that reaches it.
"""

import math

import torch
import torch.nn.functional as F

from .base import Attr, Interval, OpDef, choice_attr, float_attr, register, widen_passthrough

# min over v of gelu(v) and silu(v): both dip slightly below zero.
_GELU_MIN = -0.1700
_SILU_MIN = -0.2785


def _same_shape(in_shapes, p, a):
    return tuple(in_shapes[0])


def _clamp_range(lo: float, hi: float):
    def rng(ranges, a):
        r = ranges[0]
        return Interval(min(max(r.lo, lo), hi), max(min(r.hi, hi), lo))

    return rng


def _leaky_range(ranges, a):
    r, s = ranges[0], a["negative_slope"]
    f = lambda v: v if v >= 0 else v * s  # noqa: E731 - monotone for s >= 0
    if s >= 0:
        return Interval(f(r.lo), f(r.hi))
    return Interval(-math.inf, math.inf)


def _monotone_range(fn, floor: float):
    def rng(ranges, a):
        r = ranges[0]
        lo = floor if r.lo < 0 else float(fn(torch.tensor(r.lo, dtype=torch.float64)))
        hi = math.inf if r.hi == math.inf else float(fn(torch.tensor(r.hi, dtype=torch.float64)))
        if r.lo == -math.inf:
            lo = floor
        return Interval(lo, max(hi, lo))

    return rng


def _elementwise(name, forward, value_range, attrs=None, doc=""):
    return register(
        OpDef(
            name=name,
            forward=forward,
            infer_shape=_same_shape,
            attrs=attrs or {},
            value_range=value_range,
            widen=widen_passthrough,  # elementwise: replicas stay replicas
            doc=doc,
        )
    )


RELU = _elementwise("relu", lambda xs, p, a: F.relu(xs[0]), _clamp_range(0.0, math.inf), doc="max(x, 0)")
RELU6 = _elementwise("relu6", lambda xs, p, a: F.relu6(xs[0]), _clamp_range(0.0, 6.0), doc="min(max(x, 0), 6)")
SIGMOID = _elementwise("sigmoid", lambda xs, p, a: torch.sigmoid(xs[0]), _clamp_range(0.0, 1.0))
TANH = _elementwise("tanh", lambda xs, p, a: torch.tanh(xs[0]), _clamp_range(-1.0, 1.0))
SILU = _elementwise("silu", lambda xs, p, a: F.silu(xs[0]), _monotone_range(F.silu, _SILU_MIN))
IDENTITY = _elementwise("identity", lambda xs, p, a: xs[0], lambda r, a: r[0])
LEAKY_RELU = _elementwise(
    "leaky_relu",
    lambda xs, p, a: F.leaky_relu(xs[0], a["negative_slope"]),
    _leaky_range,
    attrs={"negative_slope": Attr(float_attr(), 0.01)},
)
GELU = _elementwise(
    "gelu",
    lambda xs, p, a: F.gelu(xs[0], approximate=a["approximate"]),
    _monotone_range(F.gelu, _GELU_MIN),
    attrs={"approximate": Attr(choice_attr("none", "tanh"), "none")},
)
DROPOUT = _elementwise(
    "dropout",
    lambda xs, p, a: xs[0],  # the identity at inference, which is the only mode we run
    lambda r, a: r[0],
    attrs={"p": Attr(float_attr(0.0, 1.0), 0.5)},
    doc="Identity at inference.",
)

ELEMENTWISE = (RELU, RELU6, SIGMOID, TANH, SILU, IDENTITY, LEAKY_RELU, GELU, DROPOUT)
