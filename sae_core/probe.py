"""Diff-C: how much class information a site holds at a noise level (Revelio, Kim et al., ICCV 2025).

Real images are noised to a level, passed once through the denoiser, each site's tokens are mean-pooled
per image (:func:`pooled`), and a light classifier is fitted on some images and scored on the others
(:func:`probe_accuracy`). A :class:`ProbeTable` holds the accuracy of every (site, level) pair, with the
chance level beside it, so a reader sees where in the network and in the sampling the semantics live.
The classifier is deliberately weak (linear, regularised): a high score means the class is readable off
the pooled activations, not that a deep probe could dig it out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .errors import InputError

WEIGHT_DECAY = 1e-3
"""L2 penalty on the classifier's weights: keeps the fit finite when the train set is separable (wide
features, few images), as it usually is."""
MAX_ITERATIONS = 200


def pooled(h: Tensor) -> Tensor:
    """(B, T, d) site tokens -> (B, d) float32 mean over tokens: Revelio pools this way, which makes the
    feature independent of the image size and of where in the image the object sits. (B, d) passes as is."""
    if h.ndim == 2:
        return h.float()
    if h.ndim != 3:
        raise InputError(f"pooled expects site tokens (batch, tokens, width), got shape {tuple(h.shape)}")
    return h.float().mean(1)


def stratified_split(labels: Tensor, test_fraction: float = 0.5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (train, test), each class split in the same proportion (at least one image on each side), so
    a rare class is not missing from either; seeded, so a rerun scores the same images."""
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction={test_fraction}: use a fraction strictly between 0 and 1")
    labels = labels.reshape(-1).long()
    generator = torch.Generator().manual_seed(int(seed))
    train, test = [], []
    for value in labels.unique().tolist():
        members = (labels == value).nonzero().reshape(-1)
        if len(members) < 2:
            raise InputError(f"class {value} has {len(members)} example(s): a train/test split needs at least 2 "
                             "per class; give more images per class")
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = min(max(int(round(test_fraction * len(members))), 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, n_classes: int,
                   seed: int = 0) -> float:
    """Diff-C's light classifier: features standardised with the train set's mean and std, multinomial
    logistic regression with weight decay fitted by full-batch L-BFGS from a seeded start, accuracy on the
    test set. Deterministic for a given seed."""
    train_x, test_x = train_x.double(), test_x.double()
    train_y, test_y = train_y.reshape(-1).long(), test_y.reshape(-1).long()
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise InputError(f"probe features must be (images, width) with one width, got {tuple(train_x.shape)} and "
                         f"{tuple(test_x.shape)}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y) or len(train_x) == 0 or len(test_x) == 0:
        raise InputError(f"probe needs one label per image and images on both sides, got {len(train_x)} train "
                         f"images / {len(train_y)} labels and {len(test_x)} test images / {len(test_y)} labels")
    labels = torch.cat([train_y, test_y])
    if n_classes < 2 or labels.min() < 0 or labels.max() >= n_classes:
        raise InputError(f"probe labels must lie in 0..{n_classes - 1} with at least 2 classes")
    if not (torch.isfinite(train_x).all() and torch.isfinite(test_x).all()):
        raise InputError("probe features hold NaN or infinite values: the activations overflowed; use float32")
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(1e-8)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    generator = torch.Generator().manual_seed(int(seed))
    weight = (0.01 * torch.randn(train_x.shape[1], n_classes, generator=generator, dtype=torch.float64)).requires_grad_()
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=MAX_ITERATIONS, history_size=20,
                                  line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimiser.zero_grad()
        value = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + WEIGHT_DECAY * weight.square().sum()
        value.backward()
        return value

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred tiny matmuls: on a busy CPU, syncing threads costs 10x the work
    try:
        with torch.enable_grad():
            optimiser.step(loss)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        predicted = (test_x @ weight + bias).argmax(1)
    return float((predicted == test_y).double().mean())


@dataclass
class ProbeTable:
    """Diff-C accuracy of every (site, level) pair, and what it should be compared with."""

    sites: list[str]
    levels: list[float]
    accuracy: Tensor
    """(sites, levels) test accuracy in [0, 1]."""
    chance: float
    """Accuracy of always answering the test set's most common class."""
    n_train: int
    n_test: int
    level_name: str = "noise level (sampling progress)"

    def __post_init__(self) -> None:
        self.accuracy = torch.as_tensor(self.accuracy, dtype=torch.float32)
        if tuple(self.accuracy.shape) != (len(self.sites), len(self.levels)):
            raise InputError(f"a probe table of {len(self.sites)} sites x {len(self.levels)} levels needs that many "
                             f"accuracies, got shape {tuple(self.accuracy.shape)}")

    def best(self) -> tuple[str, float, float]:
        """(site, level, accuracy) of the highest accuracy; the first in table order on a tie."""
        index = int(self.accuracy.reshape(-1).argmax())
        row, col = divmod(index, len(self.levels))
        return self.sites[row], float(self.levels[col]), float(self.accuracy[row, col])

    def to_json(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "levels": [float(v) for v in self.levels],
                "accuracy": [[round(float(v), 6) for v in row] for row in self.accuracy.tolist()],
                "chance": float(self.chance), "n_train": int(self.n_train), "n_test": int(self.n_test),
                "level_name": self.level_name}

    @classmethod
    def from_json(cls, data: Any) -> "ProbeTable":
        """The table that :meth:`to_json` wrote; InputError naming the missing or malformed field otherwise."""
        fields = ("sites", "levels", "accuracy", "chance", "n_train", "n_test")
        if not isinstance(data, dict) or any(name not in data for name in fields):
            raise InputError(f"not a Diff-C probe table: it needs the fields {', '.join(fields)}")
        try:
            return cls([str(s) for s in data["sites"]], [float(v) for v in data["levels"]],
                       torch.tensor(data["accuracy"], dtype=torch.float32),
                       float(data["chance"]), int(data["n_train"]), int(data["n_test"]),
                       str(data.get("level_name", cls.level_name)))
        except InputError:
            raise
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"a Diff-C probe table with malformed values ({err}): rerun the probe") from None

    def markdown(self) -> str:
        """Sites down, levels across, the best cell in bold; chance and image counts underneath."""
        best_site, best_level, _ = self.best()
        lines = ["| site | " + " | ".join(f"{level:g}" for level in self.levels) + " |",
                 "|---|" + "---:|" * len(self.levels)]
        for site, row in zip(self.sites, self.accuracy.tolist()):
            cells = [f"**{v:.3f}**" if (site, level) == (best_site, best_level) else f"{v:.3f}"
                     for level, v in zip(self.levels, row)]
            lines.append(f"| {site} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"Columns: {self.level_name}. Chance {self.chance:.3f}; {self.n_train} train / "
                     f"{self.n_test} test images.")
        return "\n".join(lines)

    def heatmap(self, title: str) -> Image.Image:
        """The table as a heatmap, coloured from chance (or the lowest score, if lower) up to 1."""
        from .plots import heatmap_chart

        finite = self.accuracy[torch.isfinite(self.accuracy)]
        low = min(self.chance, float(finite.min())) if len(finite) else self.chance
        return heatmap_chart(self.accuracy.tolist(), self.sites, [f"{level:g}" for level in self.levels],
                             f"{title}\n(chance {self.chance:.2f}; {self.n_train} train / {self.n_test} test)",
                             x_label=self.level_name, y_label="site", vmin=low if math.isfinite(low) else None,
                             vmax=1.0)
