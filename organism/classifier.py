"""A small CNN that says which of the 20 classes an organism image shows: the judge of steering.

Trained on the organism's own training split (real digits and silhouettes), checked on the held-out
split. Steering experiments count how often a sample's class flips to a target, so what matters is
that it is accurate on real images and calibrated enough to report a confidence. Its training is in
``training/organism_fit.py``; here is what builds, loads and runs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from . import WEIGHTS
from .data import CLASSES, Dataset

FILE = "classifier.safetensors"


def build_classifier() -> nn.Module:
    """Conv-BN-ReLU x3 with pooling, then a linear head over the 20 classes (about 100k parameters)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(128, len(CLASSES)))


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


def load_classifier(folder: Optional[Path] = None) -> nn.Module:
    from safetensors.torch import load_file

    path = (folder or WEIGHTS) / FILE
    if not path.exists():
        raise FileNotFoundError(f"no organism classifier at {path}: run `python -m training organism` to build one")
    model = build_classifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
