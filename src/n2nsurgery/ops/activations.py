"""Elementwise activations and dropout: one input, same shape out, no parameters.

Each declares the range of values it can produce, which is what Net2DeeperNet needs to know:
an identity layer followed by φ is exact only where φ(v) = v for every value that reaches it.
"""

import math

import torch
import torch.nn.functional as F

from .base import ANY_FILL, COPY_LIKE, Activation, Attr, Interval, OpDef, choice_attr, float_attr, register, widen_passthrough

# φ(0) = 0: a zero-filled unit stays zero through it. Not linear, so averages do not pass.
_ZERO_KEEPING = COPY_LIKE | {"zero"}
# Where φ(v) = v holds nowhere useful: an identity layer followed by φ always changes the function.
_NEVER = Activation(identity_on=lambda attrs, r: False)

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


def _f64(fn, v: float) -> float:
    return float(fn(torch.tensor(v, dtype=torch.float64)))


def _outward(v: float) -> float:
    """A margin for the float32 rounding of the real computation (ranges are computed in float64)."""
    return 1e-6 * max(1.0, abs(v))


def _increasing_range(fn, floor: float, ceiling: float):
    """Monotone increasing φ bounded by [floor, ceiling] (sigmoid, tanh): [φ(lo), φ(hi)], widened
    by a rounding margin but never past φ's own bounds, so 'sigmoid is non-negative' stays provable."""

    def rng(ranges, a):
        r = ranges[0]
        lo = floor if r.lo == -math.inf else max(floor, _f64(fn, r.lo) - _outward(_f64(fn, r.lo)))
        hi = ceiling if r.hi == math.inf else min(ceiling, _f64(fn, r.hi) + _outward(_f64(fn, r.hi)))
        return Interval(lo, hi)

    return rng


def _dip_range(fn):
    """φ that falls to one minimum below zero and rises after it, with φ(-inf) = 0 (silu, gelu):
    the minimum is φ's global one when the interval holds its argmin, else at an end; the
    maximum is at an end."""
    grid = torch.linspace(-6.0, 0.0, 600001, dtype=torch.float64)
    values = fn(grid)
    x_min = float(grid[int(values.argmin())])
    f_min = float(values.min())
    f_min -= _outward(f_min)

    def at(v: float) -> float:
        if v == -math.inf:
            return 0.0
        if v == math.inf:
            return math.inf
        return _f64(fn, v)

    def rng(ranges, a):
        r = ranges[0]
        ends = (at(r.lo), at(r.hi))
        lo = f_min if r.lo <= x_min <= r.hi else min(ends) - _outward(min(ends))
        hi = max(ends)
        return Interval(max(lo, f_min), hi + (_outward(hi) if hi != math.inf else 0.0))

    return rng


def _gelu_range(ranges, a):
    return _GELU_RANGES[a["approximate"]](ranges, a)


_GELU_RANGES = {
    "none": _dip_range(lambda x: F.gelu(x)),
    "tanh": _dip_range(lambda x: F.gelu(x, approximate="tanh")),
}


def _elementwise(name, forward, value_range, attrs=None, doc="", activation=None, fill_modes=_ZERO_KEEPING):
    return register(
        OpDef(
            name=name,
            forward=forward,
            infer_shape=_same_shape,
            attrs=attrs or {},
            value_range=value_range,
            widen=widen_passthrough,  # elementwise: replicas stay replicas
            doc=doc,
            activation=activation,
            fill_modes=fill_modes,
        )
    )


# Registry order is the order deepen lists its --activation choices in.
RELU = _elementwise(
    "relu", lambda xs, p, a: F.relu(xs[0]), _clamp_range(0.0, math.inf), doc="max(x, 0)",
    activation=Activation(identity_on=lambda attrs, r: r.lo >= 0, where="v ≥ 0"),
)
RELU6 = _elementwise(
    "relu6", lambda xs, p, a: F.relu6(xs[0]), _clamp_range(0.0, 6.0), doc="min(max(x, 0), 6)",
    activation=Activation(identity_on=lambda attrs, r: r.lo >= 0 and r.hi <= 6, where="0 ≤ v ≤ 6"),
)
LEAKY_RELU = _elementwise(
    "leaky_relu",
    lambda xs, p, a: F.leaky_relu(xs[0], a["negative_slope"]),
    _leaky_range,
    attrs={"negative_slope": Attr(float_attr(), 0.01)},
    activation=Activation(identity_on=lambda attrs, r: r.lo >= 0 or attrs["negative_slope"] == 1.0, where="v ≥ 0"),
)
SIGMOID = _elementwise(
    "sigmoid", lambda xs, p, a: torch.sigmoid(xs[0]), _increasing_range(torch.sigmoid, 0.0, 1.0),
    activation=_NEVER, fill_modes=COPY_LIKE,  # sigmoid(0) = 1/2: a zero unit would not stay zero
)
TANH = _elementwise("tanh", lambda xs, p, a: torch.tanh(xs[0]), _increasing_range(torch.tanh, -1.0, 1.0), activation=_NEVER)
SILU = _elementwise("silu", lambda xs, p, a: F.silu(xs[0]), _dip_range(F.silu), activation=_NEVER)
IDENTITY = _elementwise("identity", lambda xs, p, a: xs[0], lambda r, a: r[0], fill_modes=ANY_FILL)
GELU = _elementwise(
    "gelu",
    lambda xs, p, a: F.gelu(xs[0], approximate=a["approximate"]),
    _gelu_range,
    attrs={"approximate": Attr(choice_attr("none", "tanh"), "none")},
    activation=_NEVER,
)
DROPOUT = _elementwise(
    "dropout",
    lambda xs, p, a: xs[0],  # the identity at inference, which is the only mode we run
    lambda r, a: r[0],
    attrs={"p": Attr(float_attr(0.0, 1.0), 0.5)},
    doc="Identity at inference.",
    fill_modes=ANY_FILL,
)

ELEMENTWISE = (RELU, RELU6, SIGMOID, TANH, SILU, IDENTITY, LEAKY_RELU, GELU, DROPOUT)
