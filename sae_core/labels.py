"""Names for dictionary features, from three sources behind one interface.

A :class:`Label` says what a feature responds to, where the name came from and how much to trust it:

* ``words``: the prompt words most associated with the feature (:func:`label_from_words`); offline, always
  available.
* ``vlm``: a vision-language model shown the feature's top images with their heatmaps
  (:class:`VLMSource`, over any OpenAI-compatible endpoint, see :mod:`sae_core.vlm`), then asked to pick the
  feature's held-out images from a mix with other features' images, which scores the label.
* ``clip``: the vocabulary word whose CLIP text embedding lies closest to the feature's image embeddings
  (:func:`clip_label`).

:class:`LabelStore` keeps every source's label side by side in ``labels.json`` in a feature-index folder and
rewrites it atomically as labels come (every label of a slow source; every few seconds for fast ones), so
:func:`label_features` can be stopped at any point and a rerun goes on where it stopped: features labelled
``ok`` by that source are skipped, every other status is retried.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import Tensor

from .atomic import atomic_write
from .errors import InputError
from .vlm import ImageInput, VLMClient, VLMFailure

log = logging.getLogger("sae_core.labels")

SOURCES = ("words", "vlm", "clip")
STATUSES = ("ok", "timeout", "refused", "malformed", "rate_limited", "error", "pending")
LABELS_FILE = "labels.json"
FILE_FORMAT = "diffusion-sae-labels"
FILE_VERSION = 1
SAVE_EVERY_S = 2.0
CLIP_LOGIT_SCALE = 100.0  # CLIP's learned temperature, so the probabilities read like CLIP's own zero-shot ones

DEFAULT_VOCABULARY: tuple[str, ...] = (
    # colours and light
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "gold",
    "silver", "pastel colors", "neon light", "sunlight", "shadow", "darkness", "reflection", "glow",
    # textures and materials
    "wood", "metal", "glass", "stone", "brick", "concrete", "fabric", "leather", "fur", "feathers", "scales",
    "hair", "skin", "water", "ice", "snow", "sand", "grass", "leaves", "paper", "plastic", "smoke", "fire",
    "clouds", "stripes", "dots", "checkerboard pattern", "smooth surface", "rough texture", "wrinkles",
    # people and body parts
    "face", "eyes", "nose", "mouth", "lips", "teeth", "ears", "hand", "fingers", "arm", "leg", "foot",
    "hair on a head", "beard", "man", "woman", "child", "baby", "crowd", "smile",
    # clothing and accessories
    "shirt", "dress", "jacket", "hat", "glasses", "shoes", "jewelry", "tie", "uniform", "armor",
    # animals
    "dog", "cat", "horse", "bird", "fish", "cow", "sheep", "lion", "tiger", "bear", "elephant", "monkey",
    "insect", "butterfly", "snake", "rabbit", "deer", "duck",
    # plants and food
    "tree", "flower", "rose", "forest", "fruit", "apple", "bread", "cake", "coffee", "vegetables", "pizza",
    # nature and scenes
    "sky", "sun", "moon", "stars", "mountain", "hill", "river", "lake", "ocean", "beach", "waves", "desert",
    "field", "garden", "park", "city", "street", "road", "bridge", "building", "skyscraper", "house", "roof",
    "window", "door", "wall", "floor", "ceiling", "room", "kitchen", "bedroom", "office", "church", "castle",
    "ruins", "night", "sunset", "rain", "fog",
    # objects
    "car", "bus", "bicycle", "motorcycle", "train", "airplane", "boat", "ship", "chair", "table", "bed",
    "sofa", "lamp", "book", "cup", "bottle", "plate", "clock", "phone", "computer", "screen", "camera",
    "sword", "gun", "ball", "toy", "flag", "sign", "candle", "mirror", "painting", "statue", "robot",
    # text, art and style
    "text", "letters", "numbers", "logo", "drawing", "sketch", "cartoon", "anime", "oil painting",
    "watercolor", "photograph", "3d render", "pixel art", "black and white photo", "blurry background",
    "bokeh", "close-up", "wide landscape", "portrait", "symmetry",
    # shapes and layout
    "circle", "square", "triangle", "line", "curve", "edge", "corner", "grid", "horizon", "border",
    "background", "foreground", "center of the image", "empty space",
)
"""~200 common visual concepts for CLIP zero-shot labels; pass your own list to :func:`clip_label` to
override it. Embed each word through a prompt such as ``"a photo of {word}"``, as CLIP was trained on captions."""


@dataclass(frozen=True)
class Label:
    """One source's name for one feature.

    ``score`` is in [0, 1] (what it measures depends on ``source``, see each source) or None when unscored;
    ``status`` is ``ok`` or why there is no usable label (``detail`` says more, on one line).
    """

    feature: int
    text: str
    source: str
    score: float | None = None
    status: str = "ok"
    detail: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.feature, bool) or not isinstance(self.feature, numbers.Integral) or self.feature < 0:
            raise InputError(f"label feature id {self.feature!r} is not a non-negative integer")
        object.__setattr__(self, "feature", int(self.feature))  # numpy and torch integers read back as plain ints
        if self.source not in SOURCES:
            raise InputError(f"label source {self.source!r} is unknown: use one of {', '.join(SOURCES)}")
        if self.status not in STATUSES:
            raise InputError(f"label status {self.status!r} is unknown: use one of {', '.join(STATUSES)}")
        if not isinstance(self.text, str) or not isinstance(self.detail, str):
            raise InputError(f"label text and detail of feature {self.feature} must be strings")
        if self.score is not None:
            if isinstance(self.score, bool) or not isinstance(self.score, numbers.Real) or not 0.0 <= self.score <= 1.0:
                raise InputError(f"label score {self.score!r} of feature {self.feature} is not a number in [0, 1]")
            object.__setattr__(self, "score", float(self.score))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "score": self.score, "status": self.status, "detail": self.detail}

    @classmethod
    def from_json(cls, feature: int, source: str, entry: Any) -> Label:
        if not isinstance(entry, dict):
            raise InputError(f"label of feature {feature} from {source!r} is not an object")
        return cls(feature, entry.get("text", ""), source, entry.get("score"), entry.get("status", "ok"),
                   entry.get("detail", ""))


class LabelStore:
    """``labels.json`` in a feature-index folder: every source's label per feature, rewritten whole and
    atomically on each save, so the file is always either the previous or the new complete version."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LABELS_FILE
        self._labels: dict[int, dict[str, Label]] = self._read()

    def get(self, feature: int, source: str) -> Label | None:
        return self._labels.get(feature, {}).get(source)

    def of_feature(self, feature: int) -> dict[str, Label]:
        """Every source's label of one feature, by source."""
        return dict(self._labels.get(feature, {}))

    def labels(self, source: str | None = None) -> list[Label]:
        """All labels (of one source, if given), by feature id."""
        return [label for feature in sorted(self._labels) for name, label in sorted(self._labels[feature].items())
                if source is None or name == source]

    def needs_label(self, features: Iterable[int], source: str) -> list[int]:
        """The features, in the given order and once each, that have no ``ok`` label from ``source`` yet."""
        seen: set[int] = set()
        todo = []
        for feature in features:
            label = self.get(feature, source)
            if feature not in seen and (label is None or not label.ok):
                todo.append(feature)
            seen.add(feature)
        return todo

    def put(self, *labels: Label) -> None:
        """:meth:`record` the labels and :meth:`save` at once."""
        self.record(*labels)
        self.save()

    def record(self, *labels: Label) -> None:
        """Keep labels in memory (replacing the same feature's label from the same source) until :meth:`save`."""
        for label in labels:
            self._labels.setdefault(label.feature, {})[label.source] = label

    def save(self) -> None:
        """Rewrite the file with every label recorded so far, atomically."""
        document = {"format": FILE_FORMAT, "version": FILE_VERSION,
                    "features": {str(feature): {name: label.to_json() for name, label in sorted(by_source.items())}
                                 for feature, by_source in sorted(self._labels.items())}}
        text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _read(self) -> dict[int, dict[str, Label]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read {self.path}: {err}") from None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            raise self._damaged(f"not JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
            raise self._damaged(f"not a {FILE_FORMAT} file")
        if document.get("version") != FILE_VERSION:
            raise InputError(f"{self.path} is version {document.get('version')!r}; this version of Diffusion SAE "
                             f"reads version {FILE_VERSION}: update it, or move the file away to label again")
        features = document.get("features")
        if not isinstance(features, dict):
            raise self._damaged("no 'features' object")
        labels: dict[int, dict[str, Label]] = {}
        for key, by_source in features.items():
            if not key.isdigit() or not isinstance(by_source, dict):
                raise self._damaged(f"entry {key!r} is not a feature id holding labels by source")
            try:
                labels[int(key)] = {source: Label.from_json(int(key), source, entry) for source, entry in by_source.items()}
            except InputError as err:
                raise self._damaged(str(err)) from None
        return labels

    def _damaged(self, why: str) -> InputError:
        return InputError(f"{self.path} is damaged ({why}): delete it to label again, or restore it from a copy")


@dataclass(frozen=True)
class FeatureEvidence:
    """What the sources look at for one feature: its top images (heatmap overlaid, strongest first; PIL images
    or paths of image files, which are opened only when sent), its most associated prompt words with their
    association scores, and CLIP image embeddings of its top images."""

    feature: int
    images: Sequence[ImageInput] = ()
    words: Sequence[tuple[str, float]] = ()
    image_embeddings: Tensor | None = field(default=None, repr=False)


class LabelSource(Protocol):
    """Anything that names one feature; ``pool`` holds all features being labelled (for comparisons)."""

    name: str

    def label(self, feature: FeatureEvidence, pool: Sequence[FeatureEvidence]) -> Label: ...


def label_features(features: Iterable[FeatureEvidence], source: LabelSource, store: LabelStore,
                   progress: Callable[[int, int, Label], None] | None = None,
                   save_every: float = SAVE_EVERY_S) -> list[Label]:
    """Label every feature that has no ``ok`` label from ``source`` yet, saving labels as they come.

    Features still to do are first saved as ``pending``. A failed feature keeps its failure status and the
    run goes on; ``progress(done, total, label)`` is called after each label. The store is saved when a
    label comes ``save_every`` seconds or more after the last save (so a slow source such as a VLM saves
    every label, while the fast ones do not rewrite the file thousands of times a second), and when the run
    ends or is stopped by an exception (from ``progress``, say): a rerun resumes where it stopped. Returns
    this source's label of every given feature.
    """
    features = list(features)
    by_id = {feature.feature: feature for feature in features}
    todo = store.needs_label(by_id, source.name)
    queued = [Label(feature, "", source.name, status="pending")
              for feature in todo if store.get(feature, source.name) is None]
    if queued:
        store.put(*queued)
    saved_at = time.monotonic()
    try:
        for done, feature in enumerate(todo, start=1):
            label = source.label(by_id[feature], features)
            store.record(label)
            if time.monotonic() - saved_at >= save_every:
                store.save()
                saved_at = time.monotonic()
            if not label.ok:
                log.warning("feature %d: no %s label (%s: %s)", feature, source.name, label.status, label.detail)
            if progress is not None:
                progress(done, len(todo), label)
    finally:
        if todo:
            store.save()
    return [store.get(feature, source.name) for feature in by_id]


def label_from_words(words: Sequence[tuple[str, float]], *, feature: int = 0, top: int = 3) -> Label:
    """A label from the prompt words most associated with a feature, and how much of the association it holds.

    Words with a positive, finite score count (the same word twice counts once, at its best score). The label
    joins the best word with the next ones up to ``top`` words that score at least half as much as the best.
    Score: the kept words' share of the summed positive association of all listed words. Near 1 means the
    feature is tied to these words alone; low means it is spread over many words and the label is a weak guess.
    It measures concentration, so it does not depend on the association measure's scale.
    """
    scores = _positive_word_scores(words)
    if not scores:
        return Label(feature, "", "words", status="error", detail="no prompt word has a positive association")
    ranked = sorted(scores.items(), key=lambda item: (-item[1][1], item[0]))
    best = ranked[0][1][1]
    kept = [(word, score) for _, (word, score) in ranked[:max(1, top)] if score >= best / 2]
    share = sum(score / best for _, score in kept) / sum(score / best for _, score in scores.values())  # no overflow
    return Label(feature, ", ".join(word for word, _ in kept), "words", min(1.0, share))


def _positive_word_scores(words: Sequence[tuple[str, float]]) -> dict[str, tuple[str, float]]:
    """``{lowercased word: (word, best score)}`` of the words with a positive, finite score."""
    scores: dict[str, tuple[str, float]] = {}
    for entry in words:
        try:
            word, raw = entry
            score = float(raw)
        except (TypeError, ValueError):
            raise InputError(f"prompt-word entry {entry!r} is not a (word, score) pair") from None
        if not isinstance(word, str):
            raise InputError(f"prompt-word entry {entry!r} does not start with a word")
        word = " ".join(word.split())
        if word and math.isfinite(score) and score > 0 and score > scores.get(word.lower(), ("", 0.0))[1]:
            scores[word.lower()] = (word, score)
    return scores


class WordsSource:
    """Labels from :func:`label_from_words` over each feature's prompt words."""

    name = "words"

    def __init__(self, top: int = 3):
        self.top = top

    def label(self, feature: FeatureEvidence, pool: Sequence[FeatureEvidence]) -> Label:
        return label_from_words(feature.words, feature=feature.feature, top=self.top)


def clip_label(image_embeddings: Tensor, text_embeddings: Tensor, vocabulary: Sequence[str] = DEFAULT_VOCABULARY,
               *, feature: int = 0) -> Label:
    """The vocabulary word closest to a feature's images in CLIP space.

    ``image_embeddings`` (n_images, d) are CLIP vision embeddings of the feature's top images,
    ``text_embeddings`` (n_words, d) CLIP text embeddings of ``vocabulary``, in the same order. The mean of
    the unit image embeddings, made unit again, is compared with each unit word embedding by cosine.
    Score: the word's softmax probability over the vocabulary at CLIP's logit scale (100), as CLIP's own
    zero-shot classification computes it; it falls as the vocabulary grows with close synonyms.
    """
    _check_clip_inputs(image_embeddings, text_embeddings, vocabulary)
    images = torch.nn.functional.normalize(image_embeddings.detach().float().cpu(), dim=-1).mean(dim=0)
    words = torch.nn.functional.normalize(text_embeddings.detach().float().cpu(), dim=-1)
    probabilities = (CLIP_LOGIT_SCALE * words @ torch.nn.functional.normalize(images, dim=0)).softmax(dim=0)
    best = int(probabilities.argmax())
    return Label(feature, vocabulary[best], "clip", min(1.0, float(probabilities[best])))


def _check_clip_inputs(image_embeddings: Tensor, text_embeddings: Tensor, vocabulary: Sequence[str]) -> None:
    for name, tensor in (("image embeddings", image_embeddings), ("text embeddings", text_embeddings)):
        if not isinstance(tensor, Tensor) or tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise InputError(f"CLIP {name} must be a non-empty (n, d) tensor, got {shape}")
        if not torch.isfinite(tensor).all():
            raise InputError(f"CLIP {name} hold NaN or infinite values: check the encoder's output")
    if image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise InputError(f"CLIP image embeddings are {image_embeddings.shape[1]}-wide but text embeddings "
                         f"{text_embeddings.shape[1]}-wide: embed both with the same CLIP model")
    if len(vocabulary) != text_embeddings.shape[0]:
        raise InputError(f"CLIP vocabulary has {len(vocabulary)} words but there are {text_embeddings.shape[0]} "
                         "text embeddings: embed every vocabulary word, in order")


class ClipSource:
    """Labels from :func:`clip_label` over each feature's ``image_embeddings``."""

    name = "clip"

    def __init__(self, text_embeddings: Tensor, vocabulary: Sequence[str] = DEFAULT_VOCABULARY):
        self.text_embeddings = text_embeddings
        self.vocabulary = list(vocabulary)

    def label(self, feature: FeatureEvidence, pool: Sequence[FeatureEvidence]) -> Label:
        if feature.image_embeddings is None or len(feature.image_embeddings) == 0:
            return Label(feature.feature, "", "clip", status="error", detail="no CLIP image embeddings for this feature")
        return clip_label(feature.image_embeddings, self.text_embeddings, self.vocabulary, feature=feature.feature)


class VLMSource:
    """Labels from a vision-language model, each scored by the same model acting as a judge.

    Of a feature's top images, up to ``held_out`` (at most half) are set aside; up to ``shown`` of the rest
    are shown to name the feature. The held-out images are then mixed with up to ``distractors`` images of
    other features (one image each from as many features) and the judge is asked which show the label.
    Score: the balanced accuracy of its picks, the mean of the share of held-out images it picked and the
    share of distractors it left: 1 is perfect, 0.5 is chance (picking all or none), 0 is always wrong. A
    feature with too few images, or alone in the pool, gets a label with no score. The hold-out and the mix
    depend only on ``seed`` and the feature id, so reruns ask the same questions.
    """

    name = "vlm"

    def __init__(self, client: VLMClient, shown: int = 6, held_out: int = 4, distractors: int = 8, seed: int = 0):
        if shown < 1 or held_out < 0 or distractors < 0:
            raise InputError(f"VLM labelling needs shown >= 1 (got {shown}), held_out >= 0 (got {held_out}) "
                             f"and distractors >= 0 (got {distractors})")
        self.client = client
        self.shown = shown
        self.held_out = held_out
        self.distractors = distractors
        self.seed = seed

    def label(self, feature: FeatureEvidence, pool: Sequence[FeatureEvidence]) -> Label:
        shown, _ = self.split(feature)
        try:
            text = self.client.describe(shown)
        except VLMFailure as failure:
            return Label(feature.feature, "", "vlm", status=failure.status, detail=failure.detail)
        try:
            score = self.score(text, feature, pool)
        except VLMFailure as failure:
            return Label(feature.feature, text, "vlm", status=failure.status, detail=f"scoring: {failure.detail}")
        return Label(feature.feature, text, "vlm", score)

    def split(self, feature: FeatureEvidence) -> tuple[list[ImageInput], list[ImageInput]]:
        """(images to show, held-out images), the same for the same seed and feature."""
        images = list(feature.images)
        count = min(self.held_out, len(images) // 2)
        held = set(self._rng(feature.feature, "hold-out").sample(range(len(images)), count))
        shown = [image for i, image in enumerate(images) if i not in held][:self.shown]
        return shown, [images[i] for i in sorted(held)]

    def score(self, text: str, feature: FeatureEvidence, pool: Sequence[FeatureEvidence]) -> float | None:
        """How well the judge tells the feature's held-out images from others' by the label ``text``
        (any label: one from another source can be scored the same way)."""
        _, held = self.split(feature)
        rng = self._rng(feature.feature, "mix")
        others = [other for other in pool if other.feature != feature.feature and other.images]
        picked_others = rng.sample(others, min(self.distractors, len(others)))
        if not held or not picked_others:
            return None
        mix = [(image, True) for image in held] + [(rng.choice(list(other.images)), False) for other in picked_others]
        rng.shuffle(mix)
        picks = set(self.client.judge(text, [image for image, _ in mix]))
        return balanced_accuracy(picks, {i for i, (_, own) in enumerate(mix) if own}, len(mix))

    def _rng(self, feature: int, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}/{feature}/{purpose}")


def balanced_accuracy(picked: set[int], positives: set[int], n: int) -> float:
    """Mean of the true-positive and true-negative rates of ``picked`` among ``n`` items (both classes present)."""
    negatives = set(range(n)) - positives
    true_positive_rate = len(picked & positives) / len(positives)
    true_negative_rate = len(negatives - picked) / len(negatives)
    return (true_positive_rate + true_negative_rate) / 2


def index_evidence(index: Any, with_images: bool = True, overlay: bool = False) -> list[FeatureEvidence]:
    """Every fired feature of a feature index (:mod:`sae_core.feature_index`) as evidence: its words, and its top
    images: the thumbnails' paths (what CLIP embeds), or with ``overlay`` functions that draw each with the
    feature's heatmap over it (what a vision-language model is shown, so it can see where the feature fires);
    either is read only when a source needs it."""
    evidence = []
    for f in range(index.n_latents):
        record = index.feature(f)
        if not record["top"]:
            continue
        ranks = range(len(record["top"])) if with_images else ()
        images = tuple(functools.partial(index.tile, f, rank) if overlay else index.image_path(f, rank)
                       for rank in ranks)
        evidence.append(FeatureEvidence(f, images=images, words=tuple((w, s) for w, s in record["words"])))
    return evidence


def label_index_by_words(index: Any) -> list[Label]:
    """Label every fired feature of ``index`` by its prompt words, into the index's ``labels.json`` (offline and
    quick: what the browser shows until a VLM or CLIP labels them)."""
    return label_features(index_evidence(index, with_images=False), WordsSource(), LabelStore(index.folder))
