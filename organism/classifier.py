"""A small CNN that says which of the 20 classes an organism image shows: the judge of steering.

Trained on the organism's own training split (real digits and silhouettes), checked on the held-out
split. Steering experiments count how often a sample's class flips to a target, so what matters is
that it is accurate on real images and calibrated enough to report a confidence.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .data import CLASSES, Dataset

FILE = "classifier.safetensors"


def build_classifier() -> nn.Module:
    """Conv-BN-ReLU x3 with pooling, then a linear head over the 20 classes (about 100k parameters)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(128, len(CLASSES)))


def train_classifier(train: Dataset, epochs: int = 6, batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    """AdamW with one-cycle decay and light shift augmentation (generated images are not centred exactly)."""
    torch.manual_seed(seed)
    model = build_classifier()
    steps = epochs * (len(train) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for i in range(len(train) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = train.images[idx]
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(x), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def classify(model: nn.Module, images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Images (B, 1, 32, 32) in [-1, 1] -> (class ids (B,), probabilities (B, 20))."""
    probs = torch.cat([model(images[i:i + batch_size].float()).softmax(-1) for i in range(0, len(images), batch_size)])
    return probs.argmax(-1), probs


def classify_outputs(model: nn.Module, images: Tensor) -> Tensor:
    """Class ids of generated images as the pipelines return them: (B, C, 32, 32) in [0, 1]."""
    return classify(model, images[:, :1] * 2 - 1)[0]


def accuracy(model: nn.Module, data: Dataset) -> float:
    predicted, _ = classify(model, data.images)
    return float((predicted == data.labels).float().mean())


def save_classifier(model: nn.Module, folder: Path) -> Path:
    from sae_core.atomic import save_safetensors_atomic

    path = folder / FILE
    save_safetensors_atomic(path, model.state_dict(), {"classes": ",".join(CLASSES)})
    return path


def load_classifier(folder: Optional[Path] = None) -> nn.Module:
    from safetensors.torch import load_file

    from .build import WEIGHTS

    path = (folder or WEIGHTS) / FILE
    if not path.exists():
        raise FileNotFoundError(f"no organism classifier at {path}: run `python -m training organism` to build one")
    model = build_classifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def fit_and_report(train: Dataset, held_out: Dataset, folder: Path) -> dict:
    start = time.perf_counter()
    model = train_classifier(train)
    save_classifier(model, folder)
    return {"held_out_accuracy": round(accuracy(model, held_out), 4), "seconds": round(time.perf_counter() - start, 1)}
