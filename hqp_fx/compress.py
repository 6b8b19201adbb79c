"""The whole HQP job: prune under delta_max, quantize the accepted model, export, verify, measure, report.

``compress`` writes into a staging folder (see ``deploy.stage_output``); round checkpoints live next to the output
folder in ``<out>.checkpoints`` so ``resume`` survives a killed run, and are removed once the job succeeds.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from . import meta
from .core import atomic_write, atomic_write_text
from .count import count_macs, count_params
from .data import BatchLoader, ImageSet
from .deploy import OrtModel, measure_alternating, measure_onnx, ship_quantized, versions, write_json
from .hqp import HQPConfig, PruneResult, RoundRecord, prune_loop
from .latency import LatencyModel
from .passes.onnx import export_onnx
from .passes.quantize import QuantConfig, quantize
from .serialize import save
from .train import FinetuneConfig, evaluate, finetune

__all__ = ["CompressConfig", "compress", "onnx_latency", "HQP_JSON_SCHEMA"]

HQP_JSON_SCHEMA = json.loads(resources.files("hqp_fx").joinpath("hqp.schema.json").read_text())


@dataclass(frozen=True)
class CompressConfig:
    prune: HQPConfig = field(default_factory=HQPConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    recover_epochs: float = 0.0  # a final, longer fine-tune of the pruned model (same optimizer settings); 0: none
    quant: QuantConfig = field(default_factory=QuantConfig)
    batch_size: int = 128
    augment: bool = True  # random crop + flip while fine-tuning
    calib_images_per_class: int = 50
    val_fraction: float = 0.1  # without an explicit validation split: this share of train is held out for decisions
    val_max_images: int = 5000
    ablation: bool = False  # also measure quantize-only (dense INT8)
    hybrid: bool = True  # keep sensitive layers in FP when INT8 would break delta_max
    threads: int = 2
    latency_runs: int = 100
    latency_rounds: int = 3  # the variants are timed in alternating rounds: a slow spell of the machine hits all

    def __post_init__(self):
        if not 0 < self.val_fraction < 1 or self.val_max_images < 1:
            raise ValueError(f"val_fraction must be in (0, 1) and val_max_images >= 1, got {self.val_fraction}, "
                             f"{self.val_max_images}")
        if self.latency_rounds < 1:
            raise ValueError(f"latency_rounds must be >= 1, got {self.latency_rounds}")
        if self.recover_epochs < 0:
            raise ValueError(f"recover_epochs must be >= 0 (0: no recovery fine-tune), got {self.recover_epochs}")


def onnx_latency(example: torch.Tensor, threads: int = 2, runs: int = 100, *, quant: QuantConfig | None = None,
                 calibration: list | None = None) -> Callable[[nn.Module], float]:
    """A ``latency_fn`` for ``prune_loop``: the model's ONNX Runtime CPU latency in ms (``measure_onnx``).

    With ``quant`` the model is first quantized by it on ``calibration``, so the loop's latency target is judged on
    the INT8 file it will ship: ORT's int8 and fp32 kernels reward different channel counts
    (``benchmarks/ort_channel_steps.py``).
    """
    if quant is not None and not calibration:
        raise ValueError("onnx_latency with quant needs calibration batches to quantize each candidate")

    def measure(model: nn.Module) -> float:
        if quant is not None:
            model = quantize(model, example, calibration, quant).model
        with tempfile.TemporaryDirectory(prefix="hqp_latency_") as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(model, (example,), path)
            return measure_onnx(path, tuple(example.shape), threads=threads, runs=runs)["median_ms"]
    return measure


def compress(model: nn.Module, example: torch.Tensor, train: ImageSet, test: ImageSet, config: CompressConfig,
             stage: Path, *, validation: ImageSet | None = None, checkpoint_dir: Path | None = None,
             resume: bool = False, progress: Callable[[str], None] = lambda msg: None,
             on_round: Callable[[RoundRecord], None] | None = None, leaf_modules: tuple = (),
             fingerprint: dict | None = None, validation_source: str = "given by the caller") -> dict:
    """Run HQP on ``model`` and write every artifact into ``stage``; returns the ``hqp.json`` content.

    Every decision (accept/rollback, the recovery, the hybrid fallback's budget) is made on ``validation``; when it
    is None, a stratified ``config.val_fraction`` of ``train`` is held out for it and never trained or calibrated
    on. ``test`` is only reported, beside the validation figures. ``model`` itself is left untouched (its mode
    included): a frozen copy is exported as the dense baseline and, with ``config.finetune.distill`` > 0, is the
    teacher of every fine-tuning round. ``leaf_modules`` are kept opaque while tracing (``hqp_fx.trace``). The
    checkpoints' run fingerprint covers the data and the fine-tune settings besides what ``prune_loop`` records,
    plus the caller's ``fingerprint`` entries (e.g. the model spec). ``validation_source`` says, for the report,
    where a given ``validation`` came from.
    """
    source = validation_source
    if validation is None:  # a checkpoint trained on all of train has seen these images: optimistic, but not test
        train, validation = train.hold_out(config.val_fraction, config.val_max_images, seed=config.prune.seed)
        source = (f"held out from the training images (stratified, {config.val_fraction:g} of each class, at most "
                  f"{config.val_max_images}, seed {config.prune.seed})")
    dense = copy.deepcopy(model).eval().requires_grad_(False)
    teacher = dense if config.finetune.distill > 0 else None
    val_loader, test_loader = BatchLoader(validation, 500), BatchLoader(test, 500)
    calibration = list(BatchLoader(train.subset(config.calib_images_per_class), 64, shuffle=True,
                                   seed=config.prune.seed))

    def finetune_fn(m: nn.Module, rnd: int) -> None:
        progress(f"round {rnd}: fine-tuning {config.finetune.epochs:g} epoch(s)")
        finetune(m, BatchLoader(train, config.batch_size, shuffle=True, augment=config.augment,
                                seed=config.prune.seed * 1000 + rnd), config.finetune, teacher=teacher)

    def evaluate_fn(m: nn.Module) -> dict:
        return evaluate(m, val_loader, num_classes=len(validation.classes))

    def recover_fn(m: nn.Module) -> None:
        progress(f"recovery: fine-tuning the pruned model {config.recover_epochs:g} epoch(s)")
        loader = BatchLoader(train, config.batch_size, shuffle=True, augment=config.augment,
                             seed=config.prune.seed * 1000 + config.prune.max_rounds)  # a seed no round uses
        finetune(m, loader, replace(config.finetune, epochs=config.recover_epochs), teacher=teacher)

    # a latency target is judged on the INT8 file when ORT is the deployment engine; the other backends' engines
    # (TensorRT, inductor) are not what ORT measures, so their rounds are timed as FP32 in ORT, a proxy
    latency_quant = config.quant if config.quant.backend == "onnxruntime" else None
    identity = {"data.train": train.digest(), "data.validation": validation.digest(),
                **{f"finetune.{k}": v for k, v in asdict(config.finetune).items()}, "batch_size": config.batch_size,
                "augment": config.augment, "calib_images_per_class": config.calib_images_per_class,
                **({"latency.quant": asdict(latency_quant) if latency_quant else None,
                    "latency.threads": config.threads} if config.prune.target_latency is not None else {}),
                **(fingerprint or {})}
    def engine_model(gm):
        progress("latency model: timing every conv/linear layer in ONNX Runtime (int8) on a grid of channel counts")
        return LatencyModel.measure(gm, threads=config.threads, align=config.prune.align,
                                    reduce_range=bool(config.quant.reduce_range) and config.quant.backend != "tensorrt",
                                    progress=progress)

    progress("pruning: measuring the dense baseline")
    pruned: PruneResult = prune_loop(model, example, calibration=calibration, finetune_fn=finetune_fn,
                                     evaluate_fn=evaluate_fn, config=config.prune, checkpoint_dir=checkpoint_dir,
                                     resume=resume, on_round=on_round, leaf_modules=leaf_modules,
                                     fingerprint=identity if checkpoint_dir is not None else None,
                                     recover_fn=recover_fn if config.recover_epochs > 0 else None,
                                     latency_fn=onnx_latency(example, config.threads, config.latency_runs,
                                                             quant=latency_quant, calibration=calibration),
                                     latency_model=engine_model if config.prune.select == "latency" else None)
    save(pruned.model, stage / "model_pruned.hqp")
    progress("exporting the dense FP32 baseline")
    dense_onnx = stage / "model_dense_fp32.onnx"
    export_onnx(dense, (example,), dense_onnx)
    budget_left = config.prune.delta_max - (pruned.baseline["top1"] - pruned.final["top1"])  # on validation
    shipped = ship_quantized(pruned.model, example, calibration, test_loader, config.quant, stage,
                             max_drop=max(0.0, budget_left) if config.hybrid else None, validation=val_loader,
                             threads=config.threads, runs=config.latency_runs, progress=progress)
    ship = shipped.report
    progress("evaluating the dense model on the test split")
    dense_test = evaluate(dense, test_loader, num_classes=len(test.classes))
    on_val = ship["accuracy"]["validation"]
    variants = {
        "dense_fp32": {"top1": dense_test["top1"], "val_top1": pruned.baseline["top1"]},
        "prune_only_fp32": {"top1": ship["accuracy"]["fp32"]["top1"], "val_top1": on_val["fp32"]["top1"]},
        "hqp_int8": {"top1": ship["accuracy"]["int8_onnxruntime"]["top1"],
                     "val_top1": on_val["int8_onnxruntime"]["top1"]},
    }
    files = {"dense_fp32": dense_onnx, "prune_only_fp32": stage / "model_fp32.onnx",
             "hqp_int8": stage / "model_int8.onnx"}
    if config.ablation:
        progress("ablation: quantize-only (dense INT8)")
        dense_int8 = quantize(model, example, calibration, config.quant)
        files["quantize_only_int8"] = path = stage / "model_dense_int8.onnx"
        export_onnx(dense_int8.model, (example,), path)
        variants["quantize_only_int8"] = {
            "top1": evaluate(OrtModel(path, config.threads), test_loader)["top1"],
            "val_top1": evaluate(OrtModel(path, config.threads), val_loader)["top1"]}
    progress(f"timing every variant in ONNX Runtime, {config.latency_rounds} alternating rounds")
    for name, stats in measure_alternating(files, tuple(example.shape), threads=config.threads,
                                           runs=config.latency_runs, rounds=config.latency_rounds).items():
        variants[name].update(_lat(stats), rounds_ms=stats["rounds_ms"])
    base = variants["dense_fp32"]
    for v in variants.values():
        v["drop"] = base["top1"] - v["top1"]
        v["val_drop"] = base["val_top1"] - v["val_top1"]
        v["speedup"] = _paired_ratio(base, v)
        v["compression"] = base["size_mb"] / v["size_mb"]
    final_drop = variants["hqp_int8"]["drop"]
    macs = count_macs(pruned.model, meta.example_inputs(pruned.model))
    params = count_params(pruned.model)
    report = {
        "schema": "hqp_fx/hqp.json/1",
        "delta_max": config.prune.delta_max,
        "within_delta_max": final_drop <= config.prune.delta_max,
        "criterion": config.prune.criterion,
        "seed": config.prune.seed,
        "splits": {"train": len(train), "validation": len(validation), "test": len(test),
                   "validation_source": source,
                   "protocol": "rounds, the recovery and the hybrid fallback are decided on the validation split; "
                               "the test split is only reported"},
        "accuracy": {"dense_fp32": dense_test, "pruned_fp32": ship["accuracy"]["fp32"],
                     "hqp_int8_onnxruntime": ship["accuracy"]["int8_onnxruntime"], "final_drop": final_drop,
                     "validation": {"dense_fp32": pruned.baseline, "pruned_fp32": on_val["fp32"],
                                    "hqp_int8_onnxruntime": on_val["int8_onnxruntime"],
                                    "final_drop": variants["hqp_int8"]["val_drop"]}},
        "compression": {"macs": [pruned.baseline_macs, macs], "params": [pruned.baseline_params, params],
                        "macs_reduction": pruned.baseline_macs / macs, "params_reduction": pruned.baseline_params / params,
                        "size_mb": [base["size_mb"], variants["hqp_int8"]["size_mb"]]},
        "variants": variants,
        "hqp_vs_quantize_only": (_paired_ratio(variants["quantize_only_int8"], variants["hqp_int8"])
                                 if "quantize_only_int8" in variants else None),
        "rounds": [asdict(r) for r in pruned.history],
        "round_latency": (f"{'INT8 (' + config.quant.backend + ' preset)' if latency_quant else 'FP32'} model in ONNX "
                          "Runtime CPU, ms; measured on accepted rounds when a latency target is set or the selection "
                          "is by latency"),
        "latency_model": _prediction_error(pruned.history),
        "stop_reason": pruned.stop_reason,
        "recovery": pruned.recovery and {**pruned.recovery, "epochs": config.recover_epochs},
        "channels": _channels_per_layer(model, pruned.model),
        "quantization": ship["quantization"],
        "verification": ship["verification"],
        "tensorrt": ship["tensorrt"],
        "tensorrt_rules": ship["tensorrt_rules"],
        "config": {"prune": asdict(config.prune), "finetune": asdict(config.finetune), "quant": asdict(config.quant),
                   "recover_epochs": config.recover_epochs, "batch_size": config.batch_size, "augment": config.augment,
                   "ablation": config.ablation, "val_fraction": config.val_fraction,
                   "val_max_images": config.val_max_images},
        "machine": ship["machine"],
        "latency_engine": f"ONNX Runtime CPUExecutionProvider, {config.threads} threads, batch {example.shape[0]}: "
                          f"each file's median of {config.latency_runs} runs after 10 warm-ups, in its own process, "
                          f"over {config.latency_rounds} rounds alternating between the files (median round)",
        "versions": versions(),
    }
    write_json(stage / "hqp.json", report)
    text = render_report(report)
    atomic_write_text(stage / "report.md", text)
    atomic_write_text(stage / "report.txt", text.replace("**", "").replace("`", ""))
    plot_report(report, stage)
    return report


def _paired_ratio(reference: dict, variant: dict) -> float:
    """How many times faster ``variant`` is than ``reference``: the median over timing rounds of the two files'
    ratio in the same round, so a slow spell that hit both files in one round cancels out."""
    ratios = sorted(a / b for a, b in zip(reference["rounds_ms"], variant["rounds_ms"]))
    return ratios[len(ratios) // 2]


def _prediction_error(history: list[RoundRecord]) -> dict | None:
    """How well the latency model predicted the accepted rounds it chose (None when it was not used)."""
    pairs = [(r.round, r.predicted_latency, r.latency) for r in history
             if r.predicted_latency is not None and r.latency is not None]
    if not pairs:
        return None
    errors = [(p - m) / m for _, p, m in pairs]
    return {"rounds": [{"round": n, "predicted_ms": p, "measured_ms": m, "error": e}
                       for (n, p, m), e in zip(pairs, errors)],
            "mean_abs_error": sum(abs(e) for e in errors) / len(errors), "max_abs_error": max(abs(e) for e in errors)}


def _lat(stats: dict) -> dict:
    return {"latency_ms": stats["median_ms"], "size_mb": stats["size_mb"], "peak_rss_mb": stats["peak_rss_mb"]}


def _channels_per_layer(dense: nn.Module, pruned: nn.Module) -> dict[str, list[int]]:
    """Output channels of every conv/linear layer: [dense, pruned]; 0 for a layer removed with its branch."""
    def widths(m: nn.Module) -> dict[str, int]:
        return {n: (x.out_channels if isinstance(x, nn.modules.conv._ConvNd) else x.out_features)
                for n, x in m.named_modules() if isinstance(x, (nn.modules.conv._ConvNd, nn.Linear))}
    before, after = widths(dense), widths(pruned)
    return {n: [before[n], after.get(n, 0)] for n in before}


def render_report(r: dict) -> str:
    acc, comp, var = r["accuracy"], r["compression"], r["variants"]
    verdict = ("within" if r["within_delta_max"] else "**BROKE**") + f" delta_max = {r['delta_max']} points"
    val, splits = acc["validation"], r["splits"]
    lines = [
        "# HQP report", "",
        f"- Final INT8 top-1 drop on the test split: **{acc['final_drop']:.2f}** points ({verdict}); on the validation "
        f"split that decided the run: {val['final_drop']:.2f}.",
        f"- Top-1, test ({splits['test']} images): dense FP32 {acc['dense_fp32']['top1']:.2f}% → pruned FP32 "
        f"{acc['pruned_fp32']['top1']:.2f}% → HQP INT8 (ONNX Runtime) {acc['hqp_int8_onnxruntime']['top1']:.2f}%",
        f"- Top-1, validation ({splits['validation']} images, {splits['validation_source']}): dense FP32 "
        f"{val['dense_fp32']['top1']:.2f}% → pruned FP32 {val['pruned_fp32']['top1']:.2f}% → HQP INT8 "
        f"{val['hqp_int8_onnxruntime']['top1']:.2f}%. {splits['protocol'].capitalize()}.",
        f"- MACs {comp['macs'][0] / 1e6:.2f}M → {comp['macs'][1] / 1e6:.2f}M ({comp['macs_reduction']:.2f}×), params "
        f"{comp['params'][0] / 1e3:.1f}K → {comp['params'][1] / 1e3:.1f}K ({comp['params_reduction']:.2f}×), "
        f"file {comp['size_mb'][0]:.2f} MB → {comp['size_mb'][1]:.2f} MB",
        f"- Pruning: {len(r['rounds'])} rounds ({sum(x['accepted'] for x in r['rounds'])} accepted), criterion "
        f"`{r['criterion']}`, kept channels multiples of {r['config']['prune']['align']}"
        + (f", layers removed with their branches: {sum(kept == 0 for _, kept in r['channels'].values())}"
           if r["config"]["prune"]["remove_branches"] else "") + f"; stopped: {r['stop_reason']}",
        *([f"- Recovery fine-tune ({rec['epochs']:g} epoch(s)): top-1 {rec['top1_before']:.2f}% → "
           f"{rec['top1_after']:.2f}%, " + ("kept" if rec["kept"] else "discarded (it lowered top-1)")]
          if (rec := r.get("recovery")) else []),
        *([f"- Latency model (selection by predicted latency): predicted vs measured on {len(lm['rounds'])} accepted "
           f"round(s), mean error {100 * lm['mean_abs_error']:.1f}%, max {100 * lm['max_abs_error']:.1f}%"]
          if (lm := r.get("latency_model")) else []),
        f"- Quantization: backend `{r['quantization']['backend']}`, calibration `{r['quantization']['calibration']}` "
        f"({r['quantization']['samples']} samples), layers kept in FP: "
        + (", ".join(f"`{k}` ({v})" for k, v in r["quantization"]["float_layers"].items()) or "none"),
        f"- Verification: {r['verification']['fp32']['summary']}; {r['verification']['int8']['summary']}",
        f"- {r['tensorrt']['reason'] or 'TensorRT: INT8 engine built and verified'}",
        *(["- HQP INT8 against quantize-only INT8 (the same engine, the median of round-paired ratios): "
           + (f"**{q:.2f}× faster**" if (q := r["hqp_vs_quantize_only"]) >= 1 else f"**{1 / q:.2f}× slower**")]
          if r.get("hqp_vs_quantize_only") else []),
        "", f"Latency: {r['latency_engine']} on {r['machine']}; speed-ups are medians of round-paired ratios.", "",
        "| variant | test top-1 % | test drop | val top-1 % | val drop | latency ms | speed-up | size MB | "
        "compression | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in var.items():
        lines.append(f"| {name} | {v['top1']:.2f} | {v['drop']:+.2f} | {v['val_top1']:.2f} | {v['val_drop']:+.2f} | "
                     f"{v['latency_ms']:.3f} | {v['speedup']:.2f}× | {v['size_mb']:.2f} | {v['compression']:.2f}× | "
                     f"{v['peak_rss_mb']:.0f} |")
    lines += ["", "Rounds are judged on the validation split.", "",
              "| round | step | accepted | val top-1 % | drop | MACs |", "|---|---|---|---|---|---|"]
    for x in r["rounds"]:
        lines.append(f"| {x['round']} | {x['step']:.2f} | {'yes' if x['accepted'] else 'rolled back'} | "
                     f"{x['top1']:.2f} | {x['drop']:+.2f} | {x['macs'] / 1e6:.2f}M |")
    return "\n".join(lines) + "\n"


def plot_report(r: dict, folder: Path) -> None:
    """accuracy_vs_macs.png, channels_per_layer.png, latency_size.png (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save_fig(fig, name):
        atomic_write(folder / name, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    base = r["accuracy"]["validation"]["dense_fp32"]["top1"]  # the rounds are judged on validation
    ax.scatter([r["compression"]["macs"][0] / 1e6], [base], c="k", label="dense")
    for accepted, style in ((True, "o"), (False, "x")):
        pts = [(x["macs"] / 1e6, x["top1"]) for x in r["rounds"] if x["accepted"] == accepted]
        if pts:
            ax.scatter(*zip(*pts), marker=style, label="accepted" if accepted else "rolled back")
    ax.axhline(base - r["delta_max"], ls="--", c="r", label="baseline − delta_max")
    ax.set(xlabel="MACs (M)", ylabel="validation top-1 (%)", title="accuracy vs MACs per round")
    ax.legend()
    save_fig(fig, "accuracy_vs_macs.png")

    names = list(r["channels"])
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(names)), 4))
    ax.bar(range(len(names)), [r["channels"][n][0] for n in names], color="lightgray", label="dense")
    ax.bar(range(len(names)), [r["channels"][n][1] for n in names], label="kept")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set(ylabel="output channels", title="channels kept per layer")
    ax.legend()
    save_fig(fig, "channels_per_layer.png")

    variants = r["variants"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.bar(list(variants), [v["latency_ms"] for v in variants.values()])
    a1.set(ylabel="ms", title="ONNX Runtime CPU latency")
    a2.bar(list(variants), [v["size_mb"] for v in variants.values()], color="tab:orange")
    a2.set(ylabel="MB", title="file size")
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=30, labelsize=7)
    save_fig(fig, "latency_size.png")


def remove_checkpoints(checkpoint_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
