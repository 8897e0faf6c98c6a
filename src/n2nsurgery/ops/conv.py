"""conv1d / conv2d / conv3d: weight [out, in/groups, *kernel], bias [out]; channels on axis 0."""

import torch
import torch.nn.functional as F

from .base import ANY_FILL, COPY_LIKE, Attr, Insert, OpDef, Units, Param, expect, fmt_shape, int_attr, int_or_choice_attr, ints_attr, per_axis, register
from .units import UnitMap

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_out_len(n: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """PyTorch's output length of a convolution or pooling window along one axis."""
    return (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _make_infer(nd: int):
    def infer(in_shapes, p, a):
        (x,) = in_shapes
        w = p["weight"]
        expect(len(x) == nd + 1, f"input must be [channels, {nd} spatial axes], got {fmt_shape(x)}")
        expect(len(w) == nd + 2, f"weight must be {nd + 2}-D [out, in/groups, *kernel], got {fmt_shape(w)}")
        groups = a["groups"]
        cin, cout = x[0], w[0]
        expect(cin % groups == 0, f"groups={groups} does not divide the {cin} input channels")
        expect(cout % groups == 0, f"groups={groups} does not divide the {cout} output channels of weight {fmt_shape(w)}")
        expect(
            w[1] * groups == cin,
            f"weight {fmt_shape(w)} expects {w[1] * groups} input channels (groups={groups}) "
            f"but the input has {cin} (input shape {fmt_shape(x)})",
        )
        if p.get("bias") is not None:
            expect(p["bias"] == (cout,), f"bias must be [{cout}], got {fmt_shape(p['bias'])}")
        stride = per_axis(a["stride"], nd, "stride")
        dilation = per_axis(a["dilation"], nd, "dilation")
        kernel = w[2:]
        padding = a["padding"]
        if padding == "same":
            expect(all(s == 1 for s in stride), "padding='same' needs stride 1")
            return (cout,) + tuple(x[1:])
        padding = (0,) * nd if padding == "valid" else per_axis(padding, nd, "padding")
        spatial = tuple(
            conv_out_len(n, k, s, pd, d) for n, k, s, pd, d in zip(x[1:], kernel, stride, padding, dilation)
        )
        expect(
            all(n > 0 for n in spatial),
            f"kernel {fmt_shape(kernel)} does not fit the input {fmt_shape(x)} (output would be {fmt_shape(spatial)})",
        )
        return (cout,) + spatial

    return infer


def _widen(ctx, node, event):
    """Channels (axis 0) are the units. Plain convs produce or consume them; a grouped conv does
    too, growing every group alike (:func:`_widen_grouped`); a depthwise conv
    (groups = input channels) maps channel c only to its own outputs, so its output units follow
    its input units and `groups` grows with the width."""
    if event.axis != 0:
        ctx.refuse(node, f"{node.op} would see its spatial axis {event.axis} grow, which changes what it computes")
    groups = ctx.attrs(node)["groups"]
    cin = ctx.shape(node.inputs[0])[0]
    cout = ctx.shape(node.name)[0]
    if groups == 1:
        if event.kind == "output":
            ctx.remap(node, "weight", 0, event.map, "rows")
            ctx.remap(node, "bias", 0, event.map, "rows")
        else:
            ctx.remap(node, "weight", 1, event.map, "cols")
        return
    if groups != cin:
        _widen_grouped(ctx, node, event, groups)
        return
    mult = cout // cin  # depthwise with channel multiplier: output c*mult + t reads input c
    # Its kernels are per-channel state copied with the map: a zero or averaged channel would
    # not stay zero or the mean after its own kernel and bias.
    ctx.constrain(node, modes=COPY_LIKE, why="a depthwise convolution copies each channel's kernel")
    if event.kind == "output":
        if mult != 1:
            ctx.refuse(node, "a depthwise convolution with a channel multiplier can only be widened from its input side; widen the layer that feeds it")
        # Its input gets the same map; the walk does not echo that back to this rule (the rule
        # that assigned a value is not told about it), so remap the kernels here as well.
        ctx.assign(node.inputs[0], 0, event.map)
    out_map = event.map if mult == 1 else event.map.along((cin, mult), 0)
    ctx.remap(node, "weight", 0, out_map, "copy")
    ctx.remap(node, "bias", 0, out_map, "copy")
    ctx.set_attr(node, "groups", event.map.size)
    ctx.assign(node.name, 0, out_map)


def _is_stand_in(m) -> bool:
    """The collecting walk's stand-in layout (new unit j copies j mod n): it only gathers the
    group's constraints, so a grouped conv takes it without its group structure."""
    return m.fill == "copy" and torch.equal(m.src, torch.arange(m.size) % m.old_size)


def group_map(ctx, node, m, groups: int, what: str):
    """The map of one group of `m`, whose units must grow every group alike, laid out group by
    group (`what` names the member and the side for the refusal: "a grouped convolution (groups=4)
    needs its input channels")."""
    inner = m.per_group(groups)
    if inner is None and _is_stand_in(m):
        inner = _stand_in_group(m, groups)
    if inner is None:
        ctx.refuse(
            node,
            f"{what} to grow every group alike, laid out "
            f"group by group, and the layout reaching it ({m.old_size} -> {m.size} channels) does not; widen a layer "
            "whose channels reach it directly (through batchnorm and activations only)",
        )
    return inner


def _stand_in_group(m, groups: int):
    """A stand-in group map of the right sizes (the collecting walk's memory estimate reads them)."""
    b, per = m.old_size // groups, m.size // groups
    src = torch.arange(per) % max(b, 1)
    counts = torch.bincount(src, minlength=b).to(torch.float64)
    return UnitMap(src, torch.reciprocal(counts[src]), torch.arange(per) >= b, b)


def _widen_grouped(ctx, node, event, groups: int):
    """A grouped convolution (1 < groups < channels): group k's outputs read only group k's
    inputs. Widening keeps `groups` and grows every group alike: new channels copy channels of
    their own group and stay laid out group by group (group k owns [k·N/g, (k+1)·N/g)), so an
    output channel's weight row still reads the inputs of its own group. Output side: rows
    copied with the map; input side: each row's in-group columns follow one group's map."""
    ctx.constrain(node, groups=groups, why=f"a grouped convolution with {groups} groups grows every group alike")
    if event.kind == "output":
        group_map(ctx, node, event.map, groups, f"a grouped convolution (groups={groups}) needs its output channels")
        ctx.remap(node, "weight", 0, event.map, "rows")
        ctx.remap(node, "bias", 0, event.map, "rows")
    else:
        inner = group_map(ctx, node, event.map, groups, f"a grouped convolution (groups={groups}) needs its input channels")
        ctx.remap(node, "weight", 1, inner, "cols")


def _make_forward(nd: int):
    fn = _CONV_FN[nd]

    def forward(xs, p, a):
        return fn(xs[0], p["weight"], p.get("bias"), a["stride"], a["padding"], a["dilation"], a["groups"])

    return forward


def _make_identity(nd: int):
    def identity(width, kernel_size, dtype):
        """A centred delta kernel (index k//2 on every spatial axis) and a zero bias: y = x."""
        w = torch.zeros((width, width) + (kernel_size,) * nd, dtype=torch.float32)
        centre = (kernel_size // 2,) * nd  # 0-indexed centre: k//2, never k//2 + 1 (docs/design.md#bugs-we-test-for)
        idx = torch.arange(width)
        w[(idx, idx) + centre] = 1.0
        return {"weight": w.to(dtype), "bias": torch.zeros(width, dtype=dtype)}

    return identity


def _make_insert(nd: int) -> Insert:
    return Insert(
        word="conv",
        fits=lambda shape: len(shape) == nd + 1,  # [channels, nd spatial axes]
        kernel=True,
        short="conv",
        attrs=lambda k: {"padding": k // 2},  # stride 1, groups 1: the shape is kept
        weight_shape=lambda out, inp, k: (out, inp) + (k,) * nd,
        identity=_make_identity(nd),
    )


CONV = {
    nd: register(
        OpDef(
            name=f"conv{nd}d",
            forward=_make_forward(nd),
            infer_shape=_make_infer(nd),
            widen=_widen,
            attrs={
                "stride": Attr(ints_attr(1), 1),
                "padding": Attr(int_or_choice_attr("same", "valid"), 0),
                "dilation": Attr(ints_attr(1), 1),
                "groups": Attr(int_attr(1), 1),
            },
            params={"weight": Param(), "bias": Param(optional=True)},
            doc=f"{nd}-D convolution over [channels, {nd} spatial axes].",
            # Channels (axis 0) are the units; a depthwise conv's follow its input's.
            units=Units(axis=lambda shape, attrs: 0, owns=lambda attrs: attrs.get("groups", 1) == 1),
            fill_modes=ANY_FILL,
            insert=_make_insert(nd),
        )
    )
    for nd in (1, 2, 3)
}
