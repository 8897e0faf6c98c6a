"""Pooling over the spatial axes of [channels, *spatial]: windowed and adaptive, max and average."""

import torch.nn.functional as F

from .base import ANY_FILL, AttrError, COPY_LIKE, Attr, Interval, OpDef, REQUIRED, expect, fmt_shape, ints_attr, per_axis, register, same_range, widen_channels_passthrough
from .conv import conv_out_len

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_AMAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_AAVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _check_rank(x, nd):
    expect(len(x) == nd + 1, f"input must be [channels, {nd} spatial axes], got {fmt_shape(x)}")


def _window_infer(nd):
    def infer(in_shapes, p, a):
        (x,) = in_shapes
        _check_rank(x, nd)
        k = per_axis(a["kernel_size"], nd, "kernel_size")
        s = per_axis(a["stride"] if a["stride"] is not None else a["kernel_size"], nd, "stride")
        pad = per_axis(a["padding"], nd, "padding")
        expect(all(2 * pd <= kk for pd, kk in zip(pad, k)), "padding must be at most half the kernel size")
        ceil = a.get("ceil_mode", False)
        out = tuple(_pool_out_len(n, kk, ss, pd, ceil) for n, kk, ss, pd in zip(x[1:], k, s, pad))
        expect(all(n > 0 for n in out), f"kernel {fmt_shape(k)} does not fit the input {fmt_shape(x)}")
        return (x[0],) + out

    return infer


def _pool_out_len(n: int, k: int, s: int, pad: int, ceil: bool) -> int:
    """PyTorch's pooled length; ceil_mode rounds up, but the last window must start inside the
    input or the left padding (torch drops one that would start in the right padding)."""
    if not ceil:
        return conv_out_len(n, k, s, pad, 1)
    out = -(-(n + 2 * pad - k) // s) + 1
    if (out - 1) * s >= n + pad:
        out -= 1
    return out


def _adaptive_infer(nd):
    def infer(in_shapes, p, a):
        (x,) = in_shapes
        _check_rank(x, nd)
        return (x[0],) + per_axis(a["output_size"], nd, "output_size")

    return infer


def _avg_window_range(ranges, a):
    # Zero padding is averaged in (count_include_pad), so 0 joins the range when there is padding;
    # without it (and in ceil_mode's clipped last window) each output is an average of inputs.
    r = ranges[0]
    pad = a["padding"]
    if a["count_include_pad"] and pad != 0 and pad != (0,) * (len(pad) if isinstance(pad, tuple) else 1):
        return r.union(Interval(0.0, 0.0))
    return r


def _bool_attr(v):
    if not isinstance(v, bool):
        raise AttrError(f"must be true or false, got {v!r}")
    return v


_WINDOW_ATTRS = {
    "kernel_size": Attr(ints_attr(1), REQUIRED),
    "stride": Attr(lambda v: None if v is None else ints_attr(1)(v), None),  # None: = kernel_size
    "padding": Attr(ints_attr(0), 0),
}

for _nd in (1, 2, 3):
    register(
        OpDef(
            name=f"max_pool{_nd}d",
            forward=(lambda fn: lambda xs, p, a: fn(xs[0], a["kernel_size"], a["stride"], a["padding"], ceil_mode=a["ceil_mode"]))(_MAX[_nd]),
            infer_shape=_window_infer(_nd),
            attrs={**_WINDOW_ATTRS, "ceil_mode": Attr(_bool_attr, False)},
            value_range=same_range,
            widen=widen_channels_passthrough,
            fill_modes=COPY_LIKE | {"zero"},  # max of zeros is zero; max of means is not a mean
        )
    )
    register(
        OpDef(
            name=f"avg_pool{_nd}d",
            forward=(lambda fn: lambda xs, p, a: fn(xs[0], a["kernel_size"], a["stride"], a["padding"], ceil_mode=a["ceil_mode"],
                                                    count_include_pad=a["count_include_pad"]))(_AVG[_nd]),
            infer_shape=_window_infer(_nd),
            attrs={**_WINDOW_ATTRS, "ceil_mode": Attr(_bool_attr, False), "count_include_pad": Attr(_bool_attr, True)},
            value_range=_avg_window_range,
            widen=widen_channels_passthrough,
            fill_modes=ANY_FILL,  # an average is linear
        )
    )
    register(
        OpDef(
            name=f"adaptive_max_pool{_nd}d",
            forward=(lambda fn: lambda xs, p, a: fn(xs[0], a["output_size"]))(_AMAX[_nd]),
            infer_shape=_adaptive_infer(_nd),
            attrs={"output_size": Attr(ints_attr(1), REQUIRED)},
            value_range=same_range,
            widen=widen_channels_passthrough,
            fill_modes=COPY_LIKE | {"zero"},
        )
    )
    register(
        OpDef(
            name=f"adaptive_avg_pool{_nd}d",
            forward=(lambda fn: lambda xs, p, a: fn(xs[0], a["output_size"]))(_AAVG[_nd]),
            infer_shape=_adaptive_infer(_nd),
            attrs={"output_size": Attr(ints_attr(1), REQUIRED)},
            value_range=same_range,  # averages of inputs, no padding: stays in the hull
            widen=widen_channels_passthrough,
            fill_modes=ANY_FILL,
        )
    )
