"""Label Features: name the features of a dictionary's feature index by their prompt words, a vision-language model
or CLIP, into the index's ``labels.json`` (the SAE features sidebar shows the labels).

The labelling is the engine's (:mod:`sae_core.labels`): resumable, every source's label kept side by side, a
failed feature a status rather than a crash. This node only builds the source from ComfyUI's inputs (an
OpenAI-compatible endpoint, or ComfyUI's own CLIP vision and text encoders) and reports what came out.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from comfy_api.latest import io, ui
from PIL import Image

from ..sae_core import InputError, SAEError
from ..sae_core.feature_index import FeatureIndex, index_folder_for, open_index
from ..sae_core.labels import (DEFAULT_VOCABULARY, LABELS_FILE, SOURCES, ClipSource, FeatureEvidence, Label,
                               LabelSource, LabelStore, VLMSource, WordsSource, index_evidence, label_features)
from ..sae_core.vlm import KEY_ENV, VLMClient
from .common import CATEGORY, check_choices, pil_to_image, require_choices, sae_files
from .index_nodes import dictionary_path_or_error
from .routes import NotFound, dictionary_path

DEFAULT_VLM_URL = "http://127.0.0.1:11434/v1"
EXAMPLES = 5
"""Labels the summary shows as examples."""
CLIP_PROMPT = "a photo of {}"
"""Each vocabulary word is embedded in a caption, as CLIP was trained on captions."""
CLIP_BATCH = 16
"""Images per CLIP vision call."""
KEY_PIECE = 8
"""A word of a label this long or longer that is part of the API key counts as the key (a cut-off echo of it)."""


class SAELabelFeatures(io.ComfyNode):
    """Label the fired features of a dictionary's feature index by one source; a rerun labels only what is left."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAELabelFeatures",
            display_name="Label Features",
            category=f"{CATEGORY}/inspect",
            description=("Names the features of a models/sae dictionary's feature index (built by Build Feature "
                         "Index) by their prompt words, a vision-language model (any OpenAI-compatible server) "
                         "shown their top images, or CLIP zero-shot over a vocabulary; the labels go into the "
                         "index's labels.json, shown in the SAE features sidebar. Queue it again to go on where "
                         "it stopped: features this source already labelled are skipped, failed ones retried."),
            inputs=[
                io.Combo.Input("dictionary", options=sae_files(),
                               tooltip="a dictionary in models/sae whose feature index (<name>.features beside it, "
                                       "made by Build Feature Index) gets the labels"),
                io.Combo.Input("source", options=list(SOURCES), default="words",
                               tooltip="words: the prompt words most tied to each feature (offline, instant); vlm: a "
                                       "vision-language model names each feature from its top images, then picks "
                                       "its held-out images from a mix to score the label; clip: the vocabulary "
                                       "word closest to its top images in CLIP space (connect clip_vision and clip)"),
                io.String.Input("vlm_url", default=DEFAULT_VLM_URL,
                                tooltip="vlm source: the OpenAI-compatible API base URL (requests go to "
                                        "<url>/chat/completions); Ollama http://127.0.0.1:11434/v1, llama.cpp "
                                        "server http://127.0.0.1:8080/v1, vLLM http://127.0.0.1:8000/v1, LM Studio "
                                        "http://127.0.0.1:1234/v1, or a hosted API such as "
                                        "https://openrouter.ai/api/v1"),
                io.String.Input("vlm_model", default="",
                                tooltip="vlm source: the model's name as the server lists it, e.g. llava or "
                                        "qwen2.5vl:7b (it must read images)"),
                io.String.Input("vlm_key", default="",
                                tooltip=f"vlm source: the API key, if the server wants one; empty: the {KEY_ENV} "
                                        "environment variable. Never written to labels or logs by this node, but "
                                        "ComfyUI keeps widget values in workflows, saved PNGs and error reports: "
                                        "prefer the environment variable"),
                io.Int.Input("features", default=0, min=0, max=1 << 24,
                             tooltip="0: every feature that fired while the index was built; N: only the N "
                                     "most frequent ones"),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="clip source: the CLIP vision model that embeds the top images (Load "
                                            "CLIP Vision), the vision half of the same CLIP as clip"),
                io.Clip.Input("clip", optional=True,
                              tooltip="clip source: the CLIP text encoder that embeds the vocabulary (its pooled "
                                      "output), the text half of the same CLIP as clip_vision"),
                io.String.Input("vocabulary", multiline=True, default="",
                                tooltip="clip source: the words to choose labels from, one per line or "
                                        f"comma-separated; empty: {len(DEFAULT_VOCABULARY)} common visual concepts"),
            ],
            outputs=[io.String.Output(display_name="summary",
                                      tooltip="how many features were labelled ok and how many failed (by why), "
                                              "with a few examples")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dictionary: Optional[str] = None, source: Optional[str] = None) -> bool | str:
        return check_choices(cls, dictionary=dictionary, source=source)

    @classmethod
    def fingerprint_inputs(cls, dictionary: Any = None, **others: Any) -> Any:
        """Run again whenever the index or its labels changed since the last run: a rerun retries the failed
        labels, so it must not be answered from ComfyUI's cache."""
        try:
            folder = index_folder_for(dictionary_path(dictionary))
        except NotFound:
            return dictionary
        return tuple(_file_stamp(folder / name) for name in ("index.json", LABELS_FILE))

    @classmethod
    def execute(cls, dictionary: str, source: str, vlm_url: str, vlm_model: str, vlm_key: str, features: int,
                vocabulary: str, clip_vision: Any = None, clip: Any = None) -> io.NodeOutput:
        require_choices(cls, dictionary=dictionary, source=source)
        if features < 0:
            raise InputError(f"features {features}: use 0 for every fired feature, or N for the N most frequent")
        if source == "clip" and (clip_vision is None or clip is None):
            raise InputError("the clip source needs clip_vision (Load CLIP Vision) and clip (its text encoder) "
                             "connected")
        path = dictionary_path_or_error(dictionary)
        folder, shown = index_location(dictionary, path)
        with named_in_models(dictionary, path):
            index = open_index(folder, dictionary=path)
            store = LabelStore(folder)
            evidence = selected_evidence(index, features, with_images=source != "words", overlay=source == "vlm")
            todo = store.needs_label([item.feature for item in evidence], source)
            if todo:
                labeller, evidence = labelling_setup(source, evidence, set(todo), vlm_url, vlm_model, vlm_key,
                                                     clip_vision, clip, vocabulary)
                label_features(evidence, labeller, store, progress=comfy_progress(len(todo)))
            labels = [store.get(item.feature, source) for item in evidence]
        summary = summary_text(dictionary, source, labels, len(todo), shown)
        return io.NodeOutput(summary, ui=ui.PreviewText(summary))


def index_location(name: str, path: Path) -> tuple[Path, str]:
    """(the index folder of dictionary ``name`` at ``path``, how messages name it:
    ``models/sae/<name>.features``); InputError when the dictionary has no index."""
    folder = index_folder_for(path)
    shown = f"models/sae/{PurePosixPath(name).with_name(folder.name)}"
    if not (folder / "index.json").is_file():
        raise InputError(f"{name} has no feature index yet ({shown}): run Build Feature Index on it first")
    return folder, shown


@contextmanager
def named_in_models(name: str, path: Path) -> Iterator[None]:
    """Project errors raised inside name the dictionary's files from ``models/sae/`` on, as the node lists
    them, never by the server's own path."""
    root = str(path.parents[len(PurePosixPath(name).parts) - 1])
    try:
        yield
    except SAEError as err:
        if root not in str(err):
            raise
        raise type(err)(str(err).replace(root, "models/sae")) from err


def selected_evidence(index: FeatureIndex, count: int, with_images: bool,
                      overlay: bool = False) -> list[FeatureEvidence]:
    """The index's fired features (all, or the ``count`` most frequent, most frequent first) as evidence; the
    VLM is shown heatmap tiles (``overlay``), CLIP the plain thumbnails."""
    evidence = index_evidence(index, with_images=with_images, overlay=overlay)
    if count:
        frequency = index.summary()["frequency"]
        evidence = sorted(evidence, key=lambda item: (-frequency[item.feature], item.feature))[:count]
    return evidence


def labelling_setup(source: str, evidence: list[FeatureEvidence], todo: set[int], vlm_url: str, vlm_model: str,
                    vlm_key: str, clip_vision: Any, clip: Any, vocabulary: str
                    ) -> tuple[LabelSource, list[FeatureEvidence]]:
    """The label source the inputs ask for, and the evidence it reads (with CLIP image embeddings of the
    features in ``todo`` for the clip source). Called only when some feature needs a label: a rerun with
    nothing left to do embeds nothing."""
    if source == "words":
        return WordsSource(), evidence
    if source == "vlm":
        key = vlm_key.strip() or os.environ.get(KEY_ENV, "").strip()
        return KeyHidden(VLMSource(VLMClient(vlm_url, vlm_model, api_key=key or None)), key), evidence
    words = vocabulary_words(vocabulary)
    text_embeddings = clip_text_embeddings(clip, words)
    evidence = with_clip_embeddings(evidence, todo, clip_vision)
    check_clip_widths(evidence, text_embeddings)
    return ClipSource(text_embeddings, words), evidence


class KeyHidden:
    """A VLM source whose labels never hold the API key: a server may echo the ``Authorization`` header in its
    reply, and ``labels.json`` travels with the index. Such a label is dropped (status ``error``); the client
    already masks the key in failure details."""

    name = "vlm"

    def __init__(self, source: VLMSource, key: str):
        self.source = source
        self.key = key

    def label(self, feature: FeatureEvidence, pool: Sequence[FeatureEvidence]) -> Label:
        label = self.source.label(feature, pool)
        if self.key and (holds_key(label.text, self.key) or holds_key(label.detail, self.key)):
            return Label(label.feature, "", label.source, status="error",
                         detail="the model's reply held the API key; the label was not kept")
        return label


def holds_key(text: str, key: str) -> bool:
    """Whether ``text`` holds ``key``, or a word of it long enough to be a cut-off piece of the key."""
    return key in text or any(len(word) >= KEY_PIECE and word in key for word in re.split(r"[\s\"'`]+", text))


def vocabulary_words(text: str) -> list[str]:
    """The vocabulary input's words (one per line or comma-separated, each once), or the default vocabulary."""
    words: dict[str, str] = {}
    for part in re.split(r"[,\n]", str(text)):
        word = " ".join(part.split())
        if word:
            words.setdefault(word.lower(), word)
    return list(words.values()) or list(DEFAULT_VOCABULARY)


def clip_text_embeddings(clip: Any, words: Sequence[str]) -> torch.Tensor:
    """(n_words, d): the CLIP text encoder's pooled (projected) embedding of each word's caption."""
    if not (hasattr(clip, "tokenize") and hasattr(clip, "encode_from_tokens")):
        raise InputError("clip is not a text encoder: connect a CLIP (Load CLIP, or Load Checkpoint's clip)")
    bar = _progress_bar(len(words))
    rows = []
    for done, word in enumerate(words, start=1):
        _, pooled = clip.encode_from_tokens(clip.tokenize(CLIP_PROMPT.format(word)), return_pooled=True)
        if not isinstance(pooled, torch.Tensor) or pooled.numel() == 0:
            raise InputError("clip gives no pooled text embedding: connect a CLIP text encoder (CLIP-L or CLIP-G), "
                             "not T5 or another language model")
        rows.append(pooled.reshape(-1).float().cpu())
        _check_interrupted()
        bar.update_absolute(done, len(words))
    if len({row.numel() for row in rows}) != 1:
        raise InputError("clip's pooled text embeddings differ in width between words: connect one CLIP text encoder")
    return torch.stack(rows)


def with_clip_embeddings(evidence: Sequence[FeatureEvidence], todo: set[int],
                         clip_vision: Any) -> list[FeatureEvidence]:
    """``evidence`` with the CLIP image embeddings of the top images of the features in ``todo``."""
    paths = [path for item in evidence if item.feature in todo for path in item.images]
    embedded = clip_image_embeddings(clip_vision, paths)
    return [FeatureEvidence(item.feature, item.images, item.words,
                            torch.stack([embedded[path] for path in item.images]) if item.images else None)
            if item.feature in todo else item for item in evidence]


def clip_image_embeddings(clip_vision: Any, paths: Sequence[Path]) -> dict[Path, torch.Tensor]:
    """Each image file's CLIP image embedding (an image in several features' top lists is embedded once)."""
    if not hasattr(clip_vision, "encode_image"):
        raise InputError("clip_vision is not a CLIP vision model: connect Load CLIP Vision's output")
    unique = list(dict.fromkeys(paths))
    bar = _progress_bar(len(unique))
    embedded: dict[Path, torch.Tensor] = {}
    for start in range(0, len(unique), CLIP_BATCH):
        by_size: dict[tuple[int, ...], list[tuple[Path, torch.Tensor]]] = {}
        for path in unique[start:start + CLIP_BATCH]:
            pixels = load_image(path)
            by_size.setdefault(tuple(pixels.shape[1:3]), []).append((path, pixels))
        for group in by_size.values():
            rows = image_embeds(clip_vision, torch.cat([pixels for _, pixels in group]))
            embedded.update(zip([path for path, _ in group], rows))
        _check_interrupted()
        bar.update_absolute(min(start + CLIP_BATCH, len(unique)), len(unique))
    return embedded


def load_image(path: Path) -> torch.Tensor:
    """An index thumbnail as a ComfyUI IMAGE ``(1, H, W, 3)``."""
    try:
        with Image.open(path) as image:
            return pil_to_image(image)
    except OSError as err:
        raise InputError(f"{path} is missing or damaged ({type(err).__name__}); rebuild the index") from None


def image_embeds(clip_vision: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(batch, d): what ComfyUI's CLIP vision model gives as ``image_embeds`` for a batch of images."""
    output = clip_vision.encode_image(pixels)
    embeds = getattr(output, "image_embeds", None)
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or embeds.shape[0] != pixels.shape[0]:
        raise InputError("clip_vision gives no image embeddings: connect a CLIP vision model (e.g. CLIP ViT-L/14 "
                         "from Load CLIP Vision)")
    return embeds.detach().float().cpu()


def check_clip_widths(evidence: Sequence[FeatureEvidence], text_embeddings: torch.Tensor) -> None:
    """InputError when the image and text embeddings are of different widths (two different CLIP models)."""
    widths = {int(item.image_embeddings.shape[1]) for item in evidence if item.image_embeddings is not None}
    text = int(text_embeddings.shape[1])
    if widths - {text}:
        raise InputError(f"clip_vision's image embeddings are {min(widths - {text})}-wide but clip's text "
                         f"embeddings {text}-wide: connect the vision and text halves of the same CLIP model "
                         "(e.g. CLIP ViT-L/14 vision with CLIP-L text)")


def comfy_progress(total: int) -> Callable[[int, int, Label], None]:
    """A progress callback for :func:`label_features` that moves the node's progress bar and stops the run
    (saving what was labelled) when the user cancels the queue."""
    bar = _progress_bar(total)

    def progress(done: int, count: int, label: Label) -> None:
        bar.update_absolute(done, count)
        _check_interrupted()

    return progress


def summary_text(dictionary: str, source: str, labels: Sequence[Label], labelled_now: int, shown: str) -> str:
    """What the run left: counts of ok and failed labels (by status), this run's share, a few examples."""
    if not labels:
        return f"no feature of {dictionary}'s index ever fired: nothing to label ({shown})"
    ok = [label for label in labels if label.ok]
    failed = Counter(label.status for label in labels if not label.ok)
    lines = [f"{source} labels of {dictionary}: {len(ok)} ok, {sum(failed.values())} failed, of {len(labels)} "
             "features"]
    if failed:
        lines.append("failed: " + ", ".join(f"{status} {count}" for status, count in sorted(failed.items()))
                     + " (queue again to retry them)")
    lines.append(f"this run labelled {labelled_now}; {len(labels) - labelled_now} already had an ok {source} label")
    if ok:
        lines.append("e.g. " + ", ".join(map(example, ok[:EXAMPLES])))
    lines.append(f"stored in {shown}/{LABELS_FILE}")
    return "\n".join(lines)


def example(label: Label) -> str:
    return f"#{label.feature} {label.text}" + ("" if label.score is None else f" ({label.score:.2f})")


def _file_stamp(path: Path) -> Optional[tuple[int, int]]:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _progress_bar(total: int) -> Any:
    import comfy.utils

    return comfy.utils.ProgressBar(max(total, 1))


def _check_interrupted() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
