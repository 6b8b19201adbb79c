"""Fine-tune and evaluate: the built-in, replaceable steps of the HQP loop.

``finetune`` runs SGD (or AdamW) with a cosine schedule over all steps, label smoothing, and
mixed precision when the model is on a GPU. Under ``torch.distributed`` it wraps the model in
DDP, so the same call works under ``torchrun``. Given a ``teacher`` (in HQP: the dense model) it
distills from it (Hinton et al., 2015): a pruned network recovers more per fine-tuning epoch
when it is pulled towards the dense network's soft predictions than from the labels alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FinetuneConfig", "distillation_loss", "evaluate", "finetune", "paired_drop"]


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 2.0
    lr: float = 0.01  # the HQP default is a tenth of the base learning rate (0.1 for CIFAR ResNets)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    amp: bool | None = None  # None: on when the model is on CUDA
    distill: float = 0.0  # weight of the distillation term, the rest on cross-entropy; > 0 needs a teacher
    temperature: float = 4.0  # softens both networks' predictions for distillation

    def __post_init__(self):
        if self.epochs < 0 or self.lr <= 0:
            raise ValueError(f"fine-tune needs epochs >= 0 and lr > 0, got epochs={self.epochs}, lr={self.lr}")
        if not 0.0 <= self.distill <= 1.0 or self.temperature <= 0:
            raise ValueError(f"distill is a weight in [0, 1] and temperature > 0, got distill={self.distill}, "
                             f"temperature={self.temperature}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")


def _set_mode(model: nn.Module, training: bool) -> None:
    """train()/eval(), except on torch.export modules, which refuse both: their mode was fixed at export."""
    try:
        model.train(training)
    except NotImplementedError:
        pass


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int | None = None,
             hits: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over ``loader``; eval mode, mode restored. Given a
    ``hits`` list, each batch's per-image top-1 hits (bool) are appended to it, for ``paired_drop`` (this
    process's images only under ``torch.distributed``)."""
    was_training = model.training
    _set_mode(model, False)
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    try:
        for x, y in loader:
            logits = model(x)
            if num_classes is not None and logits.shape[-1] != num_classes:
                raise ValueError(f"the model predicts {logits.shape[-1]} classes but the dataset has {num_classes}")
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit = top == y.view(-1, 1)
            correct1 += int(hit[:, 0].sum())
            if hits is not None:
                hits.append(hit[:, 0].cpu())
            correct5 += int(hit.any(1).sum())
            total += len(y)
    finally:
        _set_mode(model, was_training)
    if total == 0:
        raise ValueError("evaluation data is empty")
    stats = torch.tensor([correct1, correct5, total, loss_sum], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    c1, c5, n, ls = stats.tolist()
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": ls / n, "samples": int(n)}


def paired_drop(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> tuple[float, float]:
    """(top-1 drop, its standard error), in points, of ``candidate`` against ``reference`` on the same images
    (``evaluate``'s ``hits`` of each, in the same order). Paired over images: only the images that change their
    verdict vary the drop, so its error is far smaller than two independent accuracies' errors would say; it is
    what a split of that size can resolve, and a drop within it of delta_max is not a margin."""
    ref, cand = torch.cat(reference).double(), torch.cat(candidate).double()
    if ref.shape != cand.shape or ref.numel() < 2:
        raise ValueError(f"paired_drop needs the hits of both models on the same images (at least 2), got "
                         f"{ref.numel()} and {cand.numel()}")
    diff = ref - cand
    return 100.0 * float(diff.mean()), 100.0 * float(diff.std() / math.sqrt(diff.numel()))


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                      config: FinetuneConfig) -> torch.Tensor:
    """(1 - distill) * cross-entropy + distill * T^2 * KL(teacher || student), both softened by T.

    The T^2 keeps the distillation gradient's scale independent of T (Hinton et al., 2015).
    """
    ce = F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
    if teacher_logits is None or config.distill == 0:
        return ce
    t = config.temperature
    kl = F.kl_div(F.log_softmax(logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                  reduction="batchmean", log_target=True)
    return (1 - config.distill) * ce + config.distill * t * t * kl


def finetune(model: nn.Module, loader, config: FinetuneConfig = FinetuneConfig(),
             teacher: nn.Module | None = None) -> list[float]:
    """Train ``model`` in place for ``config.epochs`` (fractions allowed); returns the loss of every step.

    ``teacher`` (used only when ``config.distill`` > 0) runs in eval mode without gradients; its mode is restored.
    """
    if (config.distill > 0) != (teacher is not None):
        raise ValueError("distillation needs both a teacher and FinetuneConfig(distill > 0): pass "
                         "finetune(model, loader, FinetuneConfig(distill=0.9), teacher=dense_model), or neither")
    steps_per_epoch = len(loader)
    total_steps = int(math.ceil(config.epochs * steps_per_epoch))
    if total_steps == 0:
        return []
    device = next(model.parameters()).device
    amp = config.amp if config.amp is not None else device.type == "cuda"
    distributed = dist.is_available() and dist.is_initialized()
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    was_training = model.training
    teacher_was_training = teacher is not None and teacher.training
    model.train()
    if teacher is not None:
        _set_mode(teacher, False)
    losses: list[float] = []
    try:
        while len(losses) < total_steps:
            for x, y in loader:
                with torch.autocast(device.type, enabled=amp):
                    with torch.no_grad():
                        teacher_logits = teacher(x) if teacher is not None else None
                    loss = distillation_loss(net(x), y, teacher_logits, config)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                losses.append(float(loss.detach()))
                if len(losses) >= total_steps:
                    break
    finally:
        model.train(was_training)
        if teacher is not None:
            _set_mode(teacher, teacher_was_training)
    return losses
