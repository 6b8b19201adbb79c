"""Save and load a (pruned) GraphModule without pickling code, and without running any while loading.

``torch.save(gm)`` pickles the module's classes and its generated ``forward``; loading that
needs ``weights_only=False``, i.e. running arbitrary code. Instead the file holds only data:
the graph as plain records (ops, targets by qualified name, args), each leaf module as its
``torch.nn`` class name plus constructor arguments, and the tensors, read with
``torch.load(..., weights_only=True)``. ``torch.export.save`` was considered: it serialises
safely too, but reloads as an ExportedProgram whose module loses the leaf ``nn.Module``s
(Conv2d, BatchNorm2d, ...) that fine-tuning and further hqp_fx passes rely on.

A file is untrusted input. ``load`` resolves names only through explicit tables built here from the
objects themselves (``LOADABLE_FUNCTIONS``, ``LOADABLE_METHODS``, ``LOADABLE_MODULES``): never by importing
or ``getattr``-walking a name from the file, never whole namespaces. Every name that reaches the generated
Python source (node names, placeholder and attribute targets, keyword names) must be a plain identifier.
The whole graph is validated before anything is built; the modules are built on the meta device (no
allocation from the file's numbers), the saved tensors are checked against them, and only then does the
graph run once, on its saved example input, to attach shapes. ``save`` refuses what ``load`` would refuse.
"""
from __future__ import annotations

import copy
import inspect
import json
import keyword
import math
import operator
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import meta, ops
from .core import HQPError, atomic_torch_save
from .trace import propagate_shapes

__all__ = ["save", "load", "LOADABLE_FUNCTIONS", "LOADABLE_METHODS", "LOADABLE_MODULES", "LOADABLE_ATTRIBUTES"]

FORMAT = "hqp_fx.graph_module"
VERSION = 1


def _qualname(obj: Any) -> str:
    mod = getattr(obj, "__module__", None) or ""
    # classes may be nested (__qualname__); torch's builtins report a private class there, so use __name__
    name = obj.__qualname__ if isinstance(obj, type) else getattr(obj, "__name__", "")
    return f"{mod}.{name}"


def _table(objects) -> dict[str, Any]:
    return {_qualname(o): o for o in objects}


# call_function targets: what the tracer emits for the ops the registry (hqp_fx.ops) knows, what the passes insert,
# and a named set of other pure tensor math. Nothing here reads or writes files, imports, spawns or evaluates.
_EXTRA_FUNCTIONS = {
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.mod, operator.pos,
    operator.matmul, operator.imatmul, operator.and_, operator.or_, operator.not_, operator.truth,
    operator.is_, operator.is_not, math.sqrt, math.ceil, math.floor,
    torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.index_select, torch.swapaxes, torch.swapdims,
    torch.argmax, torch._assert, torch.batch_norm, torch.layer_norm, torch.group_norm,
    F.scaled_dot_product_attention, F.embedding, F.unfold, F.fold, F.hardshrink, F.glu, F.logsigmoid, F.softsign,
}
LOADABLE_FUNCTIONS: dict[str, Any] = _table(ops.functions() | _EXTRA_FUNCTIONS | {getattr})

# ``getattr`` is what fx records for ``x.shape``; it is loadable only on a graph value and for these names
LOADABLE_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda"})

# call_method targets: public, non-mutating-of-the-world tensor methods, each checked to exist on torch.Tensor
LOADABLE_METHODS = frozenset(
    m for m in (ops.methods() | {"size", "dim", "numel", "matmul", "bmm", "index_select", "argmax", "unfold",
                                 "masked_fill_"})
    - {"type"}  # Tensor.type(str) parses a type name: not needed by any traced model we know
    if not m.startswith("_") and callable(getattr(torch.Tensor, m, None)))

# leaf module classes: torch.nn layers a traced CNN or transformer keeps as leaves, by name; no containers,
# no losses, no recurrent or lazy modules, nothing whose constructor takes another module
_MODULE_NAMES = """
Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d Linear Bilinear Identity Embedding
BatchNorm1d BatchNorm2d BatchNorm3d SyncBatchNorm InstanceNorm1d InstanceNorm2d InstanceNorm3d LayerNorm GroupNorm
RMSNorm LocalResponseNorm CrossMapLRN2d
ReLU ReLU6 SiLU GELU Sigmoid Tanh Hardswish Hardsigmoid Hardtanh LeakyReLU PReLU RReLU ELU SELU CELU Mish
Softplus Softsign Softshrink Hardshrink Tanhshrink Threshold GLU LogSigmoid Softmax Softmax2d LogSoftmax Softmin
Dropout Dropout1d Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout
MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d
AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d LPPool1d LPPool2d LPPool3d
ZeroPad1d ZeroPad2d ZeroPad3d ConstantPad1d ConstantPad2d ConstantPad3d ReflectionPad1d ReflectionPad2d
ReflectionPad3d ReplicationPad1d ReplicationPad2d ReplicationPad3d CircularPad1d CircularPad2d CircularPad3d
Upsample UpsamplingNearest2d UpsamplingBilinear2d PixelShuffle PixelUnshuffle ChannelShuffle Flatten Unflatten
Fold Unfold MultiheadAttention
"""
LOADABLE_MODULES: dict[str, type] = _table(getattr(nn, n) for n in _MODULE_NAMES.split() if hasattr(nn, n))

_SKIP_INIT = {"self", "device", "dtype", "args", "kwargs"}
_DOTTED = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")  # module paths: layer1.0.conv, block1-0 (regnet)
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


def _identifier(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or not name.isascii() or keyword.iskeyword(name) \
            or name.startswith("__"):
        raise HQPError(f"refusing {what} {name!r}: it must be a plain Python identifier")
    return name


def _dotted(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _DOTTED.match(name) or any(
            keyword.iskeyword(p) or p.startswith("__") for p in name.split(".")):
        raise HQPError(f"refusing {what} {name!r}: it must be a dotted path of names of letters, digits, '_' and '-'")
    return name


def _allowed(name: Any, table, what: str, listed: str) -> Any:
    """``table[name]`` (or ``name`` for a set) when the loadable table lists it; else refused by name."""
    if not isinstance(name, str) or name not in table:
        raise HQPError(f"refusing to load {what} {name!r}: it is not one of the {listed} hqp_fx.serialize lists "
                       "(a file hqp_fx wrote never needs anything else)")
    return table[name] if isinstance(table, dict) else name


def _function(qualname: Any) -> Any:
    return _allowed(qualname, LOADABLE_FUNCTIONS, "call target", "tensor operations LOADABLE_FUNCTIONS")


def _method(name: Any) -> str:
    return _allowed(name, LOADABLE_METHODS, "tensor method", "methods LOADABLE_METHODS")


def _module_class(qualname: Any) -> type:
    return _allowed(qualname, LOADABLE_MODULES, "module class", "torch.nn layers LOADABLE_MODULES")


def _encode(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise HQPError(f"cannot serialise a dict argument with non-string keys: {v!r}")
        return {"dict": {k: _encode(x) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"slice": [_encode(v.start), _encode(v.stop), _encode(v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).replace("torch.", "")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).replace("torch.", "")}
    if callable(v):
        return {"fn": _qualname(v)}
    raise HQPError(f"cannot serialise argument {v!r} of type {type(v).__name__}")


def _torch_constant(name: Any, kind: type, what: str) -> Any:
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, kind):
        raise HQPError(f"refusing {what} {name!r}: not a torch {what}")
    return value


def _decode(v: Any, nodes: dict[str, fx.Node] | None, depth: int = 0) -> Any:
    """A value from its JSON record; ``nodes=None`` means plain data only (module constructor arguments)."""
    if depth > 64:
        raise HQPError("argument nesting deeper than 64 levels")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_decode(x, nodes, depth + 1) for x in v]
    if not isinstance(v, dict) or len(v) != 1:
        raise HQPError(f"unknown encoded value {v!r}")
    (kind, val), = v.items()
    if kind == "node" and nodes is not None:
        if not isinstance(val, str) or val not in nodes:
            raise HQPError(f"argument names node {val!r}, which no earlier node defines")
        return nodes[val]
    if kind == "tuple" and isinstance(val, list):
        return tuple(_decode(x, nodes, depth + 1) for x in val)
    if kind == "dict" and isinstance(val, dict):
        return {k: _decode(x, nodes, depth + 1) for k, x in val.items()}
    if kind == "slice" and isinstance(val, list) and len(val) == 3:
        return slice(*[_decode(x, nodes, depth + 1) for x in val])
    if kind == "ellipsis" and val is True:
        return Ellipsis
    if kind == "dtype":
        return _torch_constant(val, torch.dtype, "dtype")
    if kind == "memory_format":
        return _torch_constant(val, torch.memory_format, "memory format")
    if kind == "device" and isinstance(val, str):
        try:
            return torch.device(val)
        except RuntimeError:
            raise HQPError(f"refusing device {val!r}: not a torch device") from None
    if kind == "fn" and nodes is not None:
        return _function(val)
    raise HQPError(f"unknown encoded value {v!r}")


def _init_arguments(cls: type) -> list[str]:
    return [p for p, param in inspect.signature(cls.__init__).parameters.items()
            if p not in _SKIP_INIT and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)]


def _module_spec(name: str, mod: nn.Module) -> dict:
    cls = type(mod)
    qual = _qualname(cls)
    if LOADABLE_MODULES.get(qual) is not cls:  # a user's leaf: its tensors are saved, its code never is
        return {"type": qual, "user_module": True}
    init = {}
    for pname in _init_arguments(cls):
        if not hasattr(mod, pname):
            continue
        value = getattr(mod, pname)
        if isinstance(value, torch.Tensor) or (value is None and pname == "bias"):
            value = value is not None
        init[pname] = _encode(value)
    spec = {"type": qual, "init": init}
    rebuilt = _build_module(spec)
    same = rebuilt.extra_repr() == mod.extra_repr() and {
        k: tuple(t.shape) for k, t in rebuilt.state_dict().items()} == {k: tuple(t.shape) for k, t in mod.state_dict().items()}
    if not same:
        raise HQPError(f"cannot save module {name!r}: rebuilding {qual} from its attributes gives {rebuilt.extra_repr()!r}, "
                       f"not {mod.extra_repr()!r}")
    return spec


def _module(name: str, spec: Any, templates: dict[str, nn.Module]) -> nn.Module:
    """A module record: a listed torch.nn layer rebuilt from its arguments, or a user's leaf module, which
    comes from the caller's ``templates``, copied (its tensors come from the file)."""
    if not (isinstance(spec, dict) and set(spec) == {"type", "user_module"} and spec["user_module"] is True
            and isinstance(spec["type"], str)):
        return _build_module(spec)
    template = templates.get(name)
    if template is None or _qualname(type(template)) != spec["type"]:
        raise HQPError(f"module {name!r} is a user module of type {spec['type']!r}: the file holds its tensors but "
                       f"never its code; pass leaf_modules={{{name!r}: <a {spec['type'].rpartition('.')[2]} "
                       "instance>}} (e.g. dict(model.named_modules()) of the original model) to hqp_fx.load")
    return copy.deepcopy(template)


def _build_module(spec: Any) -> nn.Module:
    """The module a spec describes, built on the meta device: its numbers allocate nothing."""
    if not isinstance(spec, dict) or set(spec) != {"type", "init"} or not isinstance(spec["init"], dict):
        raise HQPError(f"malformed module record {spec!r}")
    cls = _module_class(spec["type"])
    allowed = set(_init_arguments(cls))
    unknown = sorted(k for k in spec["init"] if k not in allowed)
    if unknown:
        raise HQPError(f"{spec['type']} has no constructor argument(s) {unknown}")
    kwargs = {k: _decode(v, None) for k, v in spec["init"].items()}
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except Exception as exc:  # a constructor refusing its (file-supplied) arguments: data error, not ours
        raise HQPError(f"cannot build {spec['type']}({kwargs}): {type(exc).__name__}: {exc}") from None


def _owner_module(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    """For a ``call_method`` on a module the graph reads whole (``get_attr``), that module: ``hqp_fx.trace``
    keeps a method it cannot trace (a detector's decode) as such a call."""
    owner = meta.method_owner(node)
    value = None if owner is None else operator.attrgetter(owner)(gm)
    return value if isinstance(value, nn.Module) else None


def _users_own_method(cls: type, name: str) -> bool:
    """``name`` is a plain function of ``cls`` defined by the user's classes, not by torch's (``nn.Module.apply``)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return inspect.isfunction(vars(klass)[name]) and klass.__module__.split(".")[0] != "torch"
    return False


def save(gm: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``gm`` (graph, leaf modules, parameters, buffers) to one file, atomically.

    Refuses a graph ``load`` would refuse (a call target or method outside the loadable tables), so a file that
    saves also loads. A leaf module that is not a listed torch.nn layer is saved as its class name and tensors;
    ``load`` then needs the module itself (``leaf_modules``). So is a module whose own method the graph calls
    (a decode ``hqp_fx.trace`` kept opaque): the method's code comes from that module at load, never from the file."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"hqp_fx.save expects a torch.fx.GraphModule (from hqp_fx.trace or a pass), got {type(gm).__name__}")
    nodes, modules = [], {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function":
            target = _qualname(target)
            if LOADABLE_FUNCTIONS.get(target) is not node.target:
                raise HQPError(f"cannot save node {node.format_node()}: {target} is not in "
                               "hqp_fx.serialize.LOADABLE_FUNCTIONS, so the file could not be loaded safely")
        elif node.op == "call_method" and (owner := _owner_module(node, gm)) is None:
            _method(target)
        elif node.op == "call_method":  # a user module's own method, kept opaque by hqp_fx.trace
            if not _users_own_method(type(owner), _identifier(target, "method name")):
                raise HQPError(f"cannot save node {node.format_node()}: {target!r} is not a method the module's "
                               "own class defines, so the file could not be loaded safely")
        elif node.op in ("call_module", "get_attr") and target not in modules:
            mod = operator.attrgetter(target)(gm)
            if isinstance(mod, nn.Module):  # get_attr: a module whose own method the graph calls
                modules[target] = _module_spec(target, mod)
                if node.op == "get_attr" and not modules[target].get("user_module"):
                    raise HQPError(f"cannot save node {node.format_node()}: it reads torch.nn module {target!r} whole")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode(node.args), "kwargs": _encode(dict(node.kwargs))})
    params = {k: v.detach() for k, v in gm.named_parameters()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "class_name": type(gm).__name__,
        "graph": json.dumps({"nodes": nodes, "modules": modules}),
        "parameters": params,
        "requires_grad": [k for k, v in gm.named_parameters() if v.requires_grad],
        "buffers": {k: v for k, v in gm.named_buffers()},
        "training": gm.training,
        "example_inputs": list(gm.meta.get(meta.EXAMPLE_INPUTS, ())),
        "source_names": list(gm.meta.get(meta.SOURCE_NAMES, ())),
    }
    atomic_torch_save(payload, Path(path))


def load(path: str | os.PathLike, leaf_modules: Mapping[str, nn.Module] | None = None) -> fx.GraphModule:
    """Rebuild a GraphModule written by ``save``. Never unpickles code (``weights_only=True``) and never calls
    anything outside the loadable tables; every problem with the file is an ``HQPError`` naming it.

    A model traced with user leaf modules (``hqp_fx.trace(..., leaf_modules=...)``) needs those modules back:
    ``leaf_modules`` maps module names to instances of the same class (e.g. ``dict(model.named_modules())`` of
    the original model), which are copied and given the file's tensors. The file names which modules it needs;
    it never supplies their code."""
    path = Path(path)
    if not path.is_file():
        raise HQPError(f"{path} is a folder, not a hqp_fx model file" if path.is_dir()
                       else f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure: not a weights-only torch file, or a damaged one
        raise HQPError(f"{path} is not a hqp_fx model file, or it is damaged ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise HQPError(f"{path} is not a hqp_fx model file (written by hqp_fx.save)")
    try:
        return _rebuild(payload, dict(leaf_modules or {}))
    except HQPError as exc:
        raise HQPError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
        raise HQPError(f"{path} is damaged: {type(exc).__name__}: {exc}") from None


def _typed(payload: dict, key: str, kind, what: str):
    value = payload.get(key)
    if not isinstance(value, kind):
        raise HQPError(f"field {key!r} is missing or not {what}; the file is damaged")
    return value


def _rebuild(payload: dict, templates: dict[str, nn.Module]) -> fx.GraphModule:
    version = _typed(payload, "version", int, "an integer")
    if version > VERSION:
        raise HQPError(f"written by a newer hqp_fx (format {version}); upgrade hqp_fx")
    params = _typed(payload, "parameters", dict, "a dict of tensors")
    buffers = _typed(payload, "buffers", dict, "a dict of tensors")
    examples = _typed(payload, "example_inputs", list, "a list of tensors")
    grad = set(_typed(payload, "requires_grad", list, "a list of names"))
    sources = _typed(payload, "source_names", list, "a list of names")
    training = _typed(payload, "training", bool, "a boolean")
    class_name = _identifier(payload.get("class_name"), "class name")
    for name, t in {**params, **buffers}.items():
        _dotted(name, "tensor name")
        if not isinstance(t, torch.Tensor):
            raise HQPError(f"tensor {name!r} is a {type(t).__name__}, not a tensor")
    if not all(isinstance(t, torch.Tensor) for t in examples) or not all(isinstance(s, str) for s in sources):
        raise HQPError("example_inputs must be tensors and source_names strings; the file is damaged")
    spec = json.loads(_typed(payload, "graph", str, "a JSON string"))
    if not isinstance(spec, dict) or set(spec) != {"nodes", "modules"} or not isinstance(spec["nodes"], list) \
            or not isinstance(spec["modules"], dict):
        raise HQPError("the graph record is malformed")

    # 1. validate everything and build the modules on the meta device: nothing runs yet
    root: dict[str, Any] = {_dotted(q, "module name"): _module(q, m, templates) for q, m in spec["modules"].items()}
    tensors = {**buffers, **params}
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for rec in spec["nodes"]:
        if not isinstance(rec, dict) or set(rec) != {"name", "op", "target", "args", "kwargs"}:
            raise HQPError(f"malformed node record {rec!r}")
        name, op, target = _identifier(rec["name"], "node name"), rec["op"], rec["target"]
        if op not in _OPS:
            raise HQPError(f"node {name!r} has unknown op {op!r}")
        if name in nodes:
            raise HQPError(f"node name {name!r} appears twice")
        args, kwargs = _decode(rec["args"], nodes), _decode(rec["kwargs"], nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise HQPError(f"node {name!r}: args must be a tuple and kwargs a dict")
        for key in kwargs:
            _identifier(key, f"keyword argument of node {name!r}")
        if op == "placeholder":
            _identifier(target, "input name")
            if args or kwargs:
                raise HQPError(f"input {name!r} carries a default value; hqp_fx never writes one")
        elif op == "output":
            if target != "output" or len(args) != 1 or kwargs:
                raise HQPError(f"malformed output node {name!r}")
        elif op == "get_attr" and isinstance(root.get(target), nn.Module):
            if not spec["modules"][target].get("user_module"):
                raise HQPError(f"node {name!r} reads module {target!r} whole; only a user module is read so")
        elif op == "get_attr":
            if _dotted(target, "attribute") not in tensors:
                raise HQPError(f"node {name!r} reads {target!r}, which the file holds no tensor for")
            root[target] = nn.Parameter(tensors[target]) if target in params else tensors[target]
        elif op == "call_module":
            if _dotted(target, "module") not in spec["modules"]:
                raise HQPError(f"node {name!r} calls module {target!r}, which the file does not describe")
        elif op == "call_method" and args and isinstance(args[0], fx.Node) and args[0].op == "get_attr" \
                and isinstance(root.get(args[0].target), nn.Module):
            owner = type(root[args[0].target])  # the caller's own module (a template), never code from the file
            if not _users_own_method(owner, _identifier(target, "method name")):
                raise HQPError(f"node {name!r} calls {target!r}, which is not a method {owner.__name__} defines "
                               "(torch's own nn.Module methods are never called from a file)")
        elif op == "call_method":
            _method(target)
            if not args or not isinstance(args[0], fx.Node):
                raise HQPError(f"node {name!r} calls .{target}() on something that is not a graph value")
        else:  # call_function
            target = _function(target)
            if target is getattr and (len(args) != 2 or kwargs or not isinstance(args[0], fx.Node)
                                      or args[1] not in LOADABLE_ATTRIBUTES):
                raise HQPError(f"node {name!r}: getattr is loadable only as a graph value's "
                               f"{sorted(LOADABLE_ATTRIBUTES)}, not getattr{args!r}")
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise HQPError(f"node name {name!r} clashes with a reserved name")
        nodes[name] = node
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(outputs) != 1 or outputs[0] is not list(graph.nodes)[-1]:
        raise HQPError("the graph must end in exactly one output node")
    try:
        graph.lint()
    except Exception as exc:
        raise HQPError(f"the graph is inconsistent: {exc}") from None

    # 2. the saved tensors must be exactly the rebuilt modules' (and get_attr's) tensors, shape for shape
    gm = fx.GraphModule(root, graph, class_name=class_name)
    expected = {k: tuple(v.shape) for k, v in (*gm.named_parameters(), *gm.named_buffers())}
    saved = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != saved:
        wrong = sorted(set(expected) ^ set(saved)) or [k for k in expected if expected[k] != saved[k]]
        raise HQPError(f"the saved tensors do not match the rebuilt modules (e.g. {wrong[:3]}); the file is damaged")
    for name, t in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if name in params:
            if not t.is_floating_point():
                raise HQPError(f"parameter {name!r} is not floating point; the file is damaged")
            setattr(owner, attr, nn.Parameter(t.clone(), requires_grad=name in grad))
        else:
            owner._buffers[attr] = t.clone()
    gm.train(training)

    # 3. only now run the validated graph, once, to attach shapes
    if examples:
        gm.meta[meta.EXAMPLE_INPUTS] = tuple(examples)
        try:
            propagate_shapes(gm, gm.meta[meta.EXAMPLE_INPUTS])
        except HQPError as exc:
            raise HQPError(f"the graph does not run on its saved example input: {exc}") from None
    gm.meta[meta.SOURCE_NAMES] = tuple(sources)
    return gm
