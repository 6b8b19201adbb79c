"""The whole HQP job: prune under delta_max, quantize the accepted model, export, verify, measure, report.

``compress`` writes into a staging folder (see ``artifacts.StagedOutput``); round checkpoints live next to the output
folder in ``<out>.checkpoints`` so ``resume`` survives a killed run, and are removed once the job succeeds.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from . import meta
from .core import atomic_write_text
from .count import count_macs, count_params
from .data import BatchLoader, ImageSet
from .artifacts import ship_quantized, write_json
from .engines.ort import OrtModel, onnxruntime_top1
from .measure import measure_alternating, measure_interleaved, measure_onnx, paired_ratio, versions
from .prune_loop import HITS, RETRY_SEED, PruneLoopConfig, PruneResult, RoundRecord, prune_loop
from .latency import LatencyModel
from .lower_onnx import export_onnx
from .passes.quantize import QuantConfig, quantize
from .report import plot_report, render_report
from .serialize import save
from .train import FinetuneConfig, evaluate, finetune, paired_drop

__all__ = ["CompressConfig", "compress", "onnx_latency", "recovery_epochs", "seen_check", "HQP_JSON_SCHEMA"]

HQP_JSON_SCHEMA = json.loads(resources.files("hqp_fx").joinpath("hqp.schema.json").read_text())
SEEN_WITHIN_SE = 2.0  # seen_check: held-out images scoring within this many standard errors of training images
RECOVER_AUTO_MAX_EPOCHS = 10  # an "auto" recovery trains at most this long: the longest one measured to help
RECOVER_RESERVE = 0.05  # the share of the time budget an "auto" recovery leaves for quantization, export and report
_clock = time.monotonic  # the job's clock for an "auto" recovery (a test replaces it)


@dataclass(frozen=True)
class CompressConfig:
    prune: PruneLoopConfig = field(default_factory=PruneLoopConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # a final, longer fine-tune of the pruned model (same optimizer settings); 0: none; "auto": what the time budget
    # (prune.time_budget, counted from the start of the job) leaves after the rounds (``recovery_epochs``)
    recover_epochs: float | str = 0.0
    quant: QuantConfig = field(default_factory=QuantConfig)
    batch_size: int = 128
    augment: bool = True  # random crop + flip while fine-tuning
    calib_images_per_class: int = 50
    val_fraction: float = 0.1  # without an explicit validation split: this share of train is held out for decisions
    val_max_images: int = 5000
    ablation: bool = False  # also measure quantize-only (dense INT8)
    hybrid: bool = True  # keep sensitive layers in FP when INT8 would break delta_max
    guard: str = "fp32"  # what each round's delta_max decision judges: the FP32 candidate, or its INT8 model ("int8")
    threads: int = 2
    latency_runs: int = 100
    latency_rounds: int = 3  # the variants are timed in alternating rounds: a slow spell of the machine hits all

    def __post_init__(self):
        if not 0 < self.val_fraction < 1 or self.val_max_images < 1:
            raise ValueError(f"val_fraction must be in (0, 1) and val_max_images >= 1, got {self.val_fraction}, "
                             f"{self.val_max_images}")
        if self.latency_rounds < 1:
            raise ValueError(f"latency_rounds must be >= 1, got {self.latency_rounds}")
        if self.recover_epochs == "auto":
            if self.prune.time_budget is None:
                raise ValueError('recover_epochs="auto" fills what the time budget leaves after the rounds: set '
                                 "prune.time_budget (seconds), or give recover_epochs a number")
        elif isinstance(self.recover_epochs, str) or not self.recover_epochs >= 0:
            raise ValueError(f'recover_epochs must be >= 0 (0: no recovery fine-tune) or "auto", got '
                             f"{self.recover_epochs!r}")
        if self.guard not in ("fp32", "int8"):
            raise ValueError(f"guard must be 'fp32' or 'int8', got {self.guard!r}")


def recovery_epochs(budget_s: float, elapsed_s: float, epoch_s: float | None) -> int:
    """How many epochs an "auto" recovery trains: the whole epochs that fit in what ``budget_s`` leaves after
    ``elapsed_s``, less ``RECOVER_RESERVE`` of it for what follows, between 1 and ``RECOVER_AUTO_MAX_EPOCHS``; 1
    when no epoch was timed. The rounds decide on a small validation split and keep cuts measured just under
    delta_max; a longer fine-tune of the final cut wins back more than the rounds' one-epoch fine-tunes could
    (benchmarks/RESULTS.md, "The recovery fills the time budget"), and on a short run the hour is otherwise idle."""
    if epoch_s is None or not epoch_s > 0:
        return 1
    left = budget_s * (1 - RECOVER_RESERVE) - elapsed_s
    return int(min(RECOVER_AUTO_MAX_EPOCHS, max(1, left // epoch_s)))


def onnx_latency(example: torch.Tensor, threads: int = 2, runs: int = 100, *, quant: QuantConfig | None = None,
                 calibration: list | None = None) -> "OnnxLatency":
    """A ``latency_fn`` for ``prune_loop``: the model's ONNX Runtime CPU latency in ms (``measure_onnx``).

    With ``quant`` the model is first quantized by it on ``calibration``, so the loop's latency target is judged on
    the INT8 file it will ship: ORT's int8 and fp32 kernels reward different channel counts
    (``benchmarks/ort_channel_steps.py``).
    """
    if quant is not None and not calibration:
        raise ValueError("onnx_latency with quant needs calibration batches to quantize each candidate")
    return OnnxLatency(example, threads, runs, quant, calibration)


@dataclass
class OnnxLatency:
    """``onnx_latency``'s callable; ``paired`` times two models against each other run by run in each of its rounds
    (``measure_interleaved``), each exported once."""

    example: torch.Tensor
    threads: int
    runs: int
    quant: QuantConfig | None
    calibration: list | None

    def export(self, model: nn.Module, path: Path) -> Path:
        """Write the file this callable times: ``model`` quantized by ``quant`` (when set), exported at the
        example's shape. Benchmarks call it too, so what they time is what the loop times."""
        if self.quant is not None:
            model = quantize(model, self.example, self.calibration, self.quant).model
        export_onnx(model, (self.example,), path)
        return path

    def __call__(self, model: nn.Module) -> float:
        with tempfile.TemporaryDirectory(prefix="hqp_latency_") as tmp:
            path = self.export(model, Path(tmp) / "model.onnx")
            return measure_onnx(path, tuple(self.example.shape), threads=self.threads, runs=self.runs)["median_ms"]

    def paired(self, reference: nn.Module, candidate: nn.Module, rounds: int) -> tuple[list[float], list[float]]:
        with tempfile.TemporaryDirectory(prefix="hqp_latency_") as tmp:
            paths = {"reference": self.export(reference, Path(tmp) / "reference.onnx"),
                     "candidate": self.export(candidate, Path(tmp) / "candidate.onnx")}
            rounds_ms = measure_interleaved(paths, tuple(self.example.shape), threads=self.threads, runs=self.runs,
                                            rounds=rounds)
        return rounds_ms["reference"], rounds_ms["candidate"]


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
    started = _clock()
    source, seen = validation_source, None
    dense = copy.deepcopy(model).eval().requires_grad_(False)
    if validation is None:
        # a checkpoint trained on all of train has seen these images: its top-1 there is optimistic, and the drop
        # there pessimistic (fine-tuning without them forgets them), so decisions err on the safe side; not test
        train, validation = train.hold_out(config.val_fraction, config.val_max_images, seed=config.prune.seed)
        source = (f"held out from the training images (stratified, {config.val_fraction:g} of each class, at most "
                  f"{config.val_max_images}, seed {config.prune.seed})")
        seen = seen_check(dense, train, validation, seed=config.prune.seed)
        progress(seen_message(seen))
    teacher = dense if config.finetune.distill > 0 else None
    val_loader, test_loader = BatchLoader(validation, 500), BatchLoader(test, 500)
    calibration = list(BatchLoader(train.subset(config.calib_images_per_class), 64, shuffle=True,
                                   seed=config.prune.seed))

    calls: Counter[int] = Counter()  # a round's retried fine-tune (config.prune.patience) sees a new data order
    epoch_seconds: list[float] = []  # each round's fine-tune per epoch, for an "auto" recovery

    def finetune_fn(m: nn.Module, rnd: int) -> None:
        retry = calls[rnd]
        calls[rnd] += 1
        progress(f"round {rnd}: fine-tuning {config.finetune.epochs:g} epoch(s)"
                 + (f" more: over delta_max, retry {retry} of {config.prune.patience}" if retry else ""))
        start = _clock()
        finetune(m, BatchLoader(train, config.batch_size, shuffle=True, augment=config.augment,
                                seed=config.prune.seed * 1000 + rnd + RETRY_SEED * retry), config.finetune,
                 teacher=teacher)
        if config.finetune.epochs > 0:
            epoch_seconds.append((_clock() - start) / config.finetune.epochs)

    def evaluate_fn(m: nn.Module) -> dict:  # with per-image hits: each round's drop gets its standard error
        hits: list[torch.Tensor] = []
        return {**evaluate(m, val_loader, num_classes=len(validation.classes), hits=hits), HITS: hits}

    int8_top1 = onnxruntime_top1(example, val_loader, config.threads)

    def guard_int8(m: nn.Module) -> dict:
        """The candidate quantized as it will ship, run in ONNX Runtime on validation."""
        progress("INT8 check: quantizing the candidate and scoring it in ONNX Runtime")
        hits: list[torch.Tensor] = []
        return {"top1": int8_top1(quantize(m, example, calibration, config.quant).model, hits=hits), HITS: hits}

    def recover_fn(m: nn.Module) -> dict:
        epochs, why = config.recover_epochs, ""
        if epochs == "auto":
            epoch_s = statistics.median(epoch_seconds) if epoch_seconds else None
            elapsed = _clock() - started
            epochs = recovery_epochs(config.prune.time_budget, elapsed, epoch_s)
            why = (f" (auto: {elapsed / 60:.1f} of {config.prune.time_budget / 60:g} min used, "
                   + (f"an epoch about {epoch_s / 60:.1f} min" if epoch_s else "no epoch timed in this call")
                   + f", at most {RECOVER_AUTO_MAX_EPOCHS})")
        progress(f"recovery: fine-tuning the pruned model {epochs:g} epoch(s){why}")
        loader = BatchLoader(train, config.batch_size, shuffle=True, augment=config.augment,
                             seed=config.prune.seed * 1000 + config.prune.max_rounds)  # a seed no round uses
        finetune(m, loader, replace(config.finetune, epochs=epochs), teacher=teacher)
        return {"epochs": epochs}

    # a latency target is judged on the INT8 file when ORT is the deployment engine; the other backends' engines
    # (TensorRT, inductor) are not what ORT measures, so their rounds are timed as FP32 in ORT, a proxy
    latency_quant = config.quant if config.quant.backend == "onnxruntime" else None
    identity = {"data.train": train.digest(), "data.validation": validation.digest(),
                **{f"finetune.{k}": v for k, v in asdict(config.finetune).items()}, "batch_size": config.batch_size,
                "augment": config.augment, "calib_images_per_class": config.calib_images_per_class,
                **({"guard": config.guard, "quant": asdict(config.quant)} if config.guard != "fp32" else {}),
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
                                     recover_fn=recover_fn if config.recover_epochs != 0 else None,
                                     latency_fn=onnx_latency(example, config.threads, config.latency_runs,
                                                             quant=latency_quant, calibration=calibration),
                                     latency_model=engine_model if config.prune.select == "latency" else None,
                                     guard_fn=guard_int8 if config.guard == "int8" else None, progress=progress)
    save(pruned.model, stage / "model_pruned.hqp")
    progress("exporting the dense FP32 baseline")
    dense_onnx = stage / "model_dense_fp32.onnx"
    export_onnx(dense, (example,), dense_onnx)
    final_fp32 = pruned.final["top1"] if config.guard == "fp32" else evaluate(pruned.model, val_loader)["top1"]
    budget_left = config.prune.delta_max - (pruned.baseline["top1"] - final_fp32)  # on validation, FP32 to FP32
    shipped = ship_quantized(pruned.model, example, calibration, test_loader, config.quant, stage,
                             max_drop=max(0.0, budget_left) if config.hybrid else None, validation=val_loader,
                             threads=config.threads, runs=config.latency_runs, progress=progress)
    ship = shipped.report
    progress("evaluating the dense model on the test split")
    # for the drops' paired standard errors; the loop's dense evaluation (evaluate_fn) gave the validation hits
    dense_hits: dict[str, list] = {"test": [], "validation": pruned.baseline_hits}
    dense_test = evaluate(dense, test_loader, num_classes=len(test.classes), hits=dense_hits["test"])
    drop_se = {split: paired_drop(dense_hits[split], shipped.int8_hits[split])[1] for split in dense_hits}
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
    head_to_head = None
    if "quantize_only_int8" in files:
        # the headline ratio is timed as the loop times its rounds: the two files run by run in each round, on one
        # thread pool; blocks in separate processes, as above, each catch the machine in its own state
        progress(f"timing HQP INT8 against quantize-only INT8 run by run, {config.latency_rounds} rounds")
        head_to_head = measure_interleaved({k: files[k] for k in ("quantize_only_int8", "hqp_int8")},
                                           tuple(example.shape), threads=config.threads, runs=config.latency_runs,
                                           rounds=config.latency_rounds)
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
                   # only reported: well above zero, the model has likely trained on the validation images
                   "dense_val_minus_test": pruned.baseline["top1"] - dense_test["top1"],
                   **({"seen_check": seen} if seen is not None else {}),
                   "protocol": "rounds, the recovery and the hybrid fallback are decided on the validation split; "
                               "the test split is only reported"},
        "accuracy": {"dense_fp32": dense_test, "pruned_fp32": ship["accuracy"]["fp32"],
                     "hqp_int8_onnxruntime": ship["accuracy"]["int8_onnxruntime"], "final_drop": final_drop,
                     "final_drop_se": drop_se["test"],
                     "validation": {"dense_fp32": pruned.baseline, "pruned_fp32": on_val["fp32"],
                                    "hqp_int8_onnxruntime": on_val["int8_onnxruntime"],
                                    "final_drop": variants["hqp_int8"]["val_drop"],
                                    "final_drop_se": drop_se["validation"]}},
        "compression": {"macs": [pruned.baseline_macs, macs], "params": [pruned.baseline_params, params],
                        "macs_reduction": pruned.baseline_macs / macs, "params_reduction": pruned.baseline_params / params,
                        "size_mb": [base["size_mb"], variants["hqp_int8"]["size_mb"]]},
        "variants": variants,
        "hqp_vs_quantize_only": (paired_ratio(head_to_head["quantize_only_int8"], head_to_head["hqp_int8"])
                                 if head_to_head else None),
        "hqp_vs_quantize_only_rounds_ms": head_to_head,
        "rounds": [asdict(r) for r in pruned.history],
        "round_latency": (f"{'INT8 (' + config.quant.backend + ' preset)' if latency_quant else 'FP32'} model in ONNX "
                          "Runtime CPU, ms; measured on accepted rounds when a latency target is set or the selection "
                          "is by latency, with the dense model: in each round one process runs the two files in turn, "
                          "run by run, on one thread pool, and takes each file's median (reference_latency: its median "
                          "round; latency: that times the median per-round ratio; the raw rounds beside them)"),
        "latency_model": _prediction_error(pruned.history, pruned.baseline_latency),
        "stop_reason": pruned.stop_reason,
        "recovery": pruned.recovery and {"epochs": config.recover_epochs, **pruned.recovery},
        "channels": _channels_per_layer(model, pruned.model),
        "quantization": ship["quantization"],
        "verification": ship["verification"],
        "tensorrt": ship["tensorrt"],
        "tensorrt_rules": ship["tensorrt_rules"],
        "config": {"prune": asdict(config.prune), "finetune": asdict(config.finetune), "quant": asdict(config.quant),
                   "recover_epochs": config.recover_epochs, "batch_size": config.batch_size, "augment": config.augment,
                   "ablation": config.ablation, "guard": config.guard, "val_fraction": config.val_fraction,
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


def seen_check(dense: nn.Module, train: ImageSet, validation: ImageSet, seed: int = 0) -> dict:
    """Has the checkpoint trained on the validation images held out of ``train``? Before the first round, so a
    user learns it in a minute rather than from the report an hour later.

    Images a model never trained on score lower than its training images, by its generalisation gap; held-out
    images that score as well as as many of the remaining training images (within ``SEEN_WITHIN_SE`` standard
    errors of the difference) were most likely trained on, as most published checkpoints train on all of a
    dataset's training images. Drops measured on them overstate drops on unseen images (benchmarks/RESULTS.md:
    1.62 against 0.40 for one ResNet-20 block), so the rounds stop early. It decides nothing; it is reported."""
    n = len(validation)
    counts = torch.bincount(train.labels, minlength=len(train.classes))
    sample = (train if len(train) <= 2 * n or int(counts.min()) < 2
              else train.hold_out(n / len(train), n, seed=seed)[1])
    classes = len(validation.classes)
    val_top1 = evaluate(dense, BatchLoader(validation, 500), num_classes=classes)["top1"]
    train_top1 = evaluate(dense, BatchLoader(sample, 500), num_classes=classes)["top1"]
    pv, pt = val_top1 / 100, train_top1 / 100
    se = 100 * math.sqrt(pv * (1 - pv) / n + pt * (1 - pt) / len(sample))
    gap = train_top1 - val_top1
    return {"validation_top1": val_top1, "train_top1": train_top1, "train_images": len(sample), "gap": gap,
            "gap_se": se, "likely_seen": gap <= SEEN_WITHIN_SE * se}


def seen_message(seen: dict) -> str:
    head = (f"validation: the dense model scores {seen['validation_top1']:.2f}% on the held-out images and "
            f"{seen['train_top1']:.2f}% on {seen['train_images']} of the training images")
    if not seen["likely_seen"]:
        return head
    return (f"{head}: no lower within noise (training minus held-out: {seen['gap']:+.2f} ± {seen['gap_se']:.2f} "
            "points), so it has most likely trained on the held-out ones. Drops measured there overstate drops on "
            "unseen images and the rounds will stop early; to spend the whole delta_max, give the data a val/ folder "
            "(beside train/ and test/) of images the model never trained on")


def _paired_ratio(reference: dict, variant: dict) -> float:
    """How many times faster ``variant`` is than ``reference``, paired over the timing rounds (``paired_ratio``)."""
    return paired_ratio(reference["rounds_ms"], variant["rounds_ms"])


def _prediction_error(history: list[RoundRecord], dense_ms: float | None) -> dict | None:
    """How well the latency model predicted the accepted rounds it chose (None when it was not used). Predictions are
    on the scale of the dense model's first timing (``dense_ms``); so is each measurement here: its ratio to the dense
    model timed alongside, times ``dense_ms``. The raw ms of a later round also carry the machine's drift since."""
    pairs = [(r.round, r.predicted_latency, r.latency / r.reference_latency * dense_ms, r.latency) for r in history
             if r.predicted_latency is not None and r.latency is not None and r.reference_latency and dense_ms]
    if not pairs:
        return None
    errors = [(p - m) / m for _, p, m, _ in pairs]
    return {"dense_ms": dense_ms,
            "rounds": [{"round": n, "predicted_ms": p, "measured_ms": m, "raw_measured_ms": raw, "error": e}
                       for (n, p, m, raw), e in zip(pairs, errors)],
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


def remove_checkpoints(checkpoint_dir: Path) -> None:
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
