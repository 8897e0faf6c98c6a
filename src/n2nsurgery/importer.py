"""Import a ``torch.nn.Module`` as an n2n model: trace it with torch.fx, map each call to an op.

:func:`from_module` turns the traced graph into an :class:`~n2nsurgery.arch.Architecture` whose
node names are the module paths (``layer1.0.conv1``), so the parameter keys are the module's own
``state_dict`` keys and a widened student loads back into the module's class. What is the
identity at inference (dropout, ``nn.Identity``) is folded away. Before returning, the module and
the imported model run on the same probes (checked at the door): an import that does not compute
what the module computes is never handed out.

Adding an op: one entry in :data:`MODULES` (a module class) or :data:`FUNCTIONS` /
:data:`METHODS` (a functional call), naming the n2n op. An op the registry lacks (a zoo op not
yet written) is refused by name, so the entry may come before the op.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import yaml

from .errors import N2NError, VerificationFailed

FOLD = object()  # a converter's answer for "the identity at inference": the node disappears
BATCH = object()  # the batch size, as read off a traced tensor by x.size(0) or x.shape[0]


class Refused(Exception):
    """A converter found attributes that n2n's op cannot reproduce exactly; the text says which."""


# ------------------------------------------------------------------ converters: module -> attrs


def _none(mod) -> dict:
    return {}


def _one_or_list(value):
    """An attribute as n2n writes it: an int when every axis agrees, else the list."""
    if isinstance(value, (tuple, list)):
        values = list(value)
        return values[0] if len(set(values)) == 1 else values
    return value


def _conv(mod) -> dict:
    if mod.padding_mode != "zeros":
        raise Refused(f"padding_mode '{mod.padding_mode}' (only 'zeros' is supported)")
    padding = mod.padding if isinstance(mod.padding, str) else _one_or_list(mod.padding)
    return {"stride": _one_or_list(mod.stride), "padding": padding, "dilation": _one_or_list(mod.dilation),
            "groups": mod.groups}


def _batchnorm(mod) -> dict:
    if not mod.track_running_stats or mod.running_mean is None:
        raise Refused("track_running_stats=False (batch statistics at inference; n2n's batchnorm uses running statistics)")
    return {"eps": float(mod.eps)}


def _layernorm(mod) -> dict:
    if len(mod.normalized_shape) != 1:
        raise Refused(f"normalized_shape {tuple(mod.normalized_shape)} (n2n's layernorm normalises the last axis only)")
    return {"eps": float(mod.eps)}


def _groupnorm(mod) -> dict:
    return {"num_groups": mod.num_groups, "eps": float(mod.eps)}


def _leaky_relu(mod) -> dict:
    return {"negative_slope": float(mod.negative_slope)}


def _gelu(mod) -> dict:
    return {"approximate": mod.approximate}


def _softmax(mod) -> dict:
    if mod.dim is None:
        raise Refused("dim=None (give the axis explicitly)")
    return {"dim": mod.dim}


def _max_pool(mod) -> dict:
    if _one_or_list(mod.dilation) != 1:
        raise Refused(f"dilation {mod.dilation} (only 1 is supported)")
    if mod.return_indices:
        raise Refused("return_indices=True")
    attrs = {"kernel_size": _one_or_list(mod.kernel_size), "stride": _one_or_list(mod.stride),
             "padding": _one_or_list(mod.padding)}
    return _with_ceil_mode(attrs, mod)


def _avg_pool(mod) -> dict:
    if getattr(mod, "divisor_override", None) is not None:
        raise Refused("divisor_override")
    attrs = {"kernel_size": _one_or_list(mod.kernel_size), "stride": _one_or_list(mod.stride),
             "padding": _one_or_list(mod.padding), "count_include_pad": bool(getattr(mod, "count_include_pad", True))}
    return _with_ceil_mode(attrs, mod)


def _with_ceil_mode(attrs: dict, mod) -> dict:
    attrs["ceil_mode"] = bool(mod.ceil_mode)
    return attrs


def _adaptive(mod) -> dict:
    size = mod.output_size
    if size is None or (isinstance(size, (tuple, list)) and any(s is None for s in size)):
        raise Refused(f"output_size {size} (None keeps an axis; give every size)")
    return {"output_size": _one_or_list(size)}


def _flatten(mod) -> dict:
    return {"start_dim": mod.start_dim, "end_dim": mod.end_dim}


def _fold(mod):
    return FOLD


def _nd_ops(prefix: str, classes: tuple, convert: Callable) -> dict:
    return {cls: (f"{prefix}{nd}d", convert) for nd, cls in zip((1, 2, 3), classes)}


# Module class -> (n2n op, converter). The converter returns the op's attributes, FOLD, or raises
# Refused. An op missing from the registry is refused when met ("the op set lacks ...").
MODULES: dict = {
    nn.Linear: ("linear", _none),
    **_nd_ops("conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv),
    nn.BatchNorm1d: ("batchnorm", _batchnorm),
    nn.BatchNorm2d: ("batchnorm", _batchnorm),
    nn.BatchNorm3d: ("batchnorm", _batchnorm),
    nn.LayerNorm: ("layernorm", _layernorm),
    nn.GroupNorm: ("groupnorm", _groupnorm),
    nn.ReLU: ("relu", _none),
    nn.ReLU6: ("relu6", _none),
    nn.Sigmoid: ("sigmoid", _none),
    nn.Tanh: ("tanh", _none),
    nn.SiLU: ("silu", _none),
    nn.GELU: ("gelu", _gelu),
    nn.LeakyReLU: ("leaky_relu", _leaky_relu),
    nn.Hardswish: ("hardswish", _none),
    nn.Hardsigmoid: ("hardsigmoid", _none),
    nn.Softmax: ("softmax", _softmax),
    nn.Identity: ("identity", _fold),
    nn.Dropout: ("dropout", _fold),
    nn.Dropout1d: ("dropout", _fold),
    nn.Dropout2d: ("dropout", _fold),
    nn.Dropout3d: ("dropout", _fold),
    nn.AlphaDropout: ("dropout", _fold),
    **_nd_ops("max_pool", (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), _max_pool),
    **_nd_ops("avg_pool", (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), _avg_pool),
    **_nd_ops("adaptive_avg_pool", (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), _adaptive),
    **_nd_ops("adaptive_max_pool", (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), _adaptive),
    nn.Flatten: ("flatten", _flatten),
}


# ------------------------------------------------------------- converters: function call -> attrs
# A function converter gets (args, kwargs) of the fx node and returns (tensor inputs, attrs),
# FOLD (the identity of its first argument), or raises Refused.


def _tensor_args(args, kwargs, allowed=()):
    """Every positional argument a traced tensor, and no keyword outside `allowed`."""
    extra = sorted(k for k in kwargs if k not in allowed)
    if extra:
        raise Refused(f"keyword arguments {', '.join(extra)}")
    if not all(isinstance(a, torch.fx.Node) for a in args):
        raise Refused("an argument that is not a tensor of the model (a Python number or constant)")
    return list(args)


def _unary(args, kwargs):
    return _tensor_args(args[:1], {}), {}  # inplace= changes nothing at inference


def _binary(args, kwargs):
    return _tensor_args(args, kwargs), {}


def _arg(args, kwargs, index: int, name: str, default):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _flatten_call(args, kwargs):
    start, end = _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1)
    return _tensor_args(args[:1], {}), {"start_dim": start, "end_dim": end}


def _cat(args, kwargs):
    tensors = _arg(args, kwargs, 0, "tensors", None)
    dim = _arg(args, kwargs, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)):
        raise Refused("tensors that are not a list of the model's tensors")
    if len(tensors) == 1:  # DenseNet's first layer concatenates a list of one: the identity
        return FOLD
    return _tensor_args(tensors, {}), {"dim": dim}


def _torch_add(args, kwargs):
    if kwargs.get("alpha", 1) != 1:
        raise Refused("alpha other than 1")
    return _tensor_args(args, {}), {}


def _adaptive_call(args, kwargs):
    size = _arg(args, kwargs, 1, "output_size", None)
    if size is None or (isinstance(size, (tuple, list)) and any(s is None for s in size)):
        raise Refused(f"output_size {size} (give every size)")
    return _tensor_args(args[:1], {}), {"output_size": _one_or_list(size)}


def _leaky_call(args, kwargs):
    slope = _arg(args, kwargs, 1, "negative_slope", 0.01)
    return _tensor_args(args[:1], {}), {"negative_slope": float(slope)}


def _gelu_call(args, kwargs):
    return _tensor_args(args[:1], {}), {"approximate": kwargs.get("approximate", "none")}


def _fold_call(args, kwargs):
    return FOLD


def _mean_call(args, kwargs):
    dim = _arg(args, kwargs, 1, "dim", None)
    if dim is None:
        raise Refused("no dim (a mean over the batch too)")
    extra = sorted(k for k in kwargs if k not in ("dim", "keepdim"))
    if extra:
        raise Refused(f"keyword arguments {', '.join(extra)}")
    dim = list(dim) if isinstance(dim, (tuple, list)) else dim
    return _tensor_args(args[:1], {}), {"dim": dim, "keepdim": bool(_arg(args, kwargs, 2, "keepdim", False))}


def _permute_call(args, kwargs):
    dims = _arg(args, kwargs, 1, "dims", None)
    dims = list(dims) if isinstance(dims, (tuple, list)) else list(args[1:])
    return _tensor_args(args[:1], {}), {"dims": dims}


def _transpose_call(args, kwargs):
    return _tensor_args(args[:1], {}), {"dim0": _arg(args, kwargs, 1, "dim0", None), "dim1": _arg(args, kwargs, 2, "dim1", None)}


def _layer_norm_call(args, kwargs):
    """F.layer_norm(x, normalized_shape, weight, bias, eps), as torchvision's LayerNorm2d calls it
    between two permutes; weight and bias are the module's own tensors (read by the builder)."""
    shape = _arg(args, kwargs, 1, "normalized_shape", None)
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        raise Refused(f"normalized_shape {shape} (n2n's layernorm normalises the last axis only)")
    weight, bias = _arg(args, kwargs, 2, "weight", None), _arg(args, kwargs, 3, "bias", None)
    attrs = {"eps": float(_arg(args, kwargs, 4, "eps", 1e-5))}
    return _tensor_args(args[:1], {}), attrs, {"weight": weight, "bias": bias}


def _stochastic_depth_call(args, kwargs):
    """torchvision.ops.stochastic_depth(input, p, mode, training): traced in eval mode, training
    is False and the call is the identity."""
    if _arg(args, kwargs, 3, "training", True):
        raise Refused("training=True")
    return FOLD


# Callable -> (n2n op, converter); METHODS: tensor method name -> the same.
FUNCTIONS: dict = {
    torch.relu: ("relu", _unary), F.relu: ("relu", _unary), F.relu6: ("relu6", _unary),
    torch.sigmoid: ("sigmoid", _unary), F.sigmoid: ("sigmoid", _unary),
    torch.tanh: ("tanh", _unary), F.tanh: ("tanh", _unary),
    F.silu: ("silu", _unary), F.gelu: ("gelu", _gelu_call), F.leaky_relu: ("leaky_relu", _leaky_call),
    F.hardswish: ("hardswish", _unary), F.hardsigmoid: ("hardsigmoid", _unary),
    torch.flatten: ("flatten", _flatten_call),
    torch.cat: ("concat", _cat), torch.concat: ("concat", _cat),
    operator.add: ("add", _binary), torch.add: ("add", _torch_add),
    operator.mul: ("mul", _binary), torch.mul: ("mul", _binary),
    F.adaptive_avg_pool1d: ("adaptive_avg_pool1d", _adaptive_call),
    F.adaptive_avg_pool2d: ("adaptive_avg_pool2d", _adaptive_call),
    F.adaptive_avg_pool3d: ("adaptive_avg_pool3d", _adaptive_call),
    F.adaptive_max_pool2d: ("adaptive_max_pool2d", _adaptive_call),
    F.dropout: ("dropout", _fold_call), F.dropout2d: ("dropout", _fold_call),
    torch.mean: ("mean", _mean_call), torch.permute: ("permute", _permute_call),
    torch.transpose: ("transpose", _transpose_call),
    F.layer_norm: ("layernorm", _layer_norm_call),
}

# Integer arithmetic on sizes read off tensors (ShuffleNet's channels // groups).
_INT_OPS = (operator.floordiv, operator.mul, operator.add, operator.sub)

# Functions of libraries n2n does not import, by (module, name): torchvision wraps its
# stochastic_depth for torch.fx, so it arrives as a call.
NAMED_FUNCTIONS: dict = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): ("stochastic_depth", _stochastic_depth_call),
}

METHODS: dict = {
    "relu": ("relu", _unary), "sigmoid": ("sigmoid", _unary), "tanh": ("tanh", _unary),
    "flatten": ("flatten", _flatten_call),
    "add": ("add", _binary), "mul": ("mul", _binary),
    "mean": ("mean", _mean_call), "permute": ("permute", _permute_call), "transpose": ("transpose", _transpose_call),
}


# ---------------------------------------------------------------------------------- the import


def _registry():
    from .ops import REGISTRY

    return REGISTRY


def supported() -> str:
    """The module classes and calls an import can map today (those whose op is registered)."""
    have = _registry()
    mods = sorted({cls.__name__ for cls, (op, _) in MODULES.items() if op in have})
    funcs = sorted({_call_name(f) for f, (op, _) in FUNCTIONS.items() if op in have})
    return f"modules {', '.join(mods)}; calls {', '.join(funcs)}"


def _call_name(fn) -> str:
    module = getattr(fn, "__module__", None) or ""
    short = {"torch.nn.functional": "F", "_operator": "operator", "operator": "operator"}.get(module, "torch")
    return f"{short}.{getattr(fn, '__name__', str(fn))}"


def _described(target) -> str:
    """How a call is named in messages: ``x.view()`` for a tensor method (fx gives its name),
    ``torch.reshape`` for a function."""
    return f"x.{target}()" if isinstance(target, str) else _call_name(target)


def _lacks(where: str, op: str) -> N2NError:
    return N2NError(f"{where}: the op set lacks '{op}'; supported: {supported()}")


class _Builder:
    """Walks the traced graph in order and collects the architecture's nodes."""

    def __init__(self, gm: torch.fx.GraphModule, input_name: str, state_keys: set):
        self.gm = gm
        self.input_name = input_name
        self.state_keys = state_keys
        self.value = {}  # fx node -> n2n value name (a folded node maps to its input's)
        self.ints = {}  # fx node -> a size read off a tensor: an int, BATCH, or a tuple of them
        self.tensors = {}  # fx node -> the state_dict key of a tensor the forward reads directly
        self.parts = {}  # fx node of x.chunk(n, dim) -> (input value, n, dim), taken apart by indexing
        self.nodes = []
        self.names = {input_name}
        self.called = set()  # module paths already imported once (a module called twice)
        self.outputs = []

    # ------------------------------------------------------------------ helpers

    def unique(self, name: str) -> str:
        base, k = name, 1
        while name in self.names:
            name = f"{base}_{k}"
            k += 1
        self.names.add(name)
        return name

    def emit(self, name: str, op: str, inputs: list, attrs: dict, params: Optional[dict] = None) -> str:
        defaults = _registry()[op].attrs
        attrs = {k: v for k, v in attrs.items() if v != defaults[k].default}  # a readable YAML
        node = {"name": name, "op": op, "in": inputs[0] if len(inputs) == 1 else inputs, **attrs}
        if params:
            node["params"] = params
        self.nodes.append(node)
        return name

    def inputs_of(self, args, where: str) -> list:
        names = []
        for a in args:
            if a in self.tensors:
                raise N2NError(f"'{a.target}' is a tensor the forward reads directly (node '{a.name}'), here as an input "
                               f"of {where}; n2n imports such tensors only as a layer scale (x * gamma) or a norm's "
                               f"weight and bias; supported: {supported()}")
            if a not in self.value:
                raise N2NError(f"{where}: an input that is not a tensor n2n can follow ({a})")
            names.append(self.value[a])
        return names

    # ------------------------------------------------------------------ node kinds

    def placeholder(self, node) -> None:
        if self.value:
            raise N2NError(f"forward takes more than one tensor ('{node.target}'); n2n imports a single-input module")
        self.value[node] = self.input_name

    def call_module(self, node) -> None:
        path = node.target
        mod = self.gm.get_submodule(path)
        entry = MODULES.get(type(mod))
        where = f"module '{path}' ({type(mod).__name__})"
        if entry is None:
            raise N2NError(f"{where}: n2n cannot import a {type(mod).__name__}; supported: {supported()}")
        op, convert = entry
        try:
            attrs = convert(mod)
        except Refused as e:
            raise N2NError(f"{where}: {op} cannot be exact with {e}")
        inputs = self.inputs_of(node.args[:1], where)
        if attrs is FOLD:
            self.value[node] = inputs[0]
            return
        self._check_op(where, op, attrs)
        self.value[node] = self._module_node(node, path, op, inputs, attrs)

    def _module_node(self, node, path: str, op: str, inputs: list, attrs: dict) -> str:
        """Named after the module path; a module called again gets the fx name and points its
        parameters at the first call's keys (one tensor, shared)."""
        if path not in self.called and path not in self.names:
            self.called.add(path)
            self.names.add(path)
            return self.emit(path, op, inputs, attrs)
        roles = [r for r in _registry()[op].params if f"{path}.{r}" in self.state_keys]
        params = {r: f"{path}.{r}" for r in roles}
        return self.emit(self.unique(node.name), op, inputs, attrs, params)

    def call_function(self, node) -> None:
        if node.target is operator.getitem and node.args[0] in self.parts:
            self._chunk_part(node)
            return
        if self._size_arithmetic(node):
            return
        if node.target in (operator.mul, torch.mul) and any(a in self.tensors for a in node.args):
            self._layer_scale(node)
            return
        if node.target is torch.chunk:
            self._chunks(node)
            return
        if node.target is torch.reshape:
            self._view(node, list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else [node.args[1]])
            return
        entry = FUNCTIONS.get(node.target)
        if entry is None:
            key = (getattr(node.target, "__module__", None), getattr(node.target, "__name__", None))
            entry = NAMED_FUNCTIONS.get(key)
        self._call(node, entry, _call_name(node.target))

    def call_method(self, node) -> None:
        if node.target == "size" and not node.kwargs:
            sizes = self._sizes_of(node.args[0], "x.size()")
            self.ints[node] = sizes if len(node.args) == 1 else sizes[node.args[1]]
            return
        if node.target in ("view", "reshape"):
            shape = node.args[1:]
            self._view(node, list(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else list(shape))
            return
        if node.target == "contiguous":  # the same values
            self.value[node] = self.inputs_of(node.args[:1], f"x.{node.target}()")[0]
            return
        if node.target == "chunk":
            self._chunks(node)
            return
        if node.target == "mul" and any(a in self.tensors for a in node.args):
            self._layer_scale(node)
            return
        self._call(node, METHODS.get(node.target), f"x.{node.target}()")

    def _call(self, node, entry, where: str) -> None:
        where = f"call {where} (node '{node.name}')"
        if entry is None:
            raise N2NError(f"{where}: n2n cannot import it; supported: {supported()}")
        op, convert = entry
        try:
            converted = convert(node.args, dict(node.kwargs))
        except Refused as e:
            raise N2NError(f"{where}: {op} cannot be exact with {e}")
        if converted is FOLD:
            first = node.args[0]
            first = first[0] if isinstance(first, (list, tuple)) else first  # torch.cat([x])
            self.value[node] = self.inputs_of([first], where)[0]
            return
        args, attrs, *tensor_args = converted
        inputs = self.inputs_of(args, where)
        self._check_op(where, op, attrs)
        if tensor_args:  # a functional norm: its weight and bias are tensors the forward reads
            name, params = self._named_by_tensors(node, tensor_args[0], where)
            self.value[node] = self.emit(name, op, inputs, attrs, params)
            return
        self.value[node] = self.emit(self.unique(node.name), op, inputs, attrs)

    # ------------------------------------------------------ tensors the forward reads directly

    def get_attr(self, node) -> None:
        """A parameter or buffer read as ``self.gamma``: kept until a use says what it is (a layer
        scale, a norm's weight); any other use is refused there, naming the tensor."""
        if node.target not in self.state_keys:
            raise N2NError(f"'{node.target}' is a tensor the forward reads directly (node '{node.name}') but not in "
                           f"the module's state_dict (a constant); n2n cannot carry it; supported: {supported()}")
        self.tensors[node] = node.target

    def _named_by_tensors(self, node, roles: dict, where: str) -> tuple:
        """(node name, params) for an op whose tensors the forward passed in: named after their
        owner (``features.0.1`` for ``features.0.1.weight``) so the default keys are the module's."""
        keys = {}
        for role, arg in roles.items():
            if arg is None:
                continue
            if arg not in self.tensors:
                raise N2NError(f"{where}: its {role} is not a parameter of the module ({arg})")
            keys[role] = self.tensors[arg]
        owners = {k.rpartition(".")[0] for k in keys.values()}
        owner = owners.pop() if len(owners) == 1 else None
        if owner and owner not in self.names and all(k == f"{owner}.{r}" for r, k in keys.items()):
            self.names.add(owner)
            return owner, None
        return self.unique(node.name), keys

    def _layer_scale(self, node) -> None:
        """``x * self.gamma`` (ConvNeXt, CaiT): a per-channel scale, the n2n op layer_scale."""
        where = f"call {_described(node.target)} (node '{node.name}')"
        args = list(node.args)
        if len(args) != 2 or node.kwargs or sum(a in self.tensors for a in args) != 1:
            raise N2NError(f"{where}: only a product of one value and one tensor of the module imports (a layer scale)")
        gamma, x = (args[0], args[1]) if args[0] in self.tensors else (args[1], args[0])
        self._check_op(where, "layer_scale", {})
        key = self.tensors[gamma]
        name = key if key not in self.names else self.unique(node.name)
        self.names.add(name)
        self.value[node] = self.emit(name, "layer_scale", self.inputs_of([x], where), {}, {"weight": key})

    # ------------------------------------------------------------------ chunks

    def _chunks(self, node) -> None:
        """``x.chunk(n, dim)`` is a tuple; each ``parts[i]`` becomes one n2n chunk node."""
        where = f"call chunk (node '{node.name}')"
        chunks, dim = _arg(node.args, node.kwargs, 1, "chunks", None), _arg(node.args, node.kwargs, 2, "dim", 0)
        if not isinstance(chunks, int) or not isinstance(dim, int) or dim == 0:
            raise N2NError(f"{where}: only chunks of a constant count along an axis other than the batch import")
        size = self._sizes_of(node.args[0], where)[dim]
        if size % chunks:
            raise N2NError(f"{where}: {size} entries do not split into {chunks} equal parts (n2n's chunk is equal parts only)")
        self._check_op(where, "chunk", {})
        self.parts[node] = (self.inputs_of(node.args[:1], where)[0], chunks, dim)

    def _chunk_part(self, node) -> None:
        source, chunks, dim = self.parts[node.args[0]]
        index = node.args[1]
        if not isinstance(index, int):
            raise N2NError(f"call getitem (node '{node.name}'): a slice of chunks; index them one by one")
        attrs = {"chunks": chunks, "index": index % chunks, "dim": dim}
        self.value[node] = self.emit(self.unique(node.name), "chunk", [source], attrs)

    # ------------------------------------------------------------------ sizes and reshapes

    def _sizes_of(self, arg, where: str) -> tuple:
        """The sizes of a traced tensor at the example input, the batch axis as BATCH."""
        meta = arg.meta.get("tensor_meta") if isinstance(arg, torch.fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            raise N2NError(f"{where}: the size of a value that is not a tensor n2n can follow ({arg})")
        return (BATCH,) + tuple(int(n) for n in meta.shape[1:])

    def _size_arithmetic(self, node) -> bool:
        """x.shape, indexing it, and integer arithmetic on sizes (ShuffleNet's C // groups): the
        sizes are known at the example input; the batch size may only pass through untouched."""
        f, args = node.target, node.args
        if f is getattr and len(args) == 2 and args[1] == "shape":
            self.ints[node] = self._sizes_of(args[0], "x.shape")
            return True
        if f is operator.getitem and args[0] in self.ints:
            self.ints[node] = self.ints[args[0]][args[1]]
            return True
        if f in _INT_OPS and any(a in self.ints for a in args):
            values = [self.ints.get(a, a) for a in args]
            if any(v is BATCH for v in values) or not all(isinstance(v, int) for v in values):
                raise N2NError(f"call {_call_name(f)} (node '{node.name}'): arithmetic on the batch size or on "
                               "a value that is not a size; n2n follows sizes only as constants of the example input")
            self.ints[node] = f(*values)
            return True
        return False

    def _view(self, node, shape: list) -> None:
        """``x.view(x.size(0), ...)`` (or reshape, or ``x.shape[0]``): ``(batch, -1)`` to two axes
        is a flatten from axis 1, anything else the op reshape of one sample's shape (which
        refuses to widen an axis it splits, such as a channel shuffle's)."""
        where = f"call {_described(node.target)} (node '{node.name}')"
        sizes = [self.ints.get(n, n) for n in shape]
        if not sizes or sizes[0] is not BATCH or not all(isinstance(n, int) and n is not BATCH for n in sizes[1:]):
            raise N2NError(f"{where}: only a view that keeps the batch axis, x.view(x.size(0), ...), can be "
                           "imported (its other sizes constants of the example input); write torch.flatten(x, 1) "
                           "or keep the batch size first")
        inputs = self.inputs_of(node.args[:1], where)
        meta = node.meta.get("tensor_meta")
        if sizes[1:] == [-1] and meta is not None and len(meta.shape) == 2:
            self.value[node] = self.emit(self.unique("flatten"), "flatten", inputs, {"start_dim": 1, "end_dim": -1})
            return
        self._check_op(where, "reshape", {})
        self.value[node] = self.emit(self.unique(node.name), "reshape", inputs, {"shape": sizes[1:]})

    def output(self, node) -> None:
        out = node.args[0]
        values = list(out) if isinstance(out, (tuple, list)) else [out]
        names = self.inputs_of(values, "the module's output")
        if any(n == self.input_name for n in names):
            raise N2NError("the module returns its input unchanged; there is nothing to import")
        self.outputs = names

    def _check_op(self, where: str, op: str, attrs: dict) -> None:
        have = _registry()
        if op not in have:
            raise _lacks(where, op)
        unknown = [k for k in attrs if k not in have[op].attrs]
        if unknown:  # e.g. ceil_mode before the op grows the attribute
            raise N2NError(f"{where}: the op '{op}' has no attribute {', '.join(unknown)} "
                           f"(n2n computes it without); supported: {supported()}")


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    """The graph of `module` at inference: traced in eval mode, since Python branches on
    ``self.training`` (stochastic depth, a training-only auxiliary head) are fixed at trace time."""
    was_training = module.training
    module.eval()
    try:
        return torch.fx.symbolic_trace(module)
    except Exception as e:  # the tracer's own reason (data-dependent control flow, ...)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise N2NError(f"cannot trace {type(module).__name__} with torch.fx: {reason}") from None
    finally:
        module.train(was_training)


def _shape_prop(gm, example_input: torch.Tensor) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise N2NError(f"the module fails on the example input of shape {tuple(example_input.shape)}: {reason}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in (torch.float32, torch.float64):
        raise N2NError(f"example input dtype {dtype}: n2n imports float32 or float64 inputs")
    return str(dtype).replace("torch.", "")


def architecture_of(module: nn.Module, example_input: torch.Tensor, input_name: str = "x",
                    name: Optional[str] = None) -> str:
    """The architecture YAML of `module` traced on `example_input` (a batch, batch axis first)."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise N2NError("example_input must be a tensor with a batch axis first (e.g. torch.randn(1, 3, 32, 32))")
    gm = _trace(module)
    _shape_prop(gm, example_input)
    builder = _Builder(gm, input_name, set(module.state_dict()))
    for node in gm.graph.nodes:  # fx kinds: placeholder, call_module, call_function, ..., output
        getattr(builder, node.op)(node)
    doc = {
        "format": "n2n-arch/1",
        "name": name or type(module).__name__,
        "inputs": {input_name: {"shape": list(example_input.shape[1:]), "dtype": _dtype_name(example_input.dtype)}},
        "nodes": builder.nodes,
        "outputs": builder.outputs,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def from_module(module: nn.Module, example_input: torch.Tensor, *, input_name: str = "x", probes: int = 16,
                seed: int = 0, atol: Optional[float] = None, rtol: Optional[float] = None):
    """Import `module` as an n2n :class:`~n2nsurgery.model.Model`, checked against the module.

    Args:
        module: the network; its ``state_dict()`` becomes the model's tensors (copied).
        example_input: one batch of the input (batch axis first); its shape past the batch axis
            and its dtype become the architecture's input.
        input_name: the architecture's input name.
        probes, seed, atol, rtol: the check at the door (as for :func:`~n2nsurgery.verify.verify`).

    Raises:
        N2NError: the module cannot be traced, or holds a module or call n2n has no op for (the
            message names the module path or the call, and what is supported).
        VerificationFailed: the imported model does not compute what the module computes.
    """
    return import_checked(module, example_input, input_name=input_name, probes=probes, seed=seed, atol=atol,
                          rtol=rtol)[0]


def import_checked(module: nn.Module, example_input: torch.Tensor, *, input_name: str = "x", probes: int = 16,
                   seed: int = 0, atol: Optional[float] = None, rtol: Optional[float] = None) -> tuple:
    """:func:`from_module`, also returning the check's :class:`~n2nsurgery.verify.VerifyResult`."""
    from .arch import parse_architecture
    from .model import model_from_state_dict

    text = architecture_of(module, example_input, input_name)
    tensors = {k: v.detach().clone() for k, v in module.state_dict().items()}
    model = model_from_state_dict(parse_architecture(text, source=f"<{type(module).__name__}>"), tensors)
    result = check_against_module(module, model, probes=probes, seed=seed, atol=atol, rtol=rtol)
    return model, result


def module_outputs(module: nn.Module, inputs: torch.Tensor) -> list:
    """The module's outputs in eval mode without gradients, as a list (its mode is restored)."""
    from .executor import exact_math

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), exact_math():
            out = module(inputs)
    finally:
        module.train(was_training)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def compare_with_module(module: nn.Module, model, probes: int = 16, seed: int = 0, atol: Optional[float] = None,
                        rtol: Optional[float] = None):
    """Run `module` and `model` on the same probes; the :class:`~n2nsurgery.verify.VerifyResult`."""
    from .executor import run
    from .verify import VerifyResult, compare_outputs, default_tolerance, make_probes

    if len(model.arch.inputs) != 1:
        raise N2NError(f"{model.source}: a module takes one input; the architecture has {len(model.arch.inputs)}")
    d_atol, d_rtol = default_tolerance(model)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    (name, spec), = model.arch.inputs.items()
    x = make_probes(model.arch, probes, seed)[name]
    ours = [t.cpu() for t in run(model, {name: x})]
    theirs = [t.detach().cpu().to(o.dtype) for t, o in zip(module_outputs(module, x.to(_module_dtype(module))), ours)]
    if len(theirs) != len(ours):
        raise N2NError(f"{model.source}: the module returns {len(theirs)} outputs, the architecture {len(ours)}")
    checks = compare_outputs(model, model, theirs, ours, atol, rtol)
    return VerifyResult(all(c.passed for c in checks), checks, "cpu", probes, seed, atol, rtol, None)


def _module_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_against_module(module: nn.Module, model, **settings):
    """:func:`compare_with_module`, raising :class:`VerificationFailed` when they differ."""
    result = compare_with_module(module, model, **settings)
    if not result.passed:
        worst = max(result.outputs, key=lambda c: c.max_abs - c.bound)
        raise VerificationFailed(
            f"the imported model differs from {type(module).__name__} on output '{worst.name}' "
            f"(max |Δ| {worst.max_abs:.3g}, allowed {worst.bound:.3g}); nothing was written", result)
    return result


# ------------------------------------------------------------------------ MODULE:FACTORY specs


def module_from_factory(spec: str) -> nn.Module:
    """Import ``MODULE:FACTORY`` (the current folder on sys.path, as ``python -m`` has it) and
    call FACTORY (a function or class) with no arguments; the :class:`torch.nn.Module` it returns."""
    import importlib
    import os
    import sys

    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise N2NError(f"'{spec}': give MODULE:FACTORY, e.g. mypkg.models:MyNet")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        pymod = importlib.import_module(module_name)
    except ImportError as e:
        raise N2NError(f"'{spec}': cannot import module '{module_name}' ({e}); run from the folder that holds it "
                       "or install it") from None
    except Exception as e:  # the user's module raised while importing
        raise N2NError(f"'{spec}': importing '{module_name}' raised {type(e).__name__}: {' '.join(str(e).split())}") from None
    factory = pymod
    for part in factory_name.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            names = sorted(n for n in vars(pymod) if not n.startswith("_") and callable(getattr(pymod, n)))
            raise N2NError(f"'{spec}': module '{module_name}' has no '{factory_name}'; it has {', '.join(names) or 'no callables'}")
    if not callable(factory):
        raise N2NError(f"'{spec}': '{factory_name}' is not callable; give a function or class that builds the module")
    try:
        built = factory()
    except Exception as e:
        raise N2NError(f"'{spec}': calling {factory_name}() raised {type(e).__name__}: {' '.join(str(e).split())} "
                       "(FACTORY is called with no arguments)") from None
    if not isinstance(built, nn.Module):
        raise N2NError(f"'{spec}': {factory_name}() returned a {type(built).__name__}, not a torch.nn.Module")
    return built


def parse_input_shape(text: str) -> tuple:
    """``3,32,32`` -> (3, 32, 32): one sample's shape, no batch axis."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise N2NError(f"--input-shape '{text}': give positive integers separated by commas, e.g. 3,32,32") from None
    if not shape or any(s < 1 for s in shape):
        raise N2NError(f"--input-shape '{text}': give positive integers separated by commas, e.g. 3,32,32")
    return shape


def load_tensors_into(module: nn.Module, model, spec: str) -> None:
    """Load `model`'s tensors into `module` (strict: the same keys and shapes), or refuse (exit 2)."""
    tensors = {k: model.tensors.get(k) for k in model.tensors.keys()}
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        reason = " ".join(str(e).split())
        raise N2NError(f"{model.source}: its tensors do not load into {spec} ({reason}); "
                       "the factory must build the module at the checkpoint's widths") from None
