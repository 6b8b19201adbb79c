"""The ``hqp`` command line."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from . import meta
from .core import HQPError, format_graph
from .count import count_macs, count_params
from .models import build_model
from .passes import ChannelDependencyPass
from .passes.quantize import BACKENDS, CALIBRATIONS
from .passes.sensitivity import CRITERIA
from .prune_loop import SELECTIONS, PruneLoopConfig
from .trace import trace

LOOP_DEFAULTS = PruneLoopConfig()

__all__ = ["main"]


def _human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    spec = build_model(args.model, args.weights)
    shape = spec.input_shape if not args.input_size else spec.input_shape[:2] + (args.input_size, args.input_size)
    example = torch.randn(shape)
    gm = trace(spec.model, example, leaf_modules=args.leaf or ())
    ChannelDependencyPass()(gm)
    groups = meta.channel_groups(gm)
    console = Console(width=200 if not sys.stdout.isatty() else None)
    if not args.summary_only:
        console.print(format_graph(gm), markup=False, highlight=False)
        console.print()
    table = Table(title=f"channel groups of {args.model} (input {'x'.join(map(str, shape))})")
    for col in ("group", "channels", "layers", "prunable", "cross-channel", "why not"):
        table.add_column(col)
    for g in groups:
        table.add_row(g.id, str(g.size), str(len(g.layers)), "yes" if g.prunable else "no",
                      "yes" if g.cross_channel else "", g.reason)
    console.print(table)
    leaves = gm.meta.get(meta.LEAVES, {})
    if leaves:  # what fx could not look into: the channels through these are kept
        opaque = Table(title="opaque modules and methods: kept whole, channels through them are not pruned")
        opaque.add_column("module (or module.method)")
        opaque.add_column("why")
        for name, why in leaves.items():
            opaque.add_row(name, why)
        console.print(opaque)
    if args.details:
        for g in groups:
            console.print(g.details(), markup=False, highlight=False)
    prunable = [g for g in groups if g.prunable]
    console.print(
        f"groups: {len(groups)} ({len(prunable)} prunable, {sum(g.size for g in prunable)} prunable channels) | "
        f"MACs: {_human(count_macs(gm, example))} | params: {_human(count_params(gm))}",
        markup=False, highlight=False,
    )
    return 0


def _model_and_data(args: argparse.Namespace):
    """MODEL/--weights/--input-size/--data of ``hqp quantize`` and ``hqp compress``: (model spec, input size,
    example input, train, validation or None, test ImageSets), class count checked. ``find_splits`` says which
    folder is which; None means the validation split is to be held out from train."""
    spec = build_model(args.model, args.weights)
    size = args.input_size or spec.input_shape[-1]
    example = torch.randn(spec.input_shape[:2] + (size, size))
    train, validation, test = _load_data(args.data, size, spec.model, example)
    return spec, size, example, train, validation, test


def _load_data(root: str, size: int, model: torch.nn.Module, example: torch.Tensor):
    """(train, validation or None, test) ImageSets resized to the model's input, after checking the class count."""
    from .data import find_splits, load_split

    folders = find_splits(root)
    train = load_split(folders.train, size=size)
    test = load_split(folders.test, classes=train.classes, size=size)
    validation = None if folders.validation is None else load_split(folders.validation, classes=train.classes,
                                                                     size=size)
    with torch.no_grad():
        outputs = model(example).shape[-1]
    if outputs != len(train.classes):
        raise ValueError(f"the model predicts {outputs} classes but {root} has {len(train.classes)} class folders "
                         f"({', '.join(train.classes[:5])}{', ...' if len(train.classes) > 5 else ''}); use a "
                         "checkpoint trained on these classes or a dataset with the model's classes")
    return train, validation, test


def cmd_quantize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .data import IMAGENET_MEAN, IMAGENET_STD, BatchLoader
    from .artifacts import StagedOutput, ship_quantized, write_json
    from .passes.quantize import QuantConfig

    console = Console(stderr=True)
    config = QuantConfig(backend=args.backend, calibration=args.calibration, num_samples=args.samples,
                         percentile=args.percentile, on_bad_range=args.on_bad_range,
                         keep_float=tuple(args.keep_float or ()))
    spec, size, example, train, validation, evaluation = _model_and_data(args)
    if args.eval_samples:
        evaluation = evaluation.subset(max(1, args.eval_samples // len(evaluation.classes)))
    if args.max_drop is not None and validation is None:  # the fallback decides: never on the reported split
        train, validation = train.hold_out(args.val_fraction, args.val_max, seed=args.seed)
    calibration = BatchLoader(train, batch_size=32, shuffle=True, seed=args.seed)
    with StagedOutput(args.out) as stage:
        with console.status("quantizing") as status:
            shipped = ship_quantized(spec.model, example, calibration, BatchLoader(evaluation, batch_size=100),
                                     config, stage, max_drop=args.max_drop, dynamic_batch=args.dynamic_batch,
                                     validation=None if validation is None else BatchLoader(validation, 100),
                                     threads=args.threads, progress=lambda msg: status.update(msg))
        report = {"model": args.model, "weights": args.weights, "data": str(args.data),
                  "preprocessing": {"resize": [size, size], "scale": "1/255", "mean": list(IMAGENET_MEAN),
                                    "std": list(IMAGENET_STD), "layout": "NCHW float32, RGB"},
                  "seed": args.seed, **shipped.report}
        write_json(stage / "quantize.json", report)
    acc = report["accuracy"]
    lat = report["latency_onnxruntime_cpu"]
    console.print(f"top-1 FP32 {acc['fp32']['top1']:.2f}% -> INT8 (ONNX Runtime) {acc['int8_onnxruntime']['top1']:.2f}% "
                  f"| latency {lat['fp32']['median_ms']:.2f} -> {lat['int8']['median_ms']:.2f} ms "
                  f"({report['speedup_int8_vs_fp32']:.2f}x, {args.threads} threads) "
                  f"| size {lat['fp32']['size_mb']:.2f} -> {lat['int8']['size_mb']:.2f} MB", highlight=False)
    console.print(report["tensorrt"]["reason"] or "TensorRT engine built and verified", highlight=False)
    console.print(f"wrote {args.out}", highlight=False)
    return 0


def _checkpoint_folder(args: argparse.Namespace) -> Path:
    """``<out>.checkpoints``, checked against ``--resume`` before any work: resume needs a state there, and a fresh
    run must not silently replace an interrupted one's rounds."""
    checkpoints = Path(str(args.out).rstrip("/") + ".checkpoints")
    if args.resume and not (checkpoints / "hqp_state.json").is_file():
        raise FileNotFoundError(f"--resume needs {checkpoints}/hqp_state.json from an interrupted run with the same --out")
    if not args.resume and (checkpoints / "hqp_state.json").is_file():
        raise HQPError(f"{checkpoints} holds the checkpoints of an interrupted run; add --resume to continue it, or "
                       "remove the folder to start over")
    return checkpoints


def compress_config(args: argparse.Namespace, *, lr: float, augment: bool):
    """The ``CompressConfig`` that ``hqp compress`` / ``hqp demo`` run with these parsed arguments."""
    from .compress import CompressConfig
    from .prune_loop import step_schedule
    from .passes.align import engine_alignment
    from .passes.quantize import QuantConfig
    from .train import FinetuneConfig

    align = engine_alignment(args.backend) if args.align == "auto" else args.align
    return CompressConfig(
        prune=PruneLoopConfig(delta_max=args.delta_max, steps=step_schedule(args.step), criterion=args.criterion,
                              flops_normalize=args.flops_normalize, align=align, target_macs=args.target_macs,
                              target_latency=args.target_latency, ignore=tuple(args.ignore or ()),
                              keep_stem=args.keep_stem, remove_branches=args.remove_branches,
                              drop_branch_bias=args.drop_branch_bias, seed=args.seed,
                              max_rounds=args.max_rounds, patience=args.patience, margin=args.margin,
                              time_budget=None if args.time_budget is None else 60 * args.time_budget,
                              select=args.select or ("latency" if args.backend == "onnxruntime" else "channels")),
        finetune=FinetuneConfig(epochs=args.finetune_epochs, lr=lr, distill=args.distill,
                                temperature=args.temperature),
        recover_epochs=args.recover_epochs,
        quant=QuantConfig(backend=args.backend, calibration=args.calibration, num_samples=args.samples),
        batch_size=args.batch_size, augment=augment, ablation=args.ablation, hybrid=not args.no_hybrid,
        guard=args.guard, threads=args.threads, val_fraction=args.val_fraction, val_max_images=args.val_max)


def _run_compress(args, model: torch.nn.Module, example: torch.Tensor, train, validation, test, *, augment: bool,
                  lr: float, checkpoints: Path, identity: dict,
                  validation_source: str = "the data's val/ folder") -> dict:
    """Shared by ``hqp compress`` and ``hqp demo``: stage, run with progress, summarise. ``checkpoints`` comes from
    ``_checkpoint_folder``, checked before the data was loaded; ``identity`` joins the checkpoints' run fingerprint
    (what a resume must share: the model spec, ...)."""
    from .compress import compress, remove_checkpoints
    from .artifacts import StagedOutput
    from .progress import RunProgress

    config = compress_config(args, lr=lr, augment=augment)
    base_macs = count_macs(model, example) if args.target_macs is not None else None
    with StagedOutput(args.out) as stage, RunProgress(args.max_rounds, base_macs=base_macs,
                                                      target_macs=args.target_macs,
                                                      target_latency=args.target_latency) as progress:
        report = compress(model, example, train, test, config, stage, validation=validation, checkpoint_dir=checkpoints,
                          resume=args.resume, progress=progress.phase, on_round=progress.round,
                          leaf_modules=tuple(getattr(args, "leaf", None) or ()), fingerprint=identity,
                          validation_source=validation_source)
    remove_checkpoints(checkpoints)
    return report


def _times(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _summarise(report: dict, out: str) -> None:
    acc, comp, var = report["accuracy"], report["compression"], report["variants"]
    print(f"test top-1 {acc['dense_fp32']['top1']:.2f}% -> INT8 {acc['hqp_int8_onnxruntime']['top1']:.2f}% "
          f"(drop {acc['final_drop']:.2f} ± {acc['final_drop_se']:.2f}; validation drop "
          f"{acc['validation']['final_drop']:.2f} ± {acc['validation']['final_drop_se']:.2f}; "
          f"delta_max {report['delta_max']}: "
          f"{'ok' if report['within_delta_max'] else 'BROKEN'}) | MACs {comp['macs_reduction']:.2f}x fewer | "
          f"ORT latency {_times(var['hqp_int8']['speedup'])} than dense FP32"
          + (f", {_times(q)} than quantize-only" if (q := report.get("hqp_vs_quantize_only")) else "")
          + f" | {report['tensorrt']['reason']}")
    print(f"wrote {out} (report.md, hqp.json, ONNX models, plots)")


def _check_recovery_budget(args: argparse.Namespace) -> None:
    """``--recover-epochs auto`` fills what ``--time-budget`` leaves: refused before any data is read without one."""
    if args.recover_epochs == "auto" and args.time_budget is None:
        raise HQPError("--recover-epochs auto fills what --time-budget leaves after the rounds: give --time-budget "
                       "MINUTES, or --recover-epochs a number of epochs")


def cmd_compress(args: argparse.Namespace) -> int:
    _check_recovery_budget(args)
    checkpoints = _checkpoint_folder(args)
    spec, size, example, train, validation, test = _model_and_data(args)
    report = _run_compress(args, spec.model, example, train, validation, test, augment=True, lr=args.lr,
                           checkpoints=checkpoints,
                           identity={"model spec": args.model, "input size": size})
    _summarise(report, args.out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import digits, train_demo_model

    _check_recovery_budget(args)
    checkpoints = _checkpoint_folder(args)
    train, test = digits(size=args.size)
    train, validation = train.hold_out(args.val_fraction, args.val_max, seed=args.seed)  # before training: unseen
    print(f"demo: scikit-learn handwritten digits ({len(train)} train / {len(validation)} validation / {len(test)} "
          f"test images, 8x8 upsampled to {args.size}x{args.size}), training a small CNN on the spot ...", flush=True)
    model = train_demo_model(train, seed=args.seed)
    report = _run_compress(args, model, torch.randn(1, 3, args.size, args.size), train, validation, test,
                           augment=False, lr=args.lr, checkpoints=checkpoints,
                           identity={"model spec": "demo", "input size": args.size},
                           validation_source=f"held out from the training images before the demo model was trained "
                                             f"(stratified, {args.val_fraction:g} of each class, seed {args.seed})")
    _summarise(report, args.out)
    return 0


def _number(kind: type, low: float | None = None, high: float | None = None, *, open_low: bool = False,
            open_high: bool = False):
    """An argparse type: an int or a finite float within bounds, refused up front with the value named."""
    bounds = " and ".join(b for b in (low is not None and f"{'>' if open_low else '>='} {low:g}",
                                      high is not None and f"{'<' if open_high else '<='} {high:g}") if b)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}"
                                             f"{' ' + bounds if bounds else ''}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value < low or (open_low and value == low))) or (
                high is not None and (value > high or (open_high and value == high))):
            raise argparse.ArgumentTypeError(f"expected a finite number {bounds}, got {text!r}")
        return value
    return parse


_COUNT = _number(int, 1)  # threads, batch size, samples, rounds, pixels
_NON_NEGATIVE = _number(float, 0)
_FRACTION = _number(float, 0, 1, open_low=True, open_high=True)


def _epochs_or_auto(text: str):
    """``--recover-epochs``: ``auto`` or an epoch count >= 0."""
    if text == "auto":
        return text
    try:
        return _NON_NEGATIVE(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a finite number >= 0, got {text!r}") from None


def _align_arg(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1 or int(text) & (int(text) - 1):
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a power-of-two channel multiple (1 for none, 8, 16, 32), got {text!r}: engines' INT8 "
            "kernels compute channels in power-of-two blocks, so any other multiple costs the next block's time")
    return int(text)


def _backend(text: str) -> str:
    """``--backend``: a preset, or ``auto``: tensorrt where ``import tensorrt`` works and a GPU is present (the
    engine can then be built and verified), else onnxruntime (what this machine can run and measure)."""
    if text == "auto":
        from .engines.tensorrt import tensorrt_unavailable_reason

        return "onnxruntime" if tensorrt_unavailable_reason() else "tensorrt"
    if text not in BACKENDS:
        raise argparse.ArgumentTypeError(f"expected auto or one of {', '.join(BACKENDS)}, got {text!r}")
    return text


_BACKEND_HELP = ("INT8 preset and engine: auto (default) picks tensorrt when `import tensorrt` works and a GPU is "
                 "present, else onnxruntime; or one of " + ", ".join(BACKENDS))


def _add_validation_options(p: argparse.ArgumentParser, *, fraction: float) -> None:
    p.add_argument("--val-fraction", type=_FRACTION, default=fraction, help="without a val/ beside the data's test/: "
                   "hold out this stratified share of train/ as the validation split that decides (never trained or "
                   f"calibrated on; the test split is only reported); default {fraction:g}")
    p.add_argument("--val-max", type=_COUNT, default=5000, help="at most this many held-out validation images")


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` states each default that is a value (not None, not an off switch) and not already in the text."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_compress_options(c: argparse.ArgumentParser, *, demo: bool) -> None:
    """``hqp compress``'s defaults are the recipe that measured best on two CIFAR ResNet checkpoints (taylor,
    selection by measured engine latency with depth pruning, the stem whole, distillation, one epoch per round,
    one more for a round just over delta_max, rounds judged on the INT8 model; benchmarks/RESULTS.md, "The default
    recipe"), then a recovery fine-tune in what an hour leaves after the rounds ("The recovery fills the time
    budget"). The demo keeps its own, smaller job."""
    c.add_argument("--out", required=not demo, default="hqp_demo" if demo else None,
                   help="output folder (must not exist or be empty)")
    c.add_argument("--delta-max", type=_NON_NEGATIVE, default=1.0, help="largest allowed top-1 drop in points")
    c.add_argument("--step", type=_FRACTION, default=0.05 if demo else 0.1, help="share removed per round (then 2%%, "
                   "1%%): of the predicted latency with --select latency, of the channels with --select channels")
    c.add_argument("--finetune-epochs", type=_NON_NEGATIVE, default=1.0, help="fine-tuning after each round")
    c.add_argument("--recover-epochs", type=_epochs_or_auto, default=0.0 if demo else "auto", help="after the last "
                   "round, fine-tune the pruned model this many epochs more (kept only if top-1 does not fall); 0: "
                   "none; auto" + ("" if demo else " (default)") + ": the whole epochs that fit in what --time-budget "
                   "leaves, judged by the rounds' epochs, keeping 5%% of it for quantization and the report; at least "
                   "1, at most 10 (the longest measured to help)")
    c.add_argument("--lr", type=_number(float, 0, open_low=True), default=0.01 if demo else 0.02,
                   help="fine-tune learning rate: the peak of each round's cosine schedule "
                        "(chosen with benchmarks/finetune_recipe.py)")
    c.add_argument("--distill", type=_number(float, 0, 1), default=0.9,
                   help="fine-tune with this weight on distillation from the dense model (the rest on the labels); "
                   "0: labels only")
    c.add_argument("--temperature", type=_number(float, 0, open_low=True), default=4.0, help="distillation temperature")
    c.add_argument("--align", type=_align_arg, default="auto", help="round kept channels to this multiple; auto "
                   "(default): the block width of the --backend's INT8 convolutions, 16 for every backend "
                   "(hqp_fx.passes.align.ENGINE_ALIGNMENT says why)")
    c.add_argument("--criterion", default="fisher" if demo else "taylor", choices=CRITERIA,
                   help="channel importance on the calibration images")
    c.add_argument("--flops-normalize", action="store_true", help="taylor / group-fisher: rank channels by "
                   "estimated loss change per MAC they cost")
    c.add_argument("--target-macs", type=_FRACTION, help="stop once MACs <= this fraction of the dense model")
    c.add_argument("--target-latency", type=_FRACTION, help="stop once the ONNX Runtime CPU latency <= this fraction "
                   "of the dense model's in the same form: with --backend onnxruntime both are INT8 files, so the "
                   "reference is the quantize-only model; with other backends (whose engines ORT does not run) both "
                   f"are FP32. Every accepted round is timed with the dense model in {LOOP_DEFAULTS.latency_rounds} "
                   "rounds, the two files run by run in each, and judged on the median of their per-round ratios; a "
                   f"ratio that reaches the target is timed again in {LOOP_DEFAULTS.latency_confirm_rounds} rounds "
                   "before the run stops")
    c.add_argument("--ignore", action="append", help="module never pruned (repeatable)")
    c.add_argument("--keep-stem", action=argparse.BooleanOptionalAction, default=not demo, help="never prune the "
                   "first conv/linear layer's output channels (in a ResNet, the stream every block adds to)")
    c.add_argument("--select", default="channels" if demo else None, choices=SELECTIONS,
                   help=("channels (default)" if demo else "default: latency with --backend onnxruntime (the engine "
                         "its table times), else channels") + ". latency: each round removes the channel blocks (and, "
                   "with --remove-branches, whole blocks) of least importance per millisecond they save until the "
                   "predicted ONNX Runtime INT8 latency falls by --step, from a table of every layer timed on this "
                   "machine (cached), and measures every accepted round; channels: each round removes --step of the "
                   "channels, ranked by the criterion")
    c.add_argument("--remove-branches", action=argparse.BooleanOptionalAction, default=not demo, help="depth "
                   "pruning: all inner channels of a residual block (or an SE gate) may go, and the block with them; "
                   "ranked with the channel blocks")
    c.add_argument("--drop-branch-bias", action=argparse.BooleanOptionalAction, default=True, help="a block "
                   "removed whole leaves the identity, not the add of its last BatchNorm's shift, which costs engine "
                   "time; the fine-tune absorbs the shift. --no-drop-branch-bias keeps the add: the removal is then "
                   "exact (the pruned model equals the original with those channels masked)")
    c.add_argument("--max-rounds", type=_COUNT, default=12 if demo else 100, help="pruning rounds at most")
    c.add_argument("--time-budget", type=_number(float, 0, open_low=True), default=None if demo else 60.0,
                   metavar="MINUTES", help="start no pruning round that would end past this many minutes (judged by "
                   "the mean round so far); --recover-epochs auto fills what it leaves, and quantization and the "
                   "report come last; default: " + ("no limit" if demo else "60"))
    c.add_argument("--backend", type=_backend, default="onnxruntime" if demo else "auto", help=_BACKEND_HELP)
    c.add_argument("--calibration", default="histogram", choices=CALIBRATIONS)
    c.add_argument("--samples", type=_COUNT, default=256 if demo else 512, help="calibration images")
    c.add_argument("--no-hybrid", action="store_true", help="never keep layers in FP to honour delta_max")
    c.add_argument("--guard", default="fp32" if demo else "int8", choices=("fp32", "int8"), help="what each round's "
                   "delta_max decision judges: the pruned FP32 model, or its INT8 model run in ONNX Runtime (the "
                   "budget is then spent on what ships, and no layer needs keeping in FP; costs a quantization per "
                   "round)")
    c.add_argument("--patience", type=_number(int, 0), default=0 if demo else 1, help="a round over delta_max by "
                   "at most half of it is fine-tuned --finetune-epochs again, up to this many times, before it is "
                   "rolled back")
    c.add_argument("--margin", type=_number(float, 0), default=0.0, metavar="K", help="accept a round only when its "
                   "validation drop plus K standard errors (paired over the validation images) is within delta_max: "
                   "1 or 2 keep a small validation split's noise from spending delta_max, at the cost of rounds. "
                   "Default 0: the drop as measured")
    c.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure quantize-only (dense INT8); dense FP32 and prune-only are always measured")
    c.add_argument("--batch-size", type=_COUNT, default=64 if demo else 128)
    c.add_argument("--threads", type=_COUNT, default=2)
    _add_validation_options(c, fraction=0.2 if demo else 0.1)
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>.checkpoints")
    c.add_argument("--seed", type=_number(int, 0), default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hqp", description="HQP: sensitivity-aware pruning + INT8 quantization of CNNs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the traced graph, its coupled channel groups, MACs and params")
    p.add_argument("model", help="torchvision:NAME | cifar:resnet20|32|44|56|110 | path/to/file.py:factory")
    p.add_argument("--weights", help="local checkpoint (state dict); for torchvision also a hub weights name")
    p.add_argument("--input-size", type=_COUNT, help="square input resolution (default: the model's own)")
    p.add_argument("--leaf", action="append", help="module name to keep opaque while tracing (repeatable)")
    p.add_argument("--details", action="store_true", help="list every parameter slice of every group")
    p.add_argument("--summary-only", action="store_true", help="skip the per-node graph printout")
    p.set_defaults(func=cmd_inspect)

    q = sub.add_parser("quantize", help="INT8-quantize a model, export FP32/INT8 ONNX, verify and measure them")
    q.add_argument("model", help="torchvision:NAME | cifar:resnet20|32|44|56|110 | path/to/file.py:factory")
    q.add_argument("--weights", help="local checkpoint (state dict); for torchvision also a hub weights name")
    q.add_argument("--data", required=True, help="ImageFolder root with train/ (calibration) and val/ or test/")
    q.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    q.add_argument("--backend", type=_backend, default="auto", help=_BACKEND_HELP)
    q.add_argument("--calibration", default="histogram", choices=CALIBRATIONS,
                   help="activation range: minmax, histogram (MSE-optimal clipping) or percentile")
    q.add_argument("--percentile", type=_number(float, 50, 100, open_low=True), default=99.99)
    q.add_argument("--samples", type=_COUNT, default=512, help="calibration images")
    q.add_argument("--on-bad-range", default="error", choices=("error", "fallback"),
                   help="NaN/Inf, unseen or collapsed ranges: stop, or keep those layers in floating point")
    q.add_argument("--keep-float", action="append", help="layer to keep in floating point (repeatable)")
    q.add_argument("--max-drop", type=_NON_NEGATIVE, help="hybrid fallback: keep the most sensitive layers in FP until "
                   "the INT8 top-1 drop on the validation split is at most this many points")
    _add_validation_options(q, fraction=0.1)
    q.add_argument("--eval-samples", type=_COUNT, help="evaluate on about this many images (default: all)")
    q.add_argument("--input-size", type=_COUNT, help="square input resolution (default: the model's own)")
    q.add_argument("--dynamic-batch", action="store_true", help="export ONNX with a dynamic batch dimension")
    q.add_argument("--threads", type=_COUNT, default=2, help="ONNX Runtime threads for evaluation and latency")
    q.add_argument("--seed", type=_number(int, 0), default=0)
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("compress", help="HQP end to end: prune under delta_max, quantize, export, verify, report",
                       formatter_class=_ShowDefaults)
    c.add_argument("model", help="torchvision:NAME | cifar:resnet20|32|44|56|110 | path/to/file.py:factory")
    c.add_argument("--weights", help="local checkpoint (state dict); for torchvision also a hub weights name")
    c.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ or test/")
    c.add_argument("--input-size", type=_COUNT, help="square input resolution (default: the model's own)")
    c.add_argument("--leaf", action="append", help="module name to keep opaque while tracing (repeatable)")
    _add_compress_options(c, demo=False)
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("demo", help="the whole HQP job in a few CPU minutes on scikit-learn's handwritten digits",
                       formatter_class=_ShowDefaults)
    _add_compress_options(d, demo=True)
    d.add_argument("--size", type=_COUNT, default=16,
                   help="the 8x8 digits are upsampled to SIZE x SIZE (default 16: at 8x8 latencies are noise)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (HQPError, ValueError, FileNotFoundError) as exc:  # what we raise on bad input; anything else is a bug
        print(f"hqp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
