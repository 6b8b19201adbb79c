"""Prune and quantize a torchvision SSDlite detector on your own COCO-format data, judged by COCO mAP.

    python examples/detect_coco.py --train-images imgs/ --train-ann train.json --val-images imgs/ \
        --val-ann val.json --weights ssd.pt --num-classes 3 --delta-max 1.0 --out ssd_hqp/

hqp_fx traces, prunes and quantizes what a deployment exports: the backbone and the head, whose outputs are the raw
box regressions and class logits. Anchors, box decoding and NMS stay in torchvision's SSD, outside the graph, as
deployment tools keep them. The pruning loop (``hqp_fx.prune_loop``) is task-agnostic: it scores channels with the
SSD's own training loss (``loss_fn``), fine-tunes with it, and guards COCO mAP@[.5:.95] (pycocotools, in points)
on the validation annotations against ``delta_max``. The accepted model is quantized to INT8 (pt2e), exported to
ONNX, and its mAP is measured again through ONNX Runtime, with the same decoding.

The functions are the recipe for any detector: swap ``SSDBody``/``SSDTask`` for your model's body and loss.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

import hqp_fx
from hqp_fx.core import atomic_write_text
from hqp_fx.count import count_macs
from hqp_fx.engines.ort import OrtModel
from hqp_fx.lower_onnx import export_onnx
from hqp_fx.passes.quantize import QuantConfig, quantize
from hqp_fx.prune_loop import PruneLoopConfig, prune_loop


class CocoImages(torch.utils.data.Dataset):
    """A COCO-format split resized to ``size``×``size``: (image tensor, target) with ``boxes`` in xyxy pixels of the
    resized image and ``labels`` 1..K (0 is SSD's background), plus what maps detections back to COCO ids."""

    def __init__(self, images: Path, annotations: Path, size: int, mean, std, categories: list[int] | None = None):
        from pycocotools.coco import COCO

        self.coco, self.root, self.size = COCO(str(annotations)), Path(images), size
        self.ids = sorted(self.coco.getImgIds())
        self.categories = categories or sorted(self.coco.getCatIds())  # label k <-> COCO id categories[k - 1]
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        info = self.coco.loadImgs(self.ids[i])[0]
        img = Image.open(self.root / info["file_name"]).convert("RGB")
        sx, sy = self.size / img.width, self.size / img.height
        x = torch.from_numpy(np.asarray(img.resize((self.size, self.size), Image.BILINEAR), dtype=np.float32) / 255)
        x = (x.permute(2, 0, 1) - self.mean) / self.std
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"], iscrowd=False))
                if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor([[a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                               (a["bbox"][1] + a["bbox"][3]) * sy] for a in anns], dtype=torch.float32).view(-1, 4)
        labels = torch.tensor([self.categories.index(a["category_id"]) + 1 for a in anns], dtype=torch.int64)
        return x, {"boxes": boxes, "labels": labels, "image_id": info["id"], "scale": (sx, sy)}


def batches(data: CocoImages, batch_size: int, shuffle: bool = False, seed: int = 0):
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle \
        else list(range(len(data)))
    for start in range(0, len(order), batch_size):
        items = [data[i] for i in order[start:start + batch_size]]
        yield torch.stack([x for x, _ in items]), [t for _, t in items]


class SSDBody(nn.Module):
    """What is deployed and pruned: backbone + head, returning the raw ``bbox_regression`` and ``cls_logits``."""

    def __init__(self, ssd: nn.Module):
        super().__init__()
        self.backbone, self.head = ssd.backbone, ssd.head

    def forward(self, x):
        return self.head(list(self.backbone(x).values()))


class SSDTask:
    """The SSD's anchors, loss and decoding, kept outside the graph (pruning changes channels, not the feature maps'
    sizes, so the anchors of the dense model serve every pruned one)."""

    def __init__(self, ssd: nn.Module, size: int):
        self.ssd, self.size = copy.deepcopy(ssd).eval(), size  # its own copy: the user's model keeps its mode
        with torch.no_grad():
            x = torch.zeros(1, 3, size, size)
            features = list(self.ssd.backbone(x).values())
            self.anchors = self.ssd.anchor_generator(ImageList(x, [(size, size)]), features)[0]

    def loss(self, head_outputs: dict, targets: list[dict]) -> torch.Tensor:
        matched = []
        for t in targets:
            if t["boxes"].numel() == 0:
                matched.append(torch.full((len(self.anchors),), -1, dtype=torch.int64))
            else:
                matched.append(self.ssd.proposal_matcher(box_iou(t["boxes"], self.anchors)))
        losses = self.ssd.compute_loss(targets, head_outputs, [self.anchors] * len(targets), matched)
        return losses["bbox_regression"] + losses["classification"]

    def detect(self, head_outputs: dict) -> list[dict]:
        n = head_outputs["cls_logits"].shape[0]
        return self.ssd.postprocess_detections(head_outputs, [self.anchors] * n, [(self.size, self.size)] * n)


def coco_results(detections: list[dict], targets: list[dict], categories: list[int]) -> list[dict]:
    """Detections on resized images -> COCO result entries (xywh in the original image, COCO category ids)."""
    out = []
    for det, t in zip(detections, targets):
        sx, sy = t["scale"]
        for (x0, y0, x1, y1), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            out.append({"image_id": t["image_id"], "category_id": categories[label - 1], "score": score,
                        "bbox": [x0 / sx, y0 / sy, (x1 - x0) / sx, (y1 - y0) / sy]})
    return out


def coco_map(coco_gt, results: list[dict]) -> float:
    """COCO mAP@[.5:.95] in points (pycocotools' COCOeval); 0 when there is no detection at all."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables; the caller's log should not fill
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return max(0.0, float(evaluator.stats[0])) * 100


def evaluate_map(model, task: SSDTask, data: CocoImages, batch_size: int = 16) -> dict:
    """{"map": points} of ``model`` (a torch module or an ``OrtModel`` returning the head's two outputs)."""
    results = []
    with torch.no_grad():
        for x, targets in batches(data, batch_size):
            out = model(x)
            if not isinstance(out, dict):  # ONNX Runtime returns the outputs in order
                out = {"bbox_regression": out[0], "cls_logits": out[1]}
            results += coco_results(task.detect(out), targets, data.categories)
    return {"map": coco_map(data.coco, results)}


def finetune(model: nn.Module, task: SSDTask, data: CocoImages, steps: int, batch_size: int, lr: float,
             seed: int) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=4e-5)
    done = 0
    while done < steps:
        for x, targets in batches(data, batch_size, shuffle=True, seed=seed + done):
            loss = task.loss(model(x), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()


def run(ssd: nn.Module, train: CocoImages, val: CocoImages, *, delta_max: float = 1.0, steps=(0.05, 0.02, 0.01),
        max_rounds: int = 20, finetune_steps: int = 100, batch_size: int = 16, lr: float = 1e-3,
        out: Path | None = None, seed: int = 0, log=print) -> dict:
    """The whole job on ``ssd`` (left untouched): prune under delta_max of validation mAP, quantize, export, re-measure."""
    size = train.size
    task = SSDTask(ssd, size)
    body = SSDBody(copy.deepcopy(ssd)).eval()
    example = torch.randn(1, 3, size, size)
    calibration = list(batches(train, batch_size, shuffle=True, seed=seed))[:4]
    config = PruneLoopConfig(delta_max=delta_max, steps=tuple(steps), max_rounds=max_rounds, metric="map", seed=seed,
                             calib_batches=4)
    result = prune_loop(
        body, example, calibration=calibration, config=config, loss_fn=task.loss,
        finetune_fn=lambda m, rnd: finetune(m, task, train, finetune_steps, batch_size, lr, seed * 1000 + rnd),
        evaluate_fn=lambda m: evaluate_map(m, task, val, batch_size),
        on_round=lambda r: log(f"round {r.round}: step {r.step:g}, mAP {r.top1:.2f} (drop {r.drop:.2f}), "
                               f"{'accepted' if r.accepted else 'rolled back'}"))
    log(f"pruning stopped: {result.stop_reason}")
    int8 = quantize(result.model, example, [x for x, _ in calibration], QuantConfig(backend="onnxruntime"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "ssd_body_int8.onnx"
        export_onnx(int8.model, (example,), path, output_names=("bbox_regression", "cls_logits"))
        onnx_map = evaluate_map(OrtModel(path, threads=2), task, val, batch_size)["map"]
        hqp_fx.save(result.model, folder / "ssd_body_pruned.hqp")
    report = {"map_on": "validation",
              "map": {"dense_fp32": result.baseline["map"], "pruned_fp32": result.final["map"], "int8_onnxruntime": onnx_map},
              "macs": [result.baseline_macs, count_macs(result.model, example)],
              "rounds": [{"round": r.round, "step": r.step, "map": r.top1, "accepted": r.accepted} for r in result.history],
              "stop_reason": result.stop_reason, "output_sqnr_db": int8.output_sqnr_db}
    if out is not None:
        atomic_write_text(Path(out) / "detect.json", json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-images", type=Path, required=True)
    p.add_argument("--train-ann", type=Path, required=True)
    p.add_argument("--val-images", type=Path, required=True)
    p.add_argument("--val-ann", type=Path, required=True)
    p.add_argument("--num-classes", type=int, required=True, help="object classes, without the background")
    p.add_argument("--weights", type=Path, help="a state_dict of ssdlite320_mobilenet_v3_large(num_classes=K+1)")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--delta-max", type=float, default=1.0, help="largest allowed drop of validation mAP, in points")
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    ssd = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=args.num_classes + 1)
    if args.weights:
        ssd.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    mean, std = ssd.transform.image_mean, ssd.transform.image_std
    train = CocoImages(args.train_images, args.train_ann, args.size, mean, std)
    val = CocoImages(args.val_images, args.val_ann, args.size, mean, std, categories=train.categories)
    report = run(ssd, train, val, delta_max=args.delta_max, finetune_steps=args.finetune_steps, out=args.out)
    print(json.dumps(report["map"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
