"""Image datasets for calibration, fine-tuning and evaluation.

An ImageFolder split (``root/<class>/<image>``) is decoded once into a uint8 tensor and cached
on disk (``~/.cache/hqp`` or ``$HQP_CACHE``): decoding 50,000 small JPEGs every epoch would
dominate a CPU fine-tune. Normalisation and augmentation run on whole batches of tensors.
torchvision's ImageFolder is not used for the epochs themselves for that reason; it is the
layout we read.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .core import atomic_torch_save

__all__ = ["ImageSet", "SplitFolders", "load_split", "find_splits", "BatchLoader", "unpack_once", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def cache_dir() -> Path:
    return Path(os.environ.get("HQP_CACHE", Path.home() / ".cache" / "hqp"))


@dataclass
class ImageSet:
    """A decoded split: ``images`` uint8 [N, 3, H, W], ``labels`` int64 [N], class names in label order."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self) -> str:
        """A content hash of the pixels, labels and class names: the same data, whatever its path."""
        h = hashlib.blake2b("|".join(self.classes).encode(), digest_size=16)
        h.update(self.labels.numpy().tobytes())
        h.update(self.images.contiguous().numpy().tobytes())
        return h.hexdigest()

    def hold_out(self, fraction: float = 0.1, max_images: int = 5000, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """(rest, held out): a stratified, seeded validation split of ``fraction`` of every class (at most
        ``max_images`` in all, at least one image per class), disjoint from the rest."""
        if not 0 < fraction < 1 or max_images < 1:
            raise ValueError(f"a validation split needs a fraction in (0, 1) and max_images >= 1, got {fraction}, "
                             f"{max_images}")
        share = min(fraction, max_images / len(self))
        gen = torch.Generator().manual_seed(seed)
        held = []
        for c in range(len(self.classes)):
            members = torch.nonzero(self.labels == c).flatten()
            if len(members) < 2:
                raise ValueError(f"class {self.classes[c]!r} has {len(members)} training image(s): too few to hold "
                                 "one out for validation; add images, or give the data a val/ beside its test/")
            take = max(1, round(share * len(members)))
            held.append(members[torch.randperm(len(members), generator=gen)[:take]])
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[torch.cat(held)] = True
        return (ImageSet(self.images[~mask], self.labels[~mask], self.classes),
                ImageSet(self.images[mask], self.labels[mask], self.classes))

    def subset(self, per_class: int) -> "ImageSet":
        """The first ``per_class`` images of every class (deterministic)."""
        keep = torch.cat([torch.nonzero(self.labels == c).flatten()[:per_class] for c in range(len(self.classes))])
        return ImageSet(self.images[keep], self.labels[keep], self.classes)


def unpack_once(archive: str | os.PathLike) -> Path:
    """Unpack a ``.tar.gz`` into the cache (once, atomically) and return the unpacked folder."""
    archive = Path(archive)
    target = cache_dir() / "unpacked" / f"{archive.name.split('.')[0]}-{_fingerprint(archive)[:12]}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
    with tarfile.open(archive) as tf:
        tf.extractall(tmp, filter="data")
    os.replace(tmp, target)
    return target


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


@dataclass(frozen=True)
class SplitFolders:
    """A dataset root's folders. ``test`` is only ever reported; ``validation`` (``val/`` beside a ``test/``) makes
    the decisions, and when it is None a validation split is carved from ``train`` (``ImageSet.hold_out``)."""

    train: Path
    test: Path
    validation: Path | None


def find_splits(root: str | os.PathLike) -> SplitFolders:
    """The folders of a dataset root holding ``train/`` and ``test/`` and/or ``val/``.

    With both ``val/`` and ``test/``, ``val/`` is the validation split; with one of them, that one is the reported
    test split (ImageNet's ``val/`` is its de-facto test set) and the validation split comes from ``train/``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    train, val, test = (root / s for s in ("train", "val", "test"))
    if not train.is_dir() or not (val.is_dir() or test.is_dir()):
        raise ValueError(f"{root} must hold train/ and val/ (or test/) folders in ImageFolder layout "
                         "(train/<class>/<image>.jpg)")
    if test.is_dir():
        return SplitFolders(train, test, val if val.is_dir() else None)
    return SplitFolders(train, val, None)


def load_split(folder: str | os.PathLike, classes: tuple[str, ...] | None = None, size: int | None = None) -> ImageSet:
    """Decode an ImageFolder split (cached). ``classes`` enforces the same label order as another split.

    A corrupt or truncated image is fatal, with the files named: skipping it would change the split."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    found = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir()))
    if not found:
        raise ValueError(f"{folder} has no class folders; expected ImageFolder layout {folder}/<class>/<image>")
    if classes is not None and found != tuple(classes):
        raise ValueError(f"{folder} has classes {list(found)}, which do not match {list(classes)} of the other split")
    files = [(p, i) for i, c in enumerate(found) for p in sorted((folder / c).iterdir()) if p.suffix.lower() in _EXTENSIONS]
    empty = [c for i, c in enumerate(found) if not any(label == i for _, label in files)]
    if empty:
        raise ValueError(f"class folders {empty} in {folder} hold no images")
    key = hashlib.sha256("|".join(f"{p}:{_file_key(p)}" for p, _ in files).encode() + str(size).encode()).hexdigest()
    cached = cache_dir() / "decoded" / f"{folder.name}-{key[:16]}.pt"
    if cached.is_file():
        data = torch.load(cached, weights_only=True)
        return ImageSet(data["images"], data["labels"], tuple(data["classes"]))
    decoded, broken = [], []
    for p, _ in files:
        try:
            decoded.append(_decode(p, size))
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises on truncated or corrupt files
            broken.append(f"{p} ({exc})")
    if broken:
        raise ValueError(f"{len(broken)} image(s) in {folder} cannot be decoded, e.g. {'; '.join(broken[:3])}; "
                         "remove or replace them (hqp_fx never skips images silently: the split would change)")
    if len({a.shape for a in decoded}) > 1:
        raise ValueError(f"the images in {folder} have different sizes {sorted({a.shape[:2] for a in decoded})[:4]}; "
                         "pass a size (hqp: --input-size) to resize them all")
    images = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"images": images, "labels": labels, "classes": list(found)}, cached)
    return ImageSet(images, labels, found)


def _file_key(path: Path) -> str:
    """Size, inode, modification and change time: rewriting, replacing or swapping a file (even at the same
    size, even with its mtime restored) changes the key, without reading every image's bytes on each run."""
    st = path.stat()
    return f"{st.st_size}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _decode(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


class BatchLoader:
    """Batches of normalised float tensors from an ImageSet; ``augment`` = random crop (pad 4) + flip.

    Iterating yields ``(images, labels)``; shuffling is seeded per epoch so runs repeat exactly.
    ``rank``/``world_size`` give each DDP process its own interleaved shard.
    """

    def __init__(self, data: ImageSet, batch_size: int = 128, *, shuffle: bool = False, augment: bool = False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu"):
        if len(data) == 0:
            raise ValueError("the dataset is empty")
        self.data, self.batch_size, self.shuffle, self.augment = data, batch_size, shuffle, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, torch.device(device)
        self.epoch = 0

    def __len__(self) -> int:
        n = len(range(self.rank, len(self.data), self.world_size))
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.data), generator=gen) if self.shuffle else torch.arange(len(self.data))
        order = order[self.rank::self.world_size]
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.data.images[idx].to(self.device, non_blocking=True).float().div_(255)
            if self.augment:
                x = _augment(x, gen)
            yield (x - self.mean.to(x.device)) / self.std.to(x.device), self.data.labels[idx].to(self.device)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip, per image, vectorised over the batch."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
