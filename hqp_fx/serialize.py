"""Save and load a (pruned) GraphModule without pickling code.

``torch.save(gm)`` pickles the module's classes and its generated ``forward``; loading that
needs ``weights_only=False``, i.e. running arbitrary code. Instead the file holds only data:
the graph as plain records (ops, targets by qualified name, args), each leaf module as its
``torch.nn`` class name plus constructor arguments, and the tensors. Targets and classes are
resolved on load against an allow-list of namespaces, and the file is read with
``torch.load(..., weights_only=True)``. ``torch.export.save`` was considered: it serialises
safely too, but reloads as an ExportedProgram whose module loses the leaf ``nn.Module``s
(Conv2d, BatchNorm2d, ...) that fine-tuning and further hqp_fx passes rely on.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from . import meta
from .core import HQPError, atomic_torch_save
from .trace import propagate_shapes

__all__ = ["save", "load"]

FORMAT = "hqp_fx.graph_module"
VERSION = 1
_TARGET_NAMESPACES = ("torch", "_operator", "operator", "math", "builtins", "torchvision.ops")
_MODULE_NAMESPACES = ("torch.nn.",)
_SKIP_INIT = {"self", "device", "dtype", "args", "kwargs"}


def _qualname(obj: Any) -> str:
    mod = getattr(obj, "__module__", None) or ""
    # classes may be nested (__qualname__); torch's builtins report a private class there, so use __name__
    name = obj.__qualname__ if isinstance(obj, type) else getattr(obj, "__name__", "")
    return f"{mod}.{name}"


def _resolve(qualname: str, namespaces: tuple[str, ...]) -> Any:
    if not any(qualname == ns or qualname.startswith(ns + ".") or qualname.startswith(ns) and ns.endswith(".")
               for ns in namespaces):
        raise HQPError(f"refusing to load {qualname!r}: only names under {namespaces} are allowed")
    parts = qualname.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for p in parts[cut:]:
            obj = getattr(obj, p)
        return obj
    raise HQPError(f"cannot resolve {qualname!r}")


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


def _decode(v: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(v, list):
        return [_decode(x, nodes) for x in v]
    if not isinstance(v, dict):
        return v
    (kind, val), = v.items()
    if kind == "node":
        return nodes[val]
    if kind == "tuple":
        return tuple(_decode(x, nodes) for x in val)
    if kind == "dict":
        return {k: _decode(x, nodes) for k, x in val.items()}
    if kind == "slice":
        return slice(*[_decode(x, nodes) for x in val])
    if kind == "ellipsis":
        return Ellipsis
    if kind == "dtype":
        return getattr(torch, val)
    if kind == "device":
        return torch.device(val)
    if kind == "memory_format":
        return getattr(torch, val)
    if kind == "fn":
        return _resolve(val, _TARGET_NAMESPACES)
    raise HQPError(f"unknown encoded value {v!r}")


def _module_spec(name: str, mod: nn.Module) -> dict:
    cls = type(mod)
    qual = _qualname(cls)
    if not qual.startswith(_MODULE_NAMESPACES):
        raise HQPError(f"cannot save leaf module {name!r} of type {qual}: only torch.nn modules can be rebuilt "
                       "without pickling code; trace without making it a leaf module")
    init = {}
    for pname, param in inspect.signature(cls.__init__).parameters.items():
        if pname in _SKIP_INIT or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
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


def _build_module(spec: dict) -> nn.Module:
    cls = _resolve(spec["type"], tuple(ns.rstrip(".") for ns in _MODULE_NAMESPACES))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise HQPError(f"{spec['type']} is not a torch.nn.Module class")
    return cls(**{k: _decode(v, {}) for k, v in spec["init"].items()})


def save(gm: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``gm`` (graph, leaf modules, parameters, buffers) to one file, atomically."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"hqp_fx.save expects a torch.fx.GraphModule (from hqp_fx.trace or a pass), got {type(gm).__name__}")
    nodes, modules = [], {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function":
            target = _qualname(target)
            if _resolve(target, _TARGET_NAMESPACES) is not node.target:
                raise HQPError(f"cannot save node {node.format_node()}: {target} does not resolve back to the same function")
        elif node.op == "call_module" and target not in modules:
            modules[target] = _module_spec(target, gm.get_submodule(target))
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


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Rebuild a GraphModule written by ``save``; never unpickles code (``weights_only=True``)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise HQPError(f"{path} is not a hqp_fx model file (written by hqp_fx.save)")
    if payload["version"] > VERSION:
        raise HQPError(f"{path} was written by a newer hqp_fx (format {payload['version']}); upgrade hqp_fx")
    spec = json.loads(payload["graph"])
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    root: dict[str, Any] = {}
    for qual, mspec in spec["modules"].items():
        root[qual] = _build_module(mspec)
    tensors = {**payload["buffers"], **payload["parameters"]}
    for rec in spec["nodes"]:
        op, target = rec["op"], rec["target"]
        args, kwargs = _decode(rec["args"], nodes), _decode(rec["kwargs"], nodes)
        if op == "call_function":
            target = _resolve(target, _TARGET_NAMESPACES)
        if op == "get_attr":
            root[target] = nn.Parameter(tensors[target]) if target in payload["parameters"] else tensors[target]
        node = graph.create_node(op, target, tuple(args), kwargs, name=rec["name"])
        nodes[rec["name"]] = node
    gm = fx.GraphModule(root, graph, class_name=payload["class_name"])
    grad = set(payload["requires_grad"])
    current = dict(gm.named_parameters())
    current_buffers = dict(gm.named_buffers())
    if set(current) != set(payload["parameters"]) or set(current_buffers) != set(payload["buffers"]):
        raise HQPError(f"{path}: the saved tensors do not match the rebuilt modules; the file is damaged")
    for name, t in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if name in payload["parameters"]:
            setattr(owner, attr, nn.Parameter(t.clone(), requires_grad=name in grad))
        else:
            owner._buffers[attr] = t.clone()
    gm.train(payload["training"])
    if payload["example_inputs"]:
        gm.meta[meta.EXAMPLE_INPUTS] = tuple(payload["example_inputs"])
        propagate_shapes(gm, gm.meta[meta.EXAMPLE_INPUTS])
    gm.meta[meta.SOURCE_NAMES] = tuple(payload["source_names"])
    return gm
