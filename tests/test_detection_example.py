"""The detection example (examples/detect_coco.py) on a tiny synthetic COCO-format set built here: its mAP is
pycocotools' own, and the whole job (prune under delta_max of validation mAP, INT8, ONNX Runtime) runs on it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pycocotools", reason="pycocotools is a test dependency (pip install -e '.[dev]')")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import detect_coco  # noqa: E402
from torchvision.models.detection import ssdlite320_mobilenet_v3_large  # noqa: E402

COLOURS = {1: (220, 40, 40), 2: (40, 40, 220)}  # COCO category ids 1 (red square) and 2 (blue square)


def synthetic_coco(folder: Path, n: int, seed: int) -> tuple[Path, Path]:
    """``n`` 96x72 JPEGs on a grey background, each with one or two filled squares; their COCO annotations."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.full((72, 96, 3), 128, dtype=np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            cat = int(rng.integers(1, 3))
            w = int(rng.integers(16, 32))
            x, y = int(rng.integers(0, 96 - w)), int(rng.integers(0, 72 - w))
            pixels[y:y + w, x:x + w] = COLOURS[cat]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                "bbox": [x, y, w, w], "area": w * w, "iscrowd": 0})
        Image.fromarray(pixels).save(folder / "images" / f"{i}.jpg", quality=95)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 96, "height": 72})
    ann = folder / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}))
    return folder / "images", ann


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    ssd = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    mean, std = ssd.transform.image_mean, ssd.transform.image_std
    train = detect_coco.CocoImages(*synthetic_coco(root / "train", 12, seed=0), 128, mean, std)
    val = detect_coco.CocoImages(*synthetic_coco(root / "val", 6, seed=1), 128, mean, std, categories=train.categories)
    return ssd, train, val


def test_map_is_pycocotools_on_the_original_coordinates(splits):
    """The ground truth, passed through the resize and back as detections, scores 100 points; boxes shifted by
    half their width score 0: the example's box and id conversions are the ones COCO evaluation expects."""
    _, _, val = splits
    targets = [val[i][1] for i in range(len(val))]
    exact = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]} for t in targets]
    assert detect_coco.coco_map(val.coco, detect_coco.coco_results(exact, targets, val.categories)) == pytest.approx(100.0)
    def shift(boxes):  # 0.6 of a width to the right: IoU 0.25 with the truth, a miss at every COCO threshold
        return boxes + (boxes[:, 2:3] - boxes[:, 0:1]) * torch.tensor([0.6, 0.0, 0.6, 0.0])

    shifted = [{**d, "boxes": shift(d["boxes"])} for d in exact]
    assert detect_coco.coco_map(val.coco, detect_coco.coco_results(shifted, targets, val.categories)) < 5.0
    assert detect_coco.coco_map(val.coco, []) == 0.0


@pytest.mark.slow
def test_the_whole_detection_job_runs_on_map(splits, tmp_path):
    """Prune (mAP on validation guards delta_max; the SSD loss scores channels), quantize, export, re-measure in
    ONNX Runtime. The SSD is barely trained here, so its mAP is small: this checks the plumbing and the decisions,
    not a figure."""
    ssd, train, val = splits
    torch.manual_seed(0)
    ssd.eval()
    # a few steps of training so the loss and the mAP are not those of pure noise
    task = detect_coco.SSDTask(ssd, train.size)
    body = detect_coco.SSDBody(ssd)
    detect_coco.finetune(body, task, train, steps=6, batch_size=6, lr=0.01, seed=0)
    before = {k: v.clone() for k, v in ssd.state_dict().items()}
    logs = []
    report = detect_coco.run(ssd, train, val, delta_max=100.0, steps=(0.3,), max_rounds=1, finetune_steps=1,
                             batch_size=6, out=tmp_path / "out", log=logs.append)
    assert [r["accepted"] for r in report["rounds"]] == [True]  # delta_max of 100 points: any mAP passes
    assert report["macs"][1] < 0.9 * report["macs"][0]
    maps = report["map"]
    assert all(0.0 <= v <= 100.0 for v in maps.values())
    assert report["output_sqnr_db"] > 10  # INT8 body against its FP32 self, on the calibration images
    assert (tmp_path / "out" / "ssd_body_int8.onnx").is_file() and (tmp_path / "out" / "detect.json").is_file()
    assert any(line.startswith("round 0:") for line in logs)
    for k, v in ssd.state_dict().items():
        assert torch.equal(v, before[k]), f"the job mutated the user's {k}"

    ssd.train()  # a model handed over in train mode: its BN statistics must not move either
    detect_coco.SSDTask(ssd, train.size)
    assert ssd.training
    for k, v in ssd.state_dict().items():
        assert torch.equal(v, before[k]), f"building the task mutated the user's {k}"


def test_a_round_past_delta_max_is_rolled_back_on_map(splits):
    """The loop judges mAP, not top-1: with delta_max 0 and an evaluation that drops mAP after pruning, the round
    is rolled back."""
    from hqp_fx.prune_loop import PruneLoopConfig, prune_loop

    ssd, train, _ = splits
    task = detect_coco.SSDTask(ssd, train.size)
    body = detect_coco.SSDBody(ssd).eval()
    calls = []

    def evaluate(m):  # the dense model scores 50, every pruned one 40
        calls.append(sum(p.numel() for p in m.parameters()))
        return {"map": 50.0 if len(calls) == 1 else 40.0}

    calibration = list(detect_coco.batches(train, 6))[:1]
    result = prune_loop(body, torch.randn(1, 3, train.size, train.size), calibration=calibration,
                        config=PruneLoopConfig(delta_max=5.0, steps=(0.3,), max_rounds=1, metric="map", calib_batches=1),
                        loss_fn=task.loss, finetune_fn=lambda m, r: None, evaluate_fn=evaluate)
    assert [(r.accepted, r.top1, r.drop) for r in result.history] == [(False, 40.0, 10.0)]
    assert result.final == {"map": 50.0} and calls[1] < calls[0]

    with pytest.raises(Exception, match="'map'"):
        prune_loop(body, torch.randn(1, 3, train.size, train.size), calibration=calibration,
                   config=PruneLoopConfig(metric="map", max_rounds=1), loss_fn=task.loss,
                   finetune_fn=lambda m, r: None, evaluate_fn=lambda m: {"top1": 1.0})
