"""INT8 quantization on CPU (issue #3): ONNX Runtime latency, file size, peak memory and CIFAR-10 accuracy.

    python benchmarks/quantize_speed.py [--data /tmp/cifar_full] [--out /tmp/quantize_speed.json]
        [--runs 100] [--rounds 3] [--threads 2] [--skip-inductor] [--skip-accuracy]

For two models, ``torchvision:resnet18`` (random init, 1x3x224x224, calibrated on 64 random-normal samples:
there is no ImageNet here) and ``cifar:resnet56`` (the real checkpoint, 1x3x32x32, calibrated on 512 CIFAR-10
training images), every variant is written as an ONNX file and timed with ``hqp_fx.measure.measure_onnx``
(ONNX Runtime CPU, a fresh process per model, ``--threads`` intra-op threads, 10 warm-ups, median of ``--runs``;
repeated ``--rounds`` times interleaved across the variants, the median of the round medians reported), with its
file size and peak memory (VmHWM of that process; ``session_rss_mb`` is the growth from loading and running it):

* ``fp32``: ``export_onnx`` of the float model;
* ``hqp-onnxruntime``: hqp_fx's ``onnxruntime`` preset (histogram calibration, reduce_range automatic);
* ``hqp-tensorrt``: hqp_fx's ``tensorrt`` preset (ORT latency informative only: the preset targets TensorRT);
* ``ort-qdq`` / ``ort-qdq-rr``: ONNX Runtime's own ``quantize_static`` (after ``quant_pre_process``) on the same
  FP32 ONNX, QDQ, per-channel, U8 activations / S8 weights, MinMax, the SAME calibration samples, without and
  with ``reduce_range``.

For every ONNX variant the op types of ORT's optimized graph (``optimized_model_filepath``) are counted, so a
latency difference can be traced to the kernels ORT actually runs. For resnet56 the top-1 on the full 10,000-image
CIFAR-10 test set is measured for FP32 (PyTorch and ORT), every INT8 ONNX file (through ``OrtModel``) and the
PyTorch models of the hqp presets. Finally (unless ``--skip-inductor``) ``torch.compile`` of the FP32 model vs
the ``x86-inductor`` preset, with ``torch._inductor.config.freezing = True`` (what inductor's int8 weight prepacking
needs), batch 1, median of ``--runs`` after 10 warm-ups, each variant compiled and timed in its own process.

All numbers go to a JSON file (``--out``, written atomically) and a table on stdout.
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import torch

from hqp_fx.data import BatchLoader, load_split, unpack_once
from hqp_fx.artifacts import write_json
from hqp_fx.engines.ort import OrtModel
from hqp_fx.measure import machine_description, measure_onnx, versions
from hqp_fx.models import build_model
from hqp_fx.lower_onnx import export_onnx
from hqp_fx.passes.quantize import QuantConfig, quantize, take_samples
from hqp_fx.train import evaluate

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESNET56_WEIGHTS = SHARED / "models/cifar-resnet/resnet56_cifar10jpeg.pt"
ONNX_VARIANTS = ("fp32", "hqp-onnxruntime", "hqp-tensorrt", "ort-qdq", "ort-qdq-rr")


# --------------------------------------------------------------------------------------------------- data


def cifar_splits(data: Path):
    """(train, test) ImageSets at 32x32; unpacks the shared tarballs into the cache when ``data`` lacks them."""
    train_dir, test_dir = data / "train", data / "test"
    if not train_dir.is_dir():
        train_dir = unpack_once(SHARED / "data/cifar10-jpeg/train.tar.gz") / "train"
    if not test_dir.is_dir():
        test_dir = unpack_once(SHARED / "data/cifar10-jpeg/test.tar.gz") / "test"
    train = load_split(train_dir, size=32)
    test = load_split(test_dir, classes=train.classes, size=32)
    return train, test


def load_model(spec: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """resnet18 with torchvision's random init (seed 0), or resnet20/56 with the real CIFAR-10 checkpoint."""
    if spec == "torchvision:resnet18":
        torch.manual_seed(0)
        built = build_model(spec)
    elif spec == "cifar:resnet56":
        built = build_model(spec, str(RESNET56_WEIGHTS))
    elif spec == "cifar:resnet20":
        built = build_model(spec, str(RESNET56_WEIGHTS.with_name("resnet20_cifar10jpeg.pt")))
    else:
        raise SystemExit(f"unsupported model {spec}; use torchvision:resnet18, cifar:resnet20 or cifar:resnet56")
    return built.model.eval(), built.input_shape


def logger():
    """``log(msg)``: print with the seconds since this call."""
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)
    return log


def random_samples(shape: tuple[int, ...], n: int, batch: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn((min(batch, n - i), *shape[1:]), generator=gen) for i in range(0, n, batch)]


# --------------------------------------------------------------------------------------------------- ORT quantizer


def ort_quantize_static(fp32_path: Path, out_path: Path, samples: list[torch.Tensor], reduce_range: bool) -> None:
    """ONNX Runtime's static QDQ quantizer on the same FP32 ONNX and the same samples, fed one image at a time."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": x[i:i + 1].numpy()} for x in samples for i in range(len(x))])

        def get_next(self):
            return next(self.items, None)

    pre = out_path.with_name(out_path.stem + "_pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink()


def optimized_op_counts(path: Path, threads: int) -> dict[str, int]:
    """Op types of the graph ORT actually runs (all graph optimizations, CPU provider), most frequent first."""
    import onnxruntime as ort

    opt_path = path.with_name(path.stem + "_ortopt.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(opt_path)
    options.log_severity_level = 3  # the "hardware specific optimizations" warning is expected: we only count ops
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = collections.Counter(n.op_type for n in onnx.load(str(opt_path)).graph.node)
    opt_path.unlink()
    return dict(counts.most_common())


# --------------------------------------------------------------------------------------------------- ONNX variants


def build_onnx_variants(model: torch.nn.Module, x: torch.Tensor, samples: list[torch.Tensor], folder: Path,
                        log, dynamic_batch: bool = False) -> tuple[dict[str, Path], dict[str, dict], dict[str, torch.nn.Module]]:
    """Write every ONNX variant; returns (paths, per-variant info, PyTorch INT8 models of the hqp presets)."""
    n = sum(len(s) for s in samples)
    paths, info, torch_models = {}, {}, {}
    paths["fp32"] = folder / "fp32.onnx"
    export_onnx(model, (x,), paths["fp32"], dynamic_batch=dynamic_batch)
    info["fp32"] = {}
    for backend in ("onnxruntime", "tensorrt"):
        name = f"hqp-{backend}"
        config = QuantConfig(backend=backend, calibration="histogram", num_samples=n)
        log(f"  {name}: quantize ({config.calibration}, {n} samples, reduce_range={config.reduce_range})")
        start = time.perf_counter()
        result = quantize(model, x, samples, config)
        seconds = time.perf_counter() - start
        paths[name] = folder / f"{name}.onnx"
        export_onnx(result.model, (x,), paths[name], dynamic_batch=dynamic_batch)
        torch_models[name] = result.model
        info[name] = {"reduce_range": config.reduce_range, "calibration": config.calibration, "samples": result.samples,
                      "output_sqnr_db": round(result.output_sqnr_db, 2), "quantize_s": round(seconds, 1),
                      "quantized_layers": len(result.quantized_layers), "float_layers": dict(result.float_layers)}
    for name, rr in (("ort-qdq", False), ("ort-qdq-rr", True)):
        log(f"  {name}: onnxruntime.quantization.quantize_static (MinMax, reduce_range={rr})")
        start = time.perf_counter()
        paths[name] = folder / f"{name}.onnx"
        ort_quantize_static(paths["fp32"], paths[name], samples, rr)
        info[name] = {"reduce_range": rr, "calibration": "minmax (ORT default)", "samples": n,
                      "quantize_s": round(time.perf_counter() - start, 1)}
    return paths, info, torch_models


def measure_variants(paths: dict[str, Path], shape: tuple[int, ...], args, log) -> dict[str, dict]:
    """measure_onnx of every variant, ``args.rounds`` times, interleaved (the order rotates each round) so a burst of
    load on this shared machine hits all variants alike; the headline is the median of the per-round medians."""
    names = list(paths)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rounds[name].append(measure_onnx(paths[name], shape, threads=args.threads, warmup=10, runs=args.runs))
    out = {}
    for name in names:
        first = rounds[name][0]
        stats = {"median_ms": statistics.median(s["median_ms"] for s in rounds[name]),
                 "p90_ms": statistics.median(s["p90_ms"] for s in rounds[name]),
                 "round_medians_ms": [round(s["median_ms"], 3) for s in rounds[name]],
                 "rounds_ms": [s["median_ms"] for s in rounds[name]],  # unrounded, for paired ratios
                 "size_mb": first["size_mb"], "threads": args.threads, "warmup": 10, "runs": args.runs,
                 "rounds": args.rounds, "peak_rss_mb": first["peak_rss_mb"], "session_rss_mb": first["session_rss_mb"]}
        stats["ort_optimized_ops"] = optimized_op_counts(paths[name], args.threads)
        out[name] = stats
        log(f"  {name}: {stats['median_ms']:.3f} ms (rounds {stats['round_medians_ms']}), {stats['size_mb']:.2f} MB, "
            f"peak RSS {stats['peak_rss_mb']:.0f} MB (session {stats['session_rss_mb']:.1f} MB)")
    return out


def accuracy(model, paths, torch_models, test, threads, log) -> dict[str, dict]:
    """Top-1 on the whole test set: FP32 (PyTorch and ORT), every INT8 ONNX file, the hqp PyTorch INT8 models."""
    loader = BatchLoader(test, 500)
    acc = {"fp32-pytorch": evaluate(model, loader, num_classes=10)}
    for name, path in paths.items():
        acc[f"{name}-ort"] = evaluate(OrtModel(path, threads), loader, num_classes=10)
        log(f"  {name} (ORT): top-1 {acc[f'{name}-ort']['top1']:.2f}")
    for name, m in torch_models.items():
        acc[f"{name}-pytorch"] = evaluate(m, loader, num_classes=10)
        log(f"  {name} (PyTorch): top-1 {acc[f'{name}-pytorch']['top1']:.2f}")
    ref = acc["fp32-pytorch"]["top1"]
    for v in acc.values():
        v["drop_vs_fp32_pytorch"] = round(ref - v["top1"], 2)
    return acc


# --------------------------------------------------------------------------------------------------- inductor


def time_module(fn, x: torch.Tensor, runs: int, warmup: int = 10) -> dict:
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * float(np.percentile(times, 90))}


def inductor_worker(spec: str, variant: str, blob: str, runs: int, threads: int) -> dict:
    """In a fresh process: torch.compile one variant (freezing on), time it; an error is returned, not raised."""
    import torch._inductor.config as inductor_config

    torch.set_num_threads(threads)
    inductor_config.freezing = True  # weight constant folding + prepacking: the int8 oneDNN lowering needs it
    data = torch.load(blob, weights_only=True)
    model, _ = load_model(spec)
    model.load_state_dict(data["state_dict"])
    samples = data["samples"]
    x = samples[0][:1].clone()
    out = {}
    try:
        if variant == "int8-x86-inductor":
            config = QuantConfig(backend="x86-inductor", calibration="histogram", num_samples=sum(map(len, samples)))
            out["reduce_range"] = config.reduce_range
            model = quantize(model, x, samples, config).model
        start = time.perf_counter()
        with torch.no_grad():
            compiled = torch.compile(model)
            y = compiled(x)  # the first call compiles
        out.update(compile_s=round(time.perf_counter() - start, 1), output_finite=bool(torch.isfinite(y).all()))
        out.update(time_module(compiled, x, runs), ok=True)
    except Exception as exc:  # noqa: BLE001 - any export/compile/lowering failure is a result to report
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        out.update(ok=False, error=f"{type(exc).__name__}: {first}")
        traceback.print_exc()
    return out


def inductor(spec: str, model, samples, args, log) -> dict:
    """torch.compile of the FP32 model vs the x86-inductor preset, each compiled and timed in its own process.

    One process per variant: compiling the FP32 model first made the int8 resnet56 compiled after it in the same
    process run at 528-536 ms per call here (three tries) instead of 6-8 ms alone (14.5 ms with
    OMP_WAIT_POLICY=PASSIVE, so spinning OpenMP threads are the likely cause); a shared process is not fair.
    """
    out = {"freezing": True, "isolation": "fresh process per variant"}
    with tempfile.TemporaryDirectory() as folder:
        blob = Path(folder) / "inputs.pt"
        torch.save({"state_dict": model.state_dict(), "samples": samples}, blob)
        for variant in ("fp32", "int8-x86-inductor"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--inductor-worker", spec, variant, str(blob),
                   "--runs", str(args.runs), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            last = proc.stdout.strip().splitlines()[-1:] or [""]
            try:
                stats = json.loads(last[0])
            except json.JSONDecodeError:
                err = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
                stats = {"ok": False, "error": f"worker exited with {proc.returncode}: {err[0]}"}
            out[variant] = stats
            log(f"  inductor {variant}: " + (f"{stats['median_ms']:.3f} ms (compile {stats['compile_s']} s)"
                                             if stats.get("ok") else f"FAILED {stats['error']}"))
    if out["fp32"].get("ok") and out["int8-x86-inductor"].get("ok"):
        out["speedup_int8_vs_fp32"] = out["fp32"]["median_ms"] / out["int8-x86-inductor"]["median_ms"]
    return out


# --------------------------------------------------------------------------------------------------- report


def run_model(spec: str, model, shape, samples, calibration_note, test, args, log) -> dict:
    log(f"== {spec} {tuple(shape)}; calibration: {calibration_note}")
    x = samples[0][:1].clone()
    keep = args.onnx_dir is not None
    folder = Path(args.onnx_dir) / spec.replace(":", "_") if keep else Path(tempfile.mkdtemp(prefix="hqp_qspeed_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        paths, info, torch_models = build_onnx_variants(model, x, samples, folder, log)
        result = {"input_shape": list(shape), "calibration": calibration_note, "variants": info}
        result["latency"] = measure_variants(paths, tuple(shape), args, log)
        fp32 = result["latency"]["fp32"]["median_ms"]
        result["speedup_vs_fp32"] = {k: fp32 / v["median_ms"] for k, v in result["latency"].items()}
        if test is not None and not args.skip_accuracy:
            result["accuracy"] = accuracy(model, paths, torch_models, test, args.threads, log)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    if not args.skip_inductor:
        result["inductor"] = inductor(spec, model, samples, args, log)
    return result


def print_table(results: dict) -> None:
    print("\n| model | variant | reduce_range | ORT median ms | p90 ms | speedup vs FP32 | size MB | peak RSS MB "
          "| session RSS MB | top-1 (ORT) | drop |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for spec, r in results["models"].items():
        for name in ONNX_VARIANTS:
            lat, acc = r["latency"][name], r.get("accuracy", {}).get(f"{name}-ort")
            rr = r["variants"][name].get("reduce_range", "-")
            top1 = f"{acc['top1']:.2f}" if acc else "-"
            drop = f"{acc['drop_vs_fp32_pytorch']:+.2f}" if acc else "-"
            print(f"| {spec} | {name} | {rr} | {lat['median_ms']:.3f} | {lat['p90_ms']:.3f} | "
                  f"{r['speedup_vs_fp32'][name]:.2f}x | {lat['size_mb']:.2f} | {lat['peak_rss_mb']:.0f} | "
                  f"{lat['session_rss_mb']:.0f} | {top1} | {drop} |")
    for spec, r in results["models"].items():
        if "accuracy" in r:
            print(f"\n{spec} top-1 (10,000 test images): " + ", ".join(
                f"{k} {v['top1']:.2f}" for k, v in r["accuracy"].items()))
        ind = r.get("inductor")
        if ind:
            cells = [f"{k} " + (f"{v['median_ms']:.3f} ms (compile {v['compile_s']} s)" if v.get("ok") else v["error"])
                     for k, v in ind.items() if isinstance(v, dict)]
            print(f"{spec} torch.compile (freezing): " + "; ".join(cells))


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/tmp/cifar_full", help="folder holding CIFAR-10 train/ and test/ ImageFolders")
    ap.add_argument("--out", default="/tmp/quantize_speed.json")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measure_onnx rounds per ONNX variant")
    ap.add_argument("--skip-inductor", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true", help="latency/size/memory only (no 10k test set)")
    ap.add_argument("--onnx-dir", help="keep the ONNX files here (default: a temporary folder, removed)")
    ap.add_argument("--models", nargs="+", default=["torchvision:resnet18", "cifar:resnet56"])
    ap.add_argument("--inductor-worker", nargs=3, metavar=("SPEC", "VARIANT", "INPUTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inductor_worker:
        print(json.dumps(inductor_worker(*args.inductor_worker, args.runs, args.threads)))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    log = logger()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine_description(), "versions": versions(),
               "threads": args.threads, "runs": args.runs, "warmup": 10, "rounds": args.rounds, "load_before": load_average(),
               "models": {}}
    for spec in args.models:
        model, shape = load_model(spec)
        if spec == "torchvision:resnet18":
            samples = random_samples(shape, 64)
            note, test = "64 random-normal samples (seed 0; random-init weights, no ImageNet here)", None
        else:
            train, test = cifar_splits(Path(args.data))
            samples = take_samples(BatchLoader(train, 64, shuffle=True, seed=0), 512)
            note = "512 CIFAR-10 training images (BatchLoader shuffle seed 0, ImageNet mean/std)"
        results["models"][spec] = run_model(spec, model, shape, samples, note, test, args, log)
    results["load_after"] = load_average()
    results["seconds"] = round(time.time() - start, 1)
    write_json(Path(args.out), results)
    print_table(results)
    print(f"\nload before: {results['load_before']}\nload after:  {results['load_after']}\nJSON: {args.out}")


if __name__ == "__main__":
    main()
