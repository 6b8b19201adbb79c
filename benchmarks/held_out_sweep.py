"""Models nobody here tested against: does hqp_fx crash, prune wrongly, or refuse without a reason?

    python benchmarks/held_out_sweep.py [--only NAME ...] [--out sweep.json]

For each model (torchvision detectors' bodies and segmenters beyond the test zoo, timm families, ultralytics
tasks and generations; realistic random weights as in tests/helpers.py, 64x64 unless the model needs more): trace,
analyse, and prune a seeded 30% of every prunable group. Verdicts:

- ``ok``: pruned ≡ masked original in float64 on the groups without cross-channel ops (max error within 1e-6 of
  the output's scale), every output's shape kept, every prunable group pruned alone (a third of its channels)
  keeps them too, and the pruned model in ONNX Runtime (dynamo exporter) matches the float64 PyTorch output within
  1e-4 of its scale, or within twice PyTorch's own float32 error where that is larger;
- ``wrong``: any of those fails;
- ``crash``: an exception other than hqp_fx's own refusal (``HQPError``), with its first line;
- ``refused``: hqp_fx declined with a message (``HQPError``), or the analysis found nothing prunable, with reasons;
- ``unprunable reason missing``: a group neither prunable nor explained.

Nothing here is a test: the sweep is for finding what to fix. Results go to RESULTS.md by hand, with the date.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TORCHVISION = ["seg:fcn_resnet50", "seg:deeplabv3_resnet50", "body:retinanet_resnet50_fpn", "body:fcos_resnet50_fpn",
               "body:fasterrcnn_mobilenet_v3_large_fpn", "tv:maxvit_t", "tv:swin_v2_t", "tv:swin_s", "tv:vit_b_32",
               "tv:regnet_y_800mf", "tv:resnext101_32x8d", "tv:shufflenet_v2_x0_5", "tv:efficientnet_b3"]
TIMM = ["timm:resnet18d", "timm:mobilenetv3_small_100", "timm:efficientnet_b0", "timm:regnetx_002", "timm:ghostnet_100",
        "timm:repvgg_a0", "timm:cspdarknet53", "timm:dla34", "timm:hrnet_w18_small", "timm:vit_tiny_patch16_224",
        "timm:deit_tiny_patch16_224", "timm:levit_128s", "timm:mobilevit_xxs", "timm:convnextv2_atto",
        "timm:efficientformer_l1", "timm:rexnet_100", "timm:mixnet_s", "timm:res2net50_14w_8s", "timm:sebotnet33ts_256",
        "timm:densenet121", "timm:inception_v4", "timm:xception41", "timm:nfnet_l0", "timm:fastvit_t8",
        "timm:mobilenetv4_conv_small", "timm:edgenext_xx_small", "timm:poolformer_s12", "timm:coatnet_nano_rw_224",
        "timm:swin_tiny_patch4_window7_224"]
YOLO = ["yolo:yolov5nu", "yolo:yolov8n-seg", "yolo:yolov8n-pose", "yolo:yolov8n-obb", "yolo:yolov8n-cls",
        "yolo:yolo11n-seg", "yolo:yolo11n-pose", "yolo:yolov9t", "yolo:yolov10n", "yolo:yolo12n", "yolo:yolov6n",
        "yolo:yolov3-tiny"]
SIZES = {"timm:vit_tiny_patch16_224": 224, "timm:deit_tiny_patch16_224": 224, "timm:levit_128s": 224,
         "timm:efficientformer_l1": 224, "timm:sebotnet33ts_256": 256, "timm:coatnet_nano_rw_224": 224,
         "tv:maxvit_t": 224, "tv:swin_v2_t": 64, "tv:vit_b_32": 224, "timm:inception_v4": 96, "timm:fastvit_t8": 64,
         "timm:xception41": 96, "timm:swin_tiny_patch4_window7_224": 224}


class Body(torch.nn.Module):
    """A two-stage or dense detector's exported part: backbone (+FPN) and head, anchors and NMS outside."""

    def __init__(self, det):
        super().__init__()
        self.backbone = det.backbone
        self.head = getattr(det, "head", None) or getattr(det, "rpn", None).head

    def forward(self, x):
        feats = list(self.backbone(x).values())
        return self.head(feats)


def build(name: str):
    import torchvision

    from helpers import realistic_random

    family, _, arch = name.partition(":")
    size = SIZES.get(name, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        if family == "seg":
            model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, aux_loss=False)
        elif family == "body":
            model = Body(torchvision.models.get_model(arch, weights=None, weights_backbone=None))
            size = 128
        elif family == "tv":
            kw = {"image_size": size} if arch.startswith("vit") else {}
            model = torchvision.models.get_model(arch, weights=None, **kw)
        elif family == "timm":
            import timm

            model = timm.create_model(arch, pretrained=False)
        else:
            from ultralytics.nn.tasks import yaml_model_load, guess_model_task, DetectionModel, SegmentationModel, \
                PoseModel, OBBModel, ClassificationModel

            cfg = f"{arch}.yaml"
            task = guess_model_task(yaml_model_load(cfg))
            cls = {"detect": DetectionModel, "segment": SegmentationModel, "pose": PoseModel, "obb": OBBModel,
                   "classify": ClassificationModel}[task]
            model = cls(cfg, verbose=False)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return realistic_random(model, x), x


def check(name: str) -> dict:
    import hqp_fx
    from hqp_fx import meta
    from hqp_fx.core import HQPError
    from hqp_fx.passes import ChannelDependencyPass, PruneChannelsPass
    from helpers import masked_copy, onnx_roundtrip, output_tensors, random_plan

    t0 = time.perf_counter()
    try:
        model, x = build(name)
    except Exception as e:  # not hqp_fx's problem: the model could not be built here
        return {"verdict": "not built", "why": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    try:
        gm = hqp_fx.trace(model, x)
        ChannelDependencyPass()(gm)
        groups = meta.channel_groups(gm)
        prunable = [g for g in groups if g.prunable]
        unexplained = [g.id for g in groups if not g.prunable and not g.reason]
        info = {"groups": len(groups), "prunable": len(prunable), "leaves": sorted(gm.meta.get(meta.LEAVES, {}))}
        if unexplained:
            return {**info, "verdict": "unprunable reason missing", "why": unexplained[:5]}
        if not prunable:
            return {**info, "verdict": "refused", "why": sorted({g.reason for g in groups})[:5]}
        with torch.no_grad():
            shapes = [t.shape for t in output_tensors(gm(x))]
        plan = random_plan(groups, 0.3, seed=0)
        pruned = PruneChannelsPass(plan)(gm).graph_module
        with torch.no_grad():
            got_shapes = [t.shape for t in output_tensors(pruned(x))]
        if got_shapes != shapes:
            return {**info, "verdict": "wrong", "why": f"output shapes {got_shapes} != {shapes}"}
        exact = random_plan(groups, 0.3, seed=0, include=lambda g: not g.cross_channel)
        err = 0.0
        if exact:
            x64 = x.double()
            with torch.no_grad():
                got = output_tensors(PruneChannelsPass(exact)(gm).graph_module.double()(x64))
                ref = output_tensors(masked_copy(gm, exact).double()(x64))
            err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(got, ref))
        if err > 1e-6:
            return {**info, "verdict": "wrong", "max_rel_error": err, "exact_groups": len(exact)}
        alone = []  # every group called prunable must prune by itself
        for g in prunable:
            if g.size >= 2:
                with torch.no_grad():
                    pruned_alone = PruneChannelsPass({g.id: list(range(0, g.size, 3))})(gm).graph_module
                    if [t.shape for t in output_tensors(pruned_alone(x))] != shapes:
                        alone.append(g.id)
        if alone:
            return {**info, "verdict": "wrong", "why": f"groups that do not prune alone: {alone[:5]}"}
        with tempfile.TemporaryDirectory() as tmp:
            ort_out = onnx_roundtrip(pruned, x, Path(tmp), every_output=True)
        with torch.no_grad():  # ORT is judged against float64, with PyTorch's own float32 error as the yardstick:
            torch_out = output_tensors(pruned(x))  # a randomly pruned random net can amplify float32 rounding
            exact_out = output_tensors(copy.deepcopy(pruned).double()(x.double()))

        def rel(outs):
            return max(float((torch.as_tensor(a).double() - b).abs().max() / b.abs().max().clamp(min=1e-30))
                       for a, b in zip(outs, exact_out))
        ort_err, torch_err = rel(ort_out), rel(torch_out)
        verdict = "ok" if ort_err <= max(1e-4, 2 * torch_err) and len(ort_out) == len(torch_out) else "wrong"
        return {**info, "verdict": verdict, "max_rel_error": err, "exact_groups": len(exact),
                "ort_vs_float64": ort_err, "torch_float32_vs_float64": torch_err,
                "seconds": round(time.perf_counter() - t0, 1)}
    except HQPError as e:
        return {"verdict": "refused", "why": str(e).splitlines()[0][:300]}
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(tb)
                      if "hqp_fx" in f.filename), "")
        return {"verdict": "crash", "why": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                "where": where}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out", default="held_out_sweep.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = args.only or TORCHVISION + TIMM + YOLO
    results = {}
    for name in names:
        results[name] = check(name)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    counts = {}
    for r in results.values():
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print("summary:", counts)


if __name__ == "__main__":
    main()
