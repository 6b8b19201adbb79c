"""What one op rule is (``OpRule``) and the small argument helpers every rule uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch.fx as fx

__all__ = ["OpRule", "NodeEdit", "arg", "weight_name", "run_call"]


@dataclass(frozen=True)
class NodeEdit:
    """A function or method node's new call: ``target`` (a callable makes it call_function, a str call_method)
    with ``args`` and ``kwargs``. Rewrites return edits instead of changing the node, so PruneChannelsPass can
    check them all before it changes anything."""

    target: Any
    args: tuple
    kwargs: dict

    @property
    def op(self) -> str:
        return "call_function" if callable(self.target) else "call_method"

    @classmethod
    def of(cls, node: fx.Node) -> "NodeEdit":
        return cls(node.target, tuple(node.args), dict(node.kwargs))

    def set(self, index: int, name: str, value: Any) -> "NodeEdit":
        """This call with one argument replaced where it was given (by position, else as keyword ``name``)."""
        if len(self.args) > index:
            return NodeEdit(self.target, self.args[:index] + (value,) + self.args[index + 1:], self.kwargs)
        return NodeEdit(self.target, self.args, {**self.kwargs, name: value})


@dataclass(frozen=True)
class OpRule:
    """Everything hqp_fx knows about one op, in one place.

    - ``functions`` / ``methods`` / ``modules``: what it matches (call_function targets, call_method names,
      call_module classes by isinstance).
    - ``label(p, node)``: the analysis rule, run by ChannelDependencyPass's propagator ``p``; returns the
      node's label tensor (see ``hqp_fx.passes.dependency``).
    - ``rewrite(node, kept) -> NodeEdit | None``: the new call of a function/method node once channels are
      removed (``kept`` is PruneChannelsPass's ``KeptChannels``); None leaves the node as it is.
    - ``fix_module(module, node, kept) -> dict``: the module attributes to set after its tensors are sliced.
    - ``moves_data``: the output is a rearranged copy of the input (view, cat, getitem, ...); PruneChannelsPass
      re-runs such ops on the surviving labels to check its rewrite.
    - ``branch``: the op's part in depth pruning: "consumer" (a layer reducing over its input channels, whose
      output is its bias when they are all gone) or "meeting" (where a removed branch's constant may join the
      live net: an add, sub or mul that does not write in place).
    """

    name: str
    label: Callable[[Any, fx.Node], Any]
    functions: frozenset = frozenset()
    methods: frozenset = frozenset()
    modules: tuple[type, ...] = ()
    rewrite: Callable[[fx.Node, Any], NodeEdit | None] | None = None
    fix_module: Callable[[Any, fx.Node, Any], dict[str, Any]] | None = None
    moves_data: bool = False
    branch: Literal["consumer", "meeting"] | None = None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of a call, passed by position or as keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def weight_name(node: Any) -> str | None:
    """The parameter a weight argument reads (``get_attr``), None for no argument, "" for a computed tensor."""
    if node is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node.target
    return ""


def index_dims(entries: tuple, ndim: int) -> list[tuple[int, int]]:
    """``(position in entries, dim of the indexed tensor)`` for each entry of ``x[entries]`` that reads a dim:
    ``None`` adds a dim and reads none, ``Ellipsis`` spans the dims the other entries leave."""
    explicit = sum(1 for e in entries if e is not None and e is not Ellipsis)
    found, dim = [], 0
    for pos, e in enumerate(entries):
        if e is Ellipsis:
            dim += ndim - explicit
        elif e is not None:
            found.append((pos, dim))
            dim += 1
    return found


def run_call(op: str, target: Any, args: tuple, kwargs: dict, modules: dict) -> Any:
    """Run one call's op (``op`` and ``target`` as in an fx node) on the given arguments: labels, sizes or tensors."""
    if op == "call_function":
        return target(*args, **kwargs)
    if op == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    return modules[target](*args, **kwargs)
