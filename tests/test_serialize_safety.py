"""hqp_fx.load on untrusted files: a hostile corpus and a fuzz of the saved format.

Every file under tests/hostile/ is a graph record built to run code, touch files or escape the allow-lists
while loading; each must be refused by name with an HQPError, and the sentinel file its payload would
create must never appear. The fuzz mutates a real saved model's graph record at random: whatever the
mutation, ``load`` returns a GraphModule or raises HQPError, and never executes anything.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hqp_fx
from hqp_fx.core import HQPError
from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass
from hqp_fx.serialize import FORMAT, LOADABLE_FUNCTIONS, LOADABLE_METHODS, VERSION

CORPUS = sorted((Path(__file__).parent / "hostile").glob("*.json"))


def _payload(graph: dict, **fields) -> dict:
    return {"format": FORMAT, "version": VERSION, "class_name": "GraphModule", "graph": json.dumps(graph),
            "parameters": {}, "requires_grad": [], "buffers": {}, "training": False,
            "example_inputs": [torch.randn(1, 3, 4, 4)], "source_names": [], **fields}


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "SENTINEL"
    yield path
    assert not path.exists(), "a hostile file executed code while loading"


def test_corpus_is_complete():
    names = {p.stem for p in CORPUS}
    required = {"exec", "eval", "open", "os_system", "subprocess_run", "torch_load", "torch_hub_load",
                "getattr_dunder", "method_reduce", "compile", "import", "torch_save", "load_library"}
    assert required <= names, f"missing hostile cases: {sorted(required - names)}"


@pytest.mark.parametrize("case", CORPUS, ids=lambda p: p.stem)
def test_hostile_file_is_refused_by_name(case, tmp_path, sentinel):
    spec = json.loads(case.read_text().replace("@SENTINEL@", str(sentinel)))
    path = tmp_path / "hostile.hqp"
    torch.save(_payload(spec["graph"]), path)
    with pytest.raises(HQPError) as info:
        hqp_fx.load(path)
    assert spec["refused"] in str(info.value), f"{case.stem} ({spec['why']}): {info.value}"
    assert str(path) in str(info.value)


def test_the_corpus_would_run_code_without_the_loader_checks(sentinel):
    """Control: the same exec node, built directly with torch.fx, does create the sentinel. So the corpus
    tests above can fail, and it is hqp_fx.load's validation that stops it."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(exec, (f"open({str(sentinel)!r}, 'w').write('x')",))
    graph.output(x)
    fx.GraphModule(nn.Module(), graph)(torch.zeros(1))
    assert sentinel.exists()
    sentinel.unlink()


def test_class_name_injection_is_refused(tmp_path):
    graph = json.loads((Path(__file__).parent / "hostile" / "exec.json").read_text())["graph"]
    graph["nodes"] = [graph["nodes"][0], graph["nodes"][-1]]  # a harmless identity graph
    path = tmp_path / "m.hqp"
    torch.save(_payload(graph, class_name="GraphModule(); import os"), path)
    with pytest.raises(HQPError, match="class name"):
        hqp_fx.load(path)


class _Reduce:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickled_code_is_refused(tmp_path, sentinel):
    evil = tmp_path / "evil.hqp"
    with open(evil, "wb") as f:
        pickle.dump({"format": FORMAT, "x": _Reduce(sentinel)}, f)
    with pytest.raises(HQPError, match="not a hqp_fx model file, or it is damaged"):
        hqp_fx.load(evil)
    # a whole pickled GraphModule (what torch.save(gm) writes) needs code to load: refused too
    gm = hqp_fx.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 8, 8))
    torch.save(gm, tmp_path / "pickled.hqp")
    with pytest.raises(HQPError, match="not a hqp_fx model file"):
        hqp_fx.load(tmp_path / "pickled.hqp")


def test_folder_and_missing_file_are_named(tmp_path):
    with pytest.raises(HQPError, match="is a folder"):
        hqp_fx.load(tmp_path)
    with pytest.raises(HQPError, match="does not exist"):
        hqp_fx.load(tmp_path / "nope.hqp")
    (tmp_path / "trunc.hqp").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(HQPError, match="trunc.hqp is not a hqp_fx model file, or it is damaged"):
        hqp_fx.load(tmp_path / "trunc.hqp")


def test_save_refuses_what_load_would_refuse(tmp_path):
    class Typed(nn.Module):
        def forward(self, x):
            return x.type(torch.float32)

    gm = hqp_fx.trace(Typed(), torch.randn(1, 3))
    with pytest.raises(HQPError, match="tensor method 'type'"):
        hqp_fx.save(gm, tmp_path / "t.hqp")
    assert not list(tmp_path.iterdir())


def test_tables_are_explicit():
    """No whole namespaces: nothing that evaluates, imports, spawns or does I/O, and every method is a
    public Tensor method."""
    forbidden = {"builtins.exec", "builtins.eval", "builtins.compile", "builtins.open", "builtins.__import__",
                 "posix.system", "torch.serialization.load", "torch.serialization.save", "torch.hub.load"}
    assert not forbidden & set(LOADABLE_FUNCTIONS)
    assert all(not m.startswith("_") and callable(getattr(torch.Tensor, m)) for m in LOADABLE_METHODS)
    assert all(n.startswith(("torch.", "_operator.", "math.", "torchvision.ops.")) or n == "builtins.getattr"
               for n in LOADABLE_FUNCTIONS)


# ---- fuzz ----------------------------------------------------------------------------------------------

class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = y + y.mean(dim=(2, 3), keepdim=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1).view(x.size(0), -1))


@pytest.fixture(scope="module")
def saved_small(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "small.hqp"
    hqp_fx.save(hqp_fx.trace(_Small(), torch.randn(1, 3, 8, 8)), path)
    return torch.load(path, weights_only=True)


_HOSTILE = ["builtins.exec", "builtins.eval", "builtins.open", "posix.system", "subprocess.run",
            "torch.serialization.load", "torch.hub.load", "__reduce__", "__class__", "__globals__", "type",
            "x); import os #", "a\") or __import__('os') or (\"", "placeholder", "get_attr", "call_module",
            "call_method", "call_function", "output", "conv", "bn", "fc", "x", "conv.weight"]
_KINDS = ["node", "tuple", "dict", "fn", "dtype", "device", "slice", "ellipsis", "memory_format", "other"]
_leaf = (st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True)
         | st.text(max_size=8) | st.sampled_from(_HOSTILE))
_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(_KINDS), inner, min_size=1, max_size=2), max_leaves=6)


def _paths(v, prefix=()):
    yield prefix
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, prefix + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, prefix + (i,))


def _mutate(tree, path, action, value):
    if not path:
        return value
    parent = tree
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "duplicate" and isinstance(parent, list):
        parent.insert(last, json.loads(json.dumps(parent[last])))
    else:
        parent[last] = value
    return tree


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_graph_records_never_run_code_or_crash(data, saved_small, tmp_path, sentinel):
    graph = json.loads(saved_small["graph"])
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = list(_paths(graph))
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(st.sampled_from(["replace", "delete", "duplicate"]), label="action")
        graph = _mutate(graph, path, action, data.draw(_value, label="value"))
        if not isinstance(graph, dict):
            break
    text = json.dumps(graph).replace("SENTINEL", str(sentinel))
    path = tmp_path / "fuzzed.hqp"
    torch.save({**saved_small, "graph": text}, path)
    try:
        gm = hqp_fx.load(path)
    except HQPError:
        return
    assert isinstance(gm, fx.GraphModule)


class _Gate(nn.Module):
    """Data-dependent control flow: untraceable unless kept as a leaf."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.scale if x.sum() > 0 else x


def test_user_leaf_modules_come_from_the_caller_never_from_the_file(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Gate(), nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    gm = hqp_fx.trace(model, x, leaf_modules=[_Gate])
    with torch.no_grad():
        gm.get_submodule("1").scale.fill_(3.0)  # trained weights: the file's, not the template's
    hqp_fx.save(gm, tmp_path / "g.hqp")
    with pytest.raises(HQPError, match=r"module '1' is a user module of type '.*_Gate': the file holds its tensors "
                                       r"but never its code; pass leaf_modules="):
        hqp_fx.load(tmp_path / "g.hqp")
    with pytest.raises(HQPError, match="user module"):  # a template of another class is not accepted
        hqp_fx.load(tmp_path / "g.hqp", leaf_modules={"1": nn.Identity()})
    back = hqp_fx.load(tmp_path / "g.hqp", leaf_modules=dict(model.named_modules()))
    assert torch.equal(back(x), gm(x)) and back.get_submodule("1").scale.item() == 3.0
    assert model[1].scale.item() == 2.0 and back.get_submodule("1") is not model[1]  # the template is copied


def test_an_opaque_decode_method_comes_from_the_callers_module(tmp_path):
    """``hqp_fx.trace`` keeps a detector's decode as a call of the head's own method: the file names the method,
    its code comes from the caller's module, and torch's own nn.Module methods cannot be called from a file."""
    from helpers import DecodeHead

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DecodeHead()).eval()
    x = torch.randn(1, 3, 6, 6)
    gm = hqp_fx.trace(model, x)
    ChannelDependencyPass()(gm)
    pruned = PruneChannelsPass({"1.box.0": [0, 3]})(gm).graph_module
    hqp_fx.save(pruned, tmp_path / "d.hqp")
    with pytest.raises(HQPError, match=r"module '1' is a user module of type '.*DecodeHead'"):
        hqp_fx.load(tmp_path / "d.hqp")
    back = hqp_fx.load(tmp_path / "d.hqp", leaf_modules=dict(model.named_modules()))
    with torch.no_grad():
        for a, e in zip(back(x), pruned(x)):
            assert torch.equal(a, e)
    assert back.get_submodule("1.box.0").out_channels == 6

    payload = torch.load(tmp_path / "d.hqp", weights_only=True)
    for method in ("apply", "register_forward_hook", "load_state_dict", "__init__"):
        payload["graph"] = payload["graph"].replace('"_decode"', f'"{method}"')
        torch.save(payload, tmp_path / "hostile.hqp")
        with pytest.raises(HQPError, match="not a method DecodeHead defines|plain Python identifier"):
            hqp_fx.load(tmp_path / "hostile.hqp", leaf_modules=dict(model.named_modules()))
        payload["graph"] = payload["graph"].replace(f'"{method}"', '"_decode"')
