"""Datasets (decode once, cache, batches) and the built-in fine-tune / evaluate steps."""
from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from hqp_fx import data as data_mod
from hqp_fx.data import BatchLoader, find_splits, load_split, unpack_once
from hqp_fx.models import build_model
from hqp_fx.train import FinetuneConfig, distillation_loss, evaluate, finetune, paired_drop


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HQP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_folder(root, classes=("cat", "dog"), per_class=3, size=8):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i:04d}.png")
    return root


def test_load_split_decodes_once_and_keeps_label_order(tmp_path, cache, monkeypatch):
    folder = make_folder(tmp_path / "train")
    ds = load_split(folder)
    assert ds.images.shape == (6, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.classes == ("cat", "dog")
    expected = np.array(Image.open(folder / "dog" / "0001.png").convert("RGB"))
    assert torch.equal(ds.images[4].permute(1, 2, 0), torch.from_numpy(expected))
    monkeypatch.setattr(data_mod, "_decode", lambda *a: pytest.fail("decoded again instead of using the cache"))
    again = load_split(folder)
    assert torch.equal(again.images, ds.images)
    assert ds.subset(2).labels.tolist() == [0, 0, 1, 1]


def test_dataset_errors_name_the_problem(tmp_path, cache):
    make_folder(tmp_path / "d" / "train")
    with pytest.raises(ValueError, match="must hold train/ and val/ \\(or test/\\)"):
        find_splits(tmp_path / "d")
    make_folder(tmp_path / "d" / "test", classes=("cat", "emu"))
    folders = find_splits(tmp_path / "d")
    assert folders.validation is None  # one evaluation folder: it is the test split; validation comes from train
    with pytest.raises(ValueError, match=r"classes \['cat', 'emu'\], which do not match \['cat', 'dog'\]"):
        load_split(folders.test, classes=load_split(folders.train).classes)
    (tmp_path / "e" / "bird").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class folders \['bird'\] .* hold no images"):
        load_split(tmp_path / "e")
    (tmp_path / "f").mkdir()
    with pytest.raises(ValueError, match="has no class folders"):
        load_split(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_splits(tmp_path / "missing")


def test_splits_and_a_stratified_disjoint_validation_hold_out(tmp_path, cache):
    make_folder(tmp_path / "d" / "train")
    make_folder(tmp_path / "d" / "val")
    assert find_splits(tmp_path / "d").test == tmp_path / "d" / "val"  # ImageNet's layout: val/ is reported
    make_folder(tmp_path / "d" / "test")
    folders = find_splits(tmp_path / "d")
    assert (folders.test, folders.validation) == (tmp_path / "d" / "test", tmp_path / "d" / "val")
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 2, 2).contiguous()
    labels = torch.tensor([0] * 30 + [1] * 10)
    full = data_mod.ImageSet(images, labels, ("a", "b"))
    rest, held = full.hold_out(0.2, seed=3)
    assert held.labels.tolist().count(0) == 6 and held.labels.tolist().count(1) == 2  # stratified
    ids = lambda s: set(s.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert ids(rest).isdisjoint(ids(held)) and ids(rest) | ids(held) == set(range(40))
    assert ids(full.hold_out(0.2, seed=3)[1]) == ids(held) != ids(full.hold_out(0.2, seed=4)[1])  # seeded
    assert len(full.hold_out(0.5, max_images=4)[1]) == 4  # the cap scales every class: 3 + 1 (at least one)
    with pytest.raises(ValueError, match="class 'b' has 1 training image"):
        data_mod.ImageSet(images[:31], labels[:31], ("a", "b")).hold_out(0.2)


def test_unpack_once_is_atomic_and_cached(tmp_path, cache):
    make_folder(tmp_path / "src" / "train")
    archive = tmp_path / "train.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "train", arcname="train")
    out = unpack_once(archive)
    assert (out / "train" / "cat" / "0000.png").is_file()
    assert unpack_once(archive) == out
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".unpack-")]


def test_batch_loader_normalises_shuffles_reproducibly_and_shards(tmp_path, cache):
    ds = load_split(make_folder(tmp_path / "train", per_class=5))
    plain = BatchLoader(ds, 4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, y = next(iter(plain))
    torch.testing.assert_close(x, ds.images[:4].float() / 255 * 2 - 1)
    assert len(plain) == 3
    a = [y.tolist() for _, y in BatchLoader(ds, 4, shuffle=True, seed=3)]
    b = [y.tolist() for _, y in BatchLoader(ds, 4, shuffle=True, seed=3)]
    assert a == b and sorted(sum(a, [])) == sorted(ds.labels.tolist())
    shards = [sum((y.tolist() for _, y in BatchLoader(ds, 2, rank=r, world_size=2)), []) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(ds.labels.tolist()) and len(shards[0]) == 5
    xa, _ = next(iter(BatchLoader(ds, 10, augment=True, seed=1)))
    assert xa.shape == (10, 3, 8, 8) and not torch.equal(xa, next(iter(BatchLoader(ds, 10)))[0])


def toy_problem(n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def test_evaluate_matches_hand_computation():
    model = nn.Linear(4, 6)
    batches = toy_problem()
    stats = evaluate(model, batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model(x)
    assert stats["top1"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert stats["top5"] == pytest.approx(100 * (logits.topk(5).indices == y[:, None]).any(1).float().mean().item())
    assert stats["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    with pytest.raises(ValueError, match="predicts 6 classes but the dataset has 10"):
        evaluate(model, batches, num_classes=10)
    with pytest.raises(ValueError, match="evaluation data is empty"):
        evaluate(model, [])


def test_paired_drop_and_its_standard_error_from_the_per_image_hits():
    """evaluate's per-image hits, in loader order; the drop's error counts only the images that changed verdict:
    2 of 4 here (one lost, one gained), so drop 0 with error sd([0, 1, 0, -1]) / 2."""
    model, batches = nn.Linear(4, 6), toy_problem()
    hits: list[torch.Tensor] = []
    stats = evaluate(model, batches, hits=hits)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        assert torch.equal(torch.cat(hits), model(x).argmax(1) == y)
    assert 100 * torch.cat(hits).double().mean().item() == pytest.approx(stats["top1"])
    dense, pruned = [torch.tensor([True, True]), torch.tensor([True, False])], [torch.tensor([True, False, True, True])]
    drop, se = paired_drop(dense, pruned)
    assert drop == pytest.approx(0.0) and se == pytest.approx(100 * (2 / 3) ** 0.5 / 2)
    assert paired_drop(dense, dense) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        paired_drop(dense, [torch.tensor([True])])


def test_finetune_learns_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    batches = toy_problem()
    before = evaluate(model, batches)["loss"]
    losses = finetune(model, batches, FinetuneConfig(epochs=5, lr=0.1, label_smoothing=0.1))
    assert len(losses) == 5 * len(batches)
    assert evaluate(model, batches)["loss"] < 0.5 * before and not model.training
    assert finetune(model, batches, FinetuneConfig(epochs=0.5, optimizer="adamw", lr=1e-3)) and len(
        finetune(model, batches, FinetuneConfig(epochs=0.5, lr=1e-3))) == 4
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adamw'"):
        FinetuneConfig(optimizer="lion")
    with pytest.raises(ValueError, match="epochs >= 0 and lr > 0"):
        FinetuneConfig(lr=0)


def test_distillation_loss_matches_hand_computed_value():
    logits, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    y = torch.tensor([0])
    t, w = 2.0, 0.75
    p_teacher = torch.softmax(teacher / t, -1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(logits / t, -1))).sum()
    ce = -torch.log_softmax(logits, -1)[0, 0]
    config = FinetuneConfig(distill=w, temperature=t)
    assert distillation_loss(logits, y, teacher, config).item() == pytest.approx(((1 - w) * ce + w * t * t * kl).item())
    assert distillation_loss(logits, y, None, FinetuneConfig()).item() == pytest.approx(ce.item())
    assert distillation_loss(logits, y, logits, FinetuneConfig(distill=1.0)).item() == pytest.approx(0.0, abs=1e-7)


def test_finetune_distills_towards_the_teacher_without_touching_it():
    torch.manual_seed(0)
    # (the BN would move its running statistics if finetune ran the teacher in train mode)
    teacher = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).train()
    student = nn.Sequential(nn.Linear(4, 4))
    batches = toy_problem()
    x = torch.cat([b[0] for b in batches])
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}

    def gap():
        with torch.no_grad():
            return nn.functional.kl_div(student(x).log_softmax(-1), teacher.eval()(x).log_softmax(-1),
                                        reduction="batchmean", log_target=True).item()

    before = gap()
    teacher.train()
    finetune(student, batches, FinetuneConfig(epochs=20, lr=0.1, distill=1.0, temperature=1.0), teacher=teacher)
    assert teacher.training, "the teacher's mode must be restored"
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert gap() < 0.2 * before
    with pytest.raises(ValueError, match="distillation needs both a teacher"):
        finetune(student, batches, FinetuneConfig(distill=0.5))
    with pytest.raises(ValueError, match="distillation needs both a teacher"):
        finetune(student, batches, FinetuneConfig(), teacher=teacher)
    with pytest.raises(ValueError, match=r"distill is a weight in \[0, 1\]"):
        FinetuneConfig(distill=1.5)


@pytest.mark.slow
def test_real_checkpoint_accuracy_on_full_jpeg_test_set(shared_dir, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HQP_CACHE", str(tmp_path_factory.mktemp("cache")))
    test = load_split(unpack_once(shared_dir / "data/cifar10-jpeg/test.tar.gz") / "test")
    assert len(test) == 10000 and test.images.shape[1:] == (3, 32, 32)
    ckpt = shared_dir / "models/cifar-resnet/resnet20_cifar10jpeg.pt"
    recorded = 100 * torch.load(ckpt, weights_only=True)["test_acc_cifar10_jpeg"]
    stats = evaluate(build_model("cifar:resnet20", str(ckpt)).model, BatchLoader(test, 500), num_classes=10)
    assert stats["samples"] == 10000
    assert abs(stats["top1"] - recorded) < 0.3, f"{stats['top1']:.2f}% vs {recorded:.2f}% recorded with the checkpoint"
