"""The job's report: report.md from the hqp.json data, and its plots (accuracy vs latency, channels per layer)."""
from __future__ import annotations

from pathlib import Path

from .core import atomic_write

__all__ = ["render_report", "plot_report"]


# points; two 5,000-image samples of one distribution differ by about 0.5 (one standard deviation) at 90% top-1
MEMORISED_GAP = 2.0


def _seen_evidence(splits: dict) -> list[str]:
    """What says the dense model trained on the validation images: before the run, as high a score there as on
    training images (``compress.seen_check``); after it, a score well above the test split's."""
    evidence = []
    if (seen := splits.get("seen_check")) and seen["likely_seen"]:
        evidence.append(f"scores as well on validation as on {seen['train_images']} training images "
                        f"({seen['validation_top1']:.2f}% against {seen['train_top1']:.2f}%)")
    if (gap := splits.get("dense_val_minus_test", 0.0)) > MEMORISED_GAP:
        evidence.append(f"scores {gap:.1f} points higher on validation than on test")
    return evidence


def render_report(r: dict) -> str:
    acc, comp, var = r["accuracy"], r["compression"], r["variants"]
    verdict = ("within" if r["within_delta_max"] else "**BROKE**") + f" delta_max = {r['delta_max']} points"
    val, splits = acc["validation"], r["splits"]
    lines = [
        "# HQP report", "",
        f"- Final INT8 top-1 drop on the test split: **{acc['final_drop']:.2f}** ± {acc['final_drop_se']:.2f} points "
        f"({verdict}); on the validation split that decided the run: {val['final_drop']:.2f} ± "
        f"{val['final_drop_se']:.2f} (± one standard error, paired over the images: what a split of that size can "
        "resolve).",
        f"- Top-1, test ({splits['test']} images): dense FP32 {acc['dense_fp32']['top1']:.2f}% → pruned FP32 "
        f"{acc['pruned_fp32']['top1']:.2f}% → HQP INT8 (ONNX Runtime) {acc['hqp_int8_onnxruntime']['top1']:.2f}%",
        f"- Top-1, validation ({splits['validation']} images, {splits['validation_source']}): dense FP32 "
        f"{val['dense_fp32']['top1']:.2f}% → pruned FP32 {val['pruned_fp32']['top1']:.2f}% → HQP INT8 "
        f"{val['hqp_int8_onnxruntime']['top1']:.2f}%. {splits['protocol'].capitalize()}.",
        *([f"- **The dense model {' and '.join(evidence)}**: it has likely trained on the validation images, so the "
           "drops measured there overstate the test drops and the rounds may have stopped short of what delta_max "
           "allows. For decisions that can spend the whole delta_max, give the data a `val/` folder the model never "
           "saw."]
          if (evidence := _seen_evidence(splits)) else []),
        f"- MACs {comp['macs'][0] / 1e6:.2f}M → {comp['macs'][1] / 1e6:.2f}M ({comp['macs_reduction']:.2f}×), params "
        f"{comp['params'][0] / 1e3:.1f}K → {comp['params'][1] / 1e3:.1f}K ({comp['params_reduction']:.2f}×), "
        f"file {comp['size_mb'][0]:.2f} MB → {comp['size_mb'][1]:.2f} MB",
        f"- Pruning: {len(r['rounds'])} rounds ({sum(x['accepted'] for x in r['rounds'])} accepted), criterion "
        f"`{r['criterion']}`, kept channels multiples of {r['config']['prune']['align']}"
        + (f", layers removed with their branches: {sum(kept == 0 for _, kept in r['channels'].values())}"
           + (" (a removed block leaves the identity: its last BatchNorm's shift dropped, then fine-tuned)"
              if r["config"]["prune"].get("drop_branch_bias") else "")
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
        *(["- HQP INT8 against quantize-only INT8 (the same engine; the two files run by run in each round, the median "
            "of the per-round ratios): "
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
              "| round | step | accepted | val top-1 % | drop | retried fine-tunes (drops before) | MACs |",
              "|---|---|---|---|---|---|---|"]
    for x in r["rounds"]:
        lines.append(f"| {x['round']} | {x['step']:.2f} | {'yes' if x['accepted'] else 'rolled back'} | "
                     f"{x['top1']:.2f} | {x['drop']:+.2f}"
                     + (f" ± {x['drop_se']:.2f}" if x.get("drop_se") is not None else "")
                     + f" | {_retried(x)} | {x['macs'] / 1e6:.2f}M |")
    return "\n".join(lines) + "\n"


def _retried(x: dict) -> str:
    retries, before = x.get("retries", 0), x.get("drops_before", [])
    return f"{retries} ({', '.join(f'{d:+.2f}' for d in before)})" if retries else "0"


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
