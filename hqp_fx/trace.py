"""Symbolic tracing plus shape propagation, with errors a user can act on."""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import linecache
import os
import traceback
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from . import meta, ops
from .capture_export import capture_with_export
from .core import HQPError

__all__ = ["trace", "TraceError", "propagate_shapes"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # with the separator: torchvision's frames are the user's


_MAX_AUTO_LEAVES = 64  # a guard against a retry loop; real models need a handful


class TraceError(HQPError):
    """The model cannot be symbolically traced; the message names the module, the code and the fix."""


class _Proxy(fx.Proxy):
    """A Proxy that knows how many pieces a chunk/split call returns, so ``len`` and ``list`` of it trace."""

    def __len__(self) -> int:
        count = _piece_count(self.node)
        return super().__len__() if count is None else count


class _Tracer(fx.Tracer):
    """fx.Tracer that honours user leaf modules and remembers which module it is inside."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str], num_inputs: int,
                 swin_shapes: dict[str, tuple[int, ...]] | None = None):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.num_inputs = num_inputs  # example inputs: the placeholders of a forward(x, *args, **kwargs)
        self.swin_shapes = swin_shapes or {}  # Swin modules written out -> their input's shape
        self.hqp_module_stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None  # innermost module when tracing raised

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """A ``forward(x, *args, **kwargs)`` is traced as ``forward(x)``: one placeholder per example input, the
        named parameters first (fx would make ``*args`` one Proxy, which the model's code then cannot unpack)."""
        fn = inspect.unwrap(root_fn)
        code = fn.__code__
        if concrete_args is not None or not code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        named = list(code.co_varnames[int(is_module):code.co_argcount])
        names = named[:self.num_inputs] + [f"input_{i}" for i in range(len(named), self.num_inputs)]
        if len(names) > len(named) and not code.co_flags & inspect.CO_VARARGS:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        args = [self.root] if is_module else []
        args += [self.create_proxy("placeholder", name, (), {}) for name in names]
        return root_fn, args

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def iter(self, obj):
        """Iterating the pieces of ``chunk(n)`` or ``split([sizes])`` (``list(x.chunk(2, 1))``): their number is
        in the call. fx itself only unpacks into a fixed tuple of names; any other iteration stays an error. A
        ``chunk`` of a dim too short for ``n`` pieces fails at shape propagation, naming the node."""
        count = _piece_count(obj.node)
        if count is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(count)])

    def opaque_method(self, path: str, name: str):
        """What replaces method ``name`` of the module at ``path`` while tracing: a call recorded as one opaque
        ``call_method`` on the module itself (``get_attr`` of the module), run as written when the graph runs."""
        def call(*args, **kwargs):
            owner = self.create_proxy("get_attr", path, (), {})
            return self.create_proxy("call_method", name, (owner, *args), kwargs)
        return call

    def is_user_leaf(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaf_names or bool(self.leaf_types and isinstance(m, self.leaf_types))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.is_user_leaf(m, qualname) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if isinstance(m, nn.MultiheadAttention) and not self.is_user_leaf(m, path) and \
                _plain_self_attention(m, args, kwargs):
            return _self_attention(m, args[0] if args else kwargs["query"]), None
        if path in self.swin_shapes and not self.is_user_leaf(m, path) and len(args) == 1 and not kwargs:
            return _write_out_swin(self, m, path, args[0], self.swin_shapes[path])
        self.hqp_module_stack.append((path, type(m).__name__))
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.hqp_module_stack[-1]
            raise
        finally:
            self.hqp_module_stack.pop()
        return out


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")


def _plain_self_attention(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> bool:
    """A call ``_self_attention`` computes exactly: batch-first self-attention (query, key and value the same
    tensor) with no masks, no attention weights returned, no extra key/value bias and no attention dropout."""
    call = {**dict(zip(_MHA_ARGS, args)), **kwargs}
    q = call.get("query")
    return (isinstance(q, fx.Proxy) and call.get("key") is q and call.get("value") is q and set(call) <= set(_MHA_ARGS)
            and call.get("need_weights", True) is False and call.get("key_padding_mask") is None
            and call.get("attn_mask") is None and not call.get("is_causal", False) and m.batch_first
            and m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None and not m.add_zero_attn
            and m.dropout == 0.0)


def _self_attention(m: nn.MultiheadAttention, x):
    """nn.MultiheadAttention's self-attention written out (the same arithmetic as its fast path) so that the
    channel analysis sees its heads: torch.nn modules are fx leaves, and this one derives the head size from the
    token width, so pruning whole heads needs the projections and the head reshape in the graph. Its parameters
    are read where they live (``<name>.in_proj_weight``, ``<name>.out_proj.weight``)."""
    batch, tokens = x.shape[0], x.shape[1]
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v)
    return F.linear(y.transpose(1, 2).reshape(batch, tokens, m.num_heads * m.head_dim), m.out_proj.weight,
                    m.out_proj.bias)


def _swin_part(m: nn.Module) -> str | None:
    """Which of torchvision's Swin modules ``m`` is, among those written out: ``"attention"`` for v1's
    ``ShiftedWindowAttention`` without dropout (the exact class: v2's cosine attention is not written out),
    ``"merging"`` / ``"merging_v2"`` for ``PatchMerging`` / ``PatchMergingV2``."""
    cls = type(m)
    if cls.__module__ != "torchvision.models.swin_transformer":
        return None
    if cls.__name__ == "ShiftedWindowAttention":
        plain = m.attention_dropout == 0.0 and m.dropout == 0.0 and isinstance(m.qkv, nn.Linear) and \
            isinstance(m.proj, nn.Linear)
        return "attention" if plain else None
    return {"PatchMerging": "merging", "PatchMergingV2": "merging_v2"}.get(cls.__name__)


def _swin_shapes(root: nn.Module, inputs: tuple[torch.Tensor, ...], leaf_types, leaf_names) \
        -> dict[str, tuple[int, ...]]:
    """The input shape of every Swin module ``_write_out_swin`` may write out, from one forward run of ``root``
    (only when it has one). A module called at several shapes, or a model that does not run on ``inputs``
    (shape propagation then says why), leaves it opaque."""
    targets = {name: m for name, m in root.named_modules() if _swin_part(m)
               and name not in leaf_names and not (leaf_types and isinstance(m, leaf_types))}
    if not targets:
        return {}
    seen: dict[str, set[tuple[int, ...]]] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.setdefault(name, set()).add(tuple(args[0].shape) if args else ()))
        for name, m in targets.items()]
    try:
        with torch.no_grad():
            root(*inputs)
    except Exception:
        return {}
    finally:
        for hook in hooks:
            hook.remove()
    return {name: shape for name, shapes in seen.items() if len(shapes) == 1 for shape in shapes if len(shape) == 4}


def _shift_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Shifted windows' attention mask ``[1, windows, 1, tokens, tokens]``: -100 between tokens that came from
    different regions of the image before the cyclic shift, as torchvision's ``shifted_window_attention`` builds
    it (the same slices and values)."""
    (ph, pw), (wh, ww), (sh, sw) = padded, window, shift
    region = torch.zeros(ph, pw)
    count = 0
    for h in ((0, -wh), (-wh, -sh), (-sh, None)):
        for w in ((0, -ww), (-ww, -sw), (-sw, None)):
            region[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)[None, :, None]


def _write_out_swin(tracer: _Tracer, m: nn.Module, path: str, x, shape: tuple[int, ...]):
    """torchvision's Swin window attention (v1) and patch merging written out, as ``_self_attention`` does for
    nn.MultiheadAttention. torchvision keeps ``shifted_window_attention`` and ``_patch_merging_pad`` opaque to
    fx (``torch.fx.wrap``): their padding, cyclic shift and mask depend on the input's size. That pinned every
    head (and the relative-position table read through an index buffer) and the residual stream. Here those
    sizes are computed once for the shape the model is traced at (``shape``, from a forward run before tracing:
    any batch size, that image size only), so the layers, the head reshape and the table read are graph nodes.
    The shifted-window mask is a buffer of the module (``hqp_shift_mask``)."""
    part = _swin_part(m)
    if part != "attention":
        height, width = shape[-3], shape[-2]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return m.reduction(m.norm(x)) if part == "merging" else m.norm(m.reduction(x))
    _, height, width, channels = shape
    wh, ww = m.window_size
    pad_b, pad_r = (wh - height % wh) % wh, (ww - width % ww) % ww
    ph, pw = height + pad_b, width + pad_r
    sh, sw = (0 if wh >= ph else m.shift_size[0]), (0 if ww >= pw else m.shift_size[1])
    heads, tokens, windows = m.num_heads, wh * ww, (ph // wh) * (pw // ww)
    batch = x.shape[0]
    if pad_b or pad_r:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    x = x.view(batch, ph // wh, wh, pw // ww, ww, channels).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch * windows, tokens, channels)
    q, k, v = m.qkv(x).reshape(batch * windows, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * (channels // heads) ** -0.5).matmul(k.transpose(-2, -1))
    table = tracer.create_proxy("get_attr", f"{path}.relative_position_bias_table", (), {})
    index = tracer.create_proxy("get_attr", f"{path}.relative_position_index", (), {})
    attn = attn + table[index].view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
    if sh or sw:
        m.register_buffer("hqp_shift_mask", _shift_mask((ph, pw), (wh, ww), (sh, sw)), persistent=False)
        mask = tracer.create_proxy("get_attr", f"{path}.hqp_shift_mask", (), {})
        attn = (attn.view(batch, windows, heads, tokens, tokens) + mask).view(-1, heads, tokens, tokens)
    x = attn.softmax(-1).matmul(v).transpose(1, 2).reshape(batch * windows, tokens, channels)
    x = m.proj(x).view(batch, ph // wh, pw // ww, wh, ww, channels).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, ph, pw, channels)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x[:, :height, :width, :].contiguous() if pad_b or pad_r else x


_PIECE_COUNT_ARG = {"chunk": "chunks", torch.chunk: "chunks", "split": "split_size", torch.split: "split_size_or_sections"}


def _piece_count(node: fx.Node) -> int | None:
    """How many tensors a chunk/split call returns, when the call itself says."""
    if node.op not in ("call_method", "call_function") or node.target not in _PIECE_COUNT_ARG:
        return None
    count = ops.arg(node, 1, _PIECE_COUNT_ARG[node.target])
    if node.target in ("chunk", torch.chunk):
        return count if isinstance(count, int) and count > 0 else None
    return len(count) if isinstance(count, (list, tuple)) else None  # split(int) depends on the dim's size


def _user_frame(exc: BaseException) -> tuple[str, int, str] | None:
    """Innermost traceback frame that is not torch's own code: where the user's model broke."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith(_TORCH_DIR) or frame.filename == __file__:
            continue
        found = (frame.filename, frame.lineno or 0, (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip())
    return found


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a non-empty tuple of tensors, e.g. torch.randn(1, 3, 224, 224); "
        f"got {type(example_inputs).__name__}"
    )


_INPUT_HINT = "Check that example_inputs have the shape and dtype the model expects (e.g. torch.randn(1, 3, 224, 224))."


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], hint: str = _INPUT_HINT) -> None:
    """Run torch's ShapeProp so every node carries ``tensor_meta``; errors name the node."""
    try:  # ShapeProp prints a full traceback before re-raising; the error below says what matters
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # torch raises RuntimeError wrapping the node; keep only the cause
        cause = exc.__cause__ or exc
        node_hint = str(exc).split("\n", 1)[0]
        raise TraceError(
            f"shape propagation failed ({node_hint}): {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}. "
            + hint
        ) from None


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    auto_leaf: bool = True,
    capture: str = "auto",
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule whose every node carries shape metadata.

    The model is deep-copied and traced in eval mode (the deployment graph: training-only
    branches such as auxiliary heads are dropped); the user's model is never touched. Module
    qualified names are kept. ``leaf_modules`` (types or qualified names) are kept opaque.

    With ``auto_leaf`` a submodule whose code fx cannot trace (data-dependent control flow, shape
    arithmetic in Python, such as a detector's decode or TF "same" padding) is kept opaque instead, as a
    user would by hand; ``gm.meta[meta.LEAVES]`` says which and why, and the channel analysis keeps
    the channels through it (a torch.nn conv subclass stays a prunable conv).

    ``capture`` picks the front-end: ``"fx"`` (symbolic tracing), ``"export"`` (torch.export, its ATen
    graph converted to torch level by ``capture_export``), or ``"auto"``: fx, and torch.export when the
    root's own forward cannot be traced. The error names module, code and fix when neither can.

    ``nn.MultiheadAttention`` self-attention (batch first, no masks, no dropout, as torchvision's ViT calls it)
    is written out into its projections and ``scaled_dot_product_attention``, so its heads can be pruned;
    any other use of it stays one opaque call. torchvision's Swin window attention (v1) and patch merging are
    written out the same way, for the example input's image size.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    leaf_modules = tuple(leaf_modules)
    leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
    leaf_names = frozenset(t for t in leaf_modules if isinstance(t, str))
    unknown = sorted(n for n in leaf_names if n not in dict(model.named_modules()))
    if unknown:
        raise ValueError(f"leaf_modules names {unknown} are not modules of the model; use names from model.named_modules()")

    if capture not in ("auto", "fx", "export"):
        raise ValueError(f"capture must be 'auto', 'fx' or 'export', got {capture!r}")
    root = copy.deepcopy(model).eval()
    made_leaves: dict[str, str] = {}  # submodule -> why fx could not trace it
    if capture == "export":
        graph = _export_or_raise(root, inputs, None)
    else:
        graph = _fx_trace(root, model, inputs, leaf_types, leaf_names, made_leaves, auto_leaf)
        if isinstance(graph, TraceError):
            if capture == "fx":
                raise graph
            graph = _export_or_raise(root, inputs, graph)

    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    propagate_shapes(gm, inputs)
    gm.meta[meta.EXAMPLE_INPUTS] = tuple(t.detach().clone() for t in inputs)
    gm.meta[meta.SOURCE_NAMES] = tuple(name for name, _ in model.named_modules() if name)
    gm.meta[meta.LEAVES] = _leaf_record(gm, leaf_types, leaf_names, made_leaves)
    return gm


def _fx_trace(root, model, inputs, leaf_types, leaf_names, made_leaves: dict[str, str], auto_leaf: bool):
    """The fx graph of ``root``, making untraceable code opaque (recorded in ``made_leaves``); the TraceError
    naming module, code and fix when the root's own forward cannot be traced.

    When the untraceable code is in a method the module's ``forward`` calls on ``self`` (a detector's decode:
    ``self._inference(x)``), only that call is opaque (key ``"<module>.<method>"``), so the layers ``forward``
    runs before it (the head's convolutions) stay in the graph and prune. Otherwise the whole module is a leaf."""
    methods: dict[str, tuple[str, str]] = {}  # key in made_leaves -> (module, method) traced as one opaque call
    swin_shapes = _swin_shapes(root, inputs, leaf_types, leaf_names)
    while True:
        tracer = _Tracer(leaf_types, leaf_names | frozenset(k for k in made_leaves if k not in methods), len(inputs),
                         swin_shapes)
        patched = []
        try:
            for path, name in methods.values():
                mod = root.get_submodule(path)
                mod.__dict__[name] = tracer.opaque_method(path, name)  # an instance attribute, removed below
                patched.append((mod, name))
            return tracer.trace(root)
        except Exception as exc:
            where = tracer.failed_in or ("", type(model).__name__)
            frame = _user_frame(exc)
            code = f" at {frame[0]}:{frame[1]}: `{frame[2]}`" if frame else ""
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if auto_leaf and where[0] and where[0] not in made_leaves and len(made_leaves) < _MAX_AUTO_LEAVES:
                method = _method_called_by_forward(exc, root.get_submodule(where[0]))
                key = f"{where[0]}.{method}"
                if method and key not in made_leaves:
                    methods[key] = (where[0], method)
                    made_leaves[key] = f"{where[1]}.{method}() cannot be traced{code}: {msg}"
                else:
                    made_leaves[where[0]] = f"{where[1]} cannot be traced{code}: {msg}"
                continue
            name = where[0] or "<root>"
            fix = (
                f"pass leaf_modules=[{where[1]}] (or the name {where[0]!r}) to hqp_fx.trace to keep it opaque "
                f"(on the command line: --leaf {where[0]})"
                if where[0]
                else "rewrite the data-dependent part of forward() or move it into a submodule passed as a leaf module"
            )
            return TraceError(f"cannot trace module {name!r} ({where[1]}){code}: {msg}. Fix: {fix}.")
        finally:
            for mod, name in patched:
                del mod.__dict__[name]


def _method_called_by_forward(exc: BaseException, mod: nn.Module) -> str | None:
    """The method of ``mod`` that its ``forward`` called on ``self`` and inside which tracing failed, if any."""
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    for caller, callee in zip(frames, frames[1:]):
        name = callee.f_code.co_name
        if caller.f_code.co_name == "forward" and caller.f_locals.get("self") is mod \
                and callee.f_locals.get("self") is mod and name != "forward" \
                and inspect.isfunction(inspect.getattr_static(type(mod), name, None)):
            return name
    return None


def _export_or_raise(root: nn.Module, inputs, fx_error: TraceError | None) -> fx.Graph:
    """The torch.export capture converted to torch level, or one error with both capture's reasons."""
    try:
        return capture_with_export(root, inputs)
    except TraceError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if fx_error is None:
            raise TraceError(f"torch.export cannot capture {type(root).__name__}: {type(exc).__name__}: {msg}") from None
        raise TraceError(f"{fx_error} torch.export cannot capture it either ({type(exc).__name__}: {msg})") from None


def _leaf_record(gm: fx.GraphModule, leaf_types, leaf_names, made_leaves: dict[str, str]) -> dict[str, str]:
    """Every opaque module (or module method) the graph calls that is not a torch.nn layer, with why it is opaque."""
    record = {}
    for node in gm.graph.nodes:
        key = meta.leaf_key(node)
        if node.op == "call_method" and key in made_leaves:
            record[key] = f"made a leaf: {made_leaves[key]}"
        if node.op != "call_module" or node.target in record:
            continue
        mod = gm.get_submodule(node.target)
        if node.target in made_leaves:
            record[node.target] = f"made a leaf: {made_leaves[node.target]}"
        elif node.target in leaf_names or (leaf_types and isinstance(mod, leaf_types)):
            record[node.target] = "a leaf because leaf_modules names it"
    return record

