"""Pass infrastructure: GraphPass, Pipeline, instruments, errors and the graph printout.

A GraphPass is a ``torch.fx.passes.infra.pass_base.PassBase``, so torch's own
``PassManager`` runs it unchanged; ``Pipeline`` adds what PassManager lacks: a check at
construction that every pass's required metadata is provided by an earlier pass, and
instruments that print, dump or time the graph after each pass (after TVM's
``PassInstrument``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from . import meta

__all__ = [
    "HQPError",
    "PassError",
    "GraphPass",
    "PassResult",
    "Pipeline",
    "Instrument",
    "PrintInstrument",
    "DumpInstrument",
    "TimingInstrument",
    "format_graph",
]


class HQPError(Exception):
    """Base class of every error hqp_fx raises on purpose."""


class PassError(HQPError):
    """A pass cannot run on this graph; the message names the pass, the node and the fix."""


class GraphPass(PassBase):
    """Base class of hqp_fx passes.

    Subclasses set ``required_meta`` (gm.meta keys that must exist before the pass runs),
    ``provided_meta`` (keys the returned module carries) and ``invalidated_meta`` (keys the returned
    module no longer carries: a pass that rewrites shapes makes the channel analysis stale), and
    implement ``call(gm) -> PassResult``. ``requires`` checks the input and ``ensures`` checks the
    *returned* module (torch's ``PassBase`` would check the input again). ``modified`` says whether
    the returned graph differs from the input: analysis passes report False, a pass with nothing to
    do returns its input with False.
    """

    required_meta: tuple[str, ...] = ()
    provided_meta: tuple[str, ...] = ()
    invalidated_meta: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        self.requires(graph_module)
        result = self.call(graph_module)
        self.ensures(result.graph_module)
        return result

    def ensures(self, graph_module: fx.GraphModule) -> None:
        missing = [k for k in self.provided_meta if k not in graph_module.meta]
        if missing:
            raise PassError(f"{self.name} promised gm.meta keys {missing} on the module it returns but did not write "
                            "them; this is a bug in the pass")

    def requires(self, graph_module: fx.GraphModule) -> None:
        if not isinstance(graph_module, fx.GraphModule):
            raise PassError(
                f"{self.name} needs a torch.fx.GraphModule, got {type(graph_module).__name__}; "
                "build one with hqp_fx.trace(model, example_inputs)"
            )
        missing = [k for k in self.required_meta if k not in graph_module.meta]
        if missing:
            raise PassError(
                f"{self.name} needs gm.meta keys {missing}; run a pass that provides them first "
                f"(see hqp_fx.core.Pipeline for a checked order)"
            )

    def __repr__(self) -> str:
        return f"{self.name}()"


class Instrument:
    """Hook called around every pass of a Pipeline (no-ops by default)."""

    def before_pass(self, pass_: GraphPass, gm: fx.GraphModule) -> None:  # noqa: B027
        pass

    def after_pass(self, pass_: GraphPass, result: PassResult) -> None:  # noqa: B027
        pass


class PrintInstrument(Instrument):
    """Print ``format_graph`` after each pass (to a stream, default stdout)."""

    def __init__(self, stream=None):
        self.stream = stream

    def after_pass(self, pass_, result):
        print(f"=== after {pass_.name} (modified={result.modified}) ===", file=self.stream)
        print(format_graph(result.graph_module), file=self.stream)


class DumpInstrument(Instrument):
    """Write ``NN_PassName.txt`` with ``format_graph`` after each pass into a folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._count = 0

    def after_pass(self, pass_, result):
        self.folder.mkdir(parents=True, exist_ok=True)
        self._count += 1
        path = self.folder / f"{self._count:02d}_{pass_.name}.txt"
        atomic_write_text(path, format_graph(result.graph_module) + "\n")


class TimingInstrument(Instrument):
    """Collect wall time per pass in ``self.timings`` as (pass name, seconds)."""

    def __init__(self):
        self.timings: list[tuple[str, float]] = []
        self._start = 0.0

    def before_pass(self, pass_, gm):
        self._start = time.perf_counter()

    def after_pass(self, pass_, result):
        self.timings.append((pass_.name, time.perf_counter() - self._start))


class Pipeline:
    """An ordered list of GraphPasses whose metadata contract is checked at construction: every
    pass's required keys must be provided by the input or an earlier pass and not invalidated since.

    ``available`` names gm.meta keys the input module already carries (``hqp_fx.trace``
    provides ``hqp.example_inputs`` and ``hqp.source_names``).
    """

    def __init__(
        self,
        passes: Sequence[GraphPass],
        *,
        instruments: Iterable[Instrument] = (),
        available: Iterable[str] = (meta.EXAMPLE_INPUTS, meta.SOURCE_NAMES),
    ):
        have = set(available)
        dropped: dict[str, str] = {}  # key -> the entry that invalidated it
        for i, p in enumerate(passes):
            if not isinstance(p, GraphPass):
                raise PassError(f"pipeline entry {i} is {p!r}, not a hqp_fx GraphPass")
            missing = [k for k in p.required_meta if k not in have]
            stale = [k for k in missing if k in dropped]
            if stale:
                raise PassError(
                    f"pipeline entry {i} ({p.name}) requires {stale}, which {dropped[stale[0]]} invalidates; run the "
                    "pass that provides them (e.g. ChannelDependencyPass) again after it")
            if missing:
                raise PassError(
                    f"pipeline entry {i} ({p.name}) requires {missing}, which no earlier pass provides; "
                    f"put a pass that provides them (e.g. ChannelDependencyPass for {meta.CHANNEL_GROUPS!r}) before it"
                )
            for k in p.invalidated_meta:
                if k not in p.provided_meta:
                    have.discard(k)
                    dropped[k] = f"entry {i} ({p.name})"
            have.update(p.provided_meta)
            for k in p.provided_meta:
                dropped.pop(k, None)
        self.passes = list(passes)
        self.instruments = list(instruments)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for p in self.passes:
            for ins in self.instruments:
                ins.before_pass(p, gm)
            result = p(gm)
            for ins in self.instruments:
                ins.after_pass(p, result)
            gm = result.graph_module
            modified |= result.modified
        return PassResult(gm, modified)


def _shape_str(node: fx.Node) -> str:
    tm = node.meta.get("tensor_meta")
    if tm is None:
        return "-"
    if hasattr(tm, "shape"):
        return "x".join(str(s) for s in tm.shape) or "scalar"
    if isinstance(tm, (tuple, list)):
        return "(" + ", ".join(_shape_str_meta(t) for t in tm) + ")"
    return "-"


def _shape_str_meta(tm) -> str:
    return "x".join(str(s) for s in tm.shape) if hasattr(tm, "shape") else "-"


def _target_str(node: fx.Node) -> str:
    if node.op == "call_function":
        t = node.target
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__name__", str(t))
        return f"{mod}.{name}" if mod and mod not in ("builtins",) else name
    return str(node.target)


def format_graph(gm: fx.GraphModule) -> str:
    """One deterministic line per node: name, op, target, output shape and channel groups."""
    rows = []
    for node in gm.graph.nodes:
        target = _target_str(node)
        if node.op == "call_module":
            target += f" [{type(gm.get_submodule(node.target)).__name__}]"
        groups = node.meta.get(meta.NODE_CHANNEL_GROUP)
        rows.append((node.name, node.op, target, _shape_str(node), ",".join(groups) if groups else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    lines = []
    for r in rows:
        line = "  ".join(r[i].ljust(widths[i]) for i in range(4))
        lines.append((line + ("  groups=" + r[4] if r[4] else "")).rstrip())
    return "\n".join(lines)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` and rename the result over ``path``: readers see the old or the complete new file,
    never a partial one, and a failed write leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")  # the suffix: writers that key on it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
