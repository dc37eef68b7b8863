"""Steer by Concept and Steer Sweep: steer with a concept made of features, and render a steer at many strengths
and windows so that an artist chooses by eye.

A concept (:mod:`sae_core.concepts`) is a weighted set of dictionary features: the mean codes of positive
prompts minus those of negative ones, kept to the strongest features, or the features a feature index
associates with a word. The sweep's grid is drawn here with PIL: the plugin does not import ``training/``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ..sae_core import (MODES, UNITS, Concept, Dictionary, InputError, ScheduledConcept, ScheduleError, SiteContext,
                        SiteFunction, Steer, SteerError, StepCodeMeter, clamp_steer_function, concept_from_codes,
                        concept_from_words, load_dictionary, mean_codes, prompt_rows, replace_steers,
                        scheduled_concept_from_meters, steer_function)
from ..sae_core.feature_index import FeatureIndex, index_folder_for, open_index
from ..sae_core.plots import bar_chart
from .adapters import adapter_for, patch_site
from .common import (CATEGORY, DICTIONARY, check_choices, mask_2d, parse_features, pil_to_image, require_choices,
                     require_linked, resolve_site, sae_files, sampling_inputs, site_input, window, window_inputs)
from .image_capture_nodes import check_conditioning, model_latent_channels
from .index_nodes import dictionary_path_or_error, encode

DEFAULT_MODE = "clamp"
"""How a concept steers by default. Clamping per step and position flipped the most classes cleanly on both
organisms, best at the prompt's tokens (steering lab at context:text, top 64, all steps: Flux organism 0.73 of
samples cleanly to the target, U-Net organism 0.97; adding a global concept there: 0.09 and 0.12; BENCHMARKS.md)."""
DEFAULT_TOP_N = 64
"""Features a concept keeps (per step and position for a clamp: at context:text 64 gave 0.73 / 0.97 clean flips on
the Flux / U-Net organism against 0.57 / 0.77 with 32; at a U-Net block 32 gave 0.42 against 0.17 with 8). An
added concept did best with 8."""
SHOWN_FEATURES = 8
"""A clamp concept's summary lists at most this many features (it keeps top_n per position)."""
DEFAULT_STRENGTH = 1.0
"""A clamp's fraction of the way to the positive prompts' values: 1 clamps. For an added concept strength is a
multiplier of the measured mean code difference, and 8 in the first half of sampling worked best there (Flux
organism: 0.23 of samples to the target, 0.71 clean; BENCHMARKS.md)."""
DEFAULT_WINDOW = (0.0, 1.0)
"""The part of sampling (0 = first step, 1 = last) a concept steers by default: all of it. At the prompt's tokens
all steps flip far more at the same cleanness (trial seed, top 32: U-Net organism 0.72 vs 0.36 in steps 0-0.5;
Flux 0.51 vs 0.42); at a U-Net block the first half keeps pictures cleaner (output_blocks.3: 0.77 clean in steps
0-0.5 vs 0.50), so narrow it there."""
SOURCES = ("prompts", "words")
CONCEPT_MODES = ("add", "replace", "clamp")
MAX_CELLS = 64
"""A sweep's most cells: each is one full sampling."""
MAX_STRENGTH = 100.0
"""The Steer node's strength range, for the sweep's typed strengths too."""
MIN_CELL = 96
"""Grid cells and concept tiles smaller than this many pixels are enlarged (nearest) to at least it."""
GAP = 4
"""Pixels between grid cells and around the labels."""
SHOWN_WORDS = 3
"""Prompt words that name a feature without a label."""

CONCEPT = io.Custom("SAE_CONCEPT")
"""Steer by Concept's concept, with its dictionary, site and mode (:class:`ConceptSteering`), for Steer Sweep."""


# ----------------------------------------------------------------------------- the concept a node passes on


@dataclass(frozen=True, eq=False)
class ConceptSteering:
    """An ``SAE_CONCEPT``: a concept bound to the dictionary and site it was measured at, and how it steers.

    ``mode="add"`` adds ``target`` (and subtracts ``source`` when there is one: a negative word);
    ``mode="replace"`` detects ``source``'s tokens and replaces it there by ``target``
    (:func:`sae_core.concepts.replace_steers`); ``mode="clamp"`` clamps ``scheduled``, per sampling step and
    token position (:func:`sae_core.concepts.clamp_steer_function`), ``target`` being its summary over all steps
    and positions (what the node lists)."""

    dictionary: Dictionary
    site: str
    mode: str
    target: Concept
    source: Optional[Concept] = None
    cond_only: bool = True
    mask: Optional[Tensor] = field(default=None, repr=False)
    scheduled: Optional[ScheduledConcept] = field(default=None, repr=False)

    def site_function(self, strength: float, steer_window: Optional[tuple[float, float]]) -> SiteFunction:
        """What the site runs at ``strength`` in ``steer_window``."""
        if self.mode == "clamp":
            return clamp_steer_function(self.dictionary, self.scheduled, strength, steer_window, self.cond_only,
                                        self.mask)
        return steer_function(self.dictionary, self.steers(strength, steer_window))

    def steers(self, strength: float, steer_window: Optional[tuple[float, float]]) -> list[Steer]:
        """The steers at ``strength`` (the concept's multiplier) acting in ``steer_window``."""
        options: dict[str, Any] = {"window": steer_window, "cond_only": self.cond_only, "mask": self.mask}
        if self.mode == "replace":
            return replace_steers(self.source, self.target, strength, **options)
        steers = [self.target.steer(strength, **options)]
        if self.source is not None:
            steers.append(self.source.steer(-strength, **options))
        return steers


class _CodeMeter:
    """A site function that reads the dictionary's codes on the prompt rows of every call and keeps their mean
    (each call weighted by its tokens); it never changes the activations."""

    def __init__(self, dictionary: Dictionary):
        self.dictionary = dictionary
        self.total = torch.zeros(dictionary.n_latents, dtype=torch.float64)
        self.tokens = 0

    def __call__(self, h: Tensor, ctx: SiteContext) -> Tensor:
        rows = prompt_rows(ctx, h.shape[0]).to(h.device)
        x = h.detach().index_select(0, rows).to(self.dictionary.rows.dtype)
        n = x.shape[0] * x.shape[1]
        if n:
            with torch.no_grad():
                self.total += mean_codes(self.dictionary, x).cpu() * n
            self.tokens += n
        return h

    def mean(self, what: str) -> Tensor:
        if not self.tokens:
            raise ScheduleError(f"sampling the {what} prompts never reached the site: check the site and the steps")
        return self.total / self.tokens


# ----------------------------------------------------------------------------- Steer by Concept


class SAESteerByConcept(io.ComfyNode):
    """A clone of MODEL steered by a concept built from prompts (difference of mean codes) or from a word."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAESteerByConcept",
            display_name="Steer by Concept",
            category=f"{CATEGORY}/steer",
            description=("Builds a concept made of dictionary features and steers with it: from prompts, the "
                         "features whose mean activation differs most between the positive and the negative "
                         "prompts (each prompt is sampled once to measure them); from a word, the features the "
                         "dictionary's feature index associates with it. Adds the concept, replaces the "
                         "negative concept by the positive one where the negative one is detected, or clamps: at "
                         "every sampling step and image position, sets the features that differ most there to the "
                         "positive prompts' values (measured at this latent size and these steps). Lists the "
                         "features with their labels and shows their strongest images."),
            inputs=[
                io.Model.Input("model", tooltip="the model to steer (a patched clone is returned)"),
                io.Clip.Input("clip", tooltip="encodes the prompts (source prompts); the organism's: Load Model "
                                              "Organism's clip"),
                io.Combo.Input("dictionary", options=sae_files(),
                               tooltip="a dictionary file in models/sae; the feature index beside it gives labels, "
                                       "pictures and words"),
                io.String.Input("site", default="", tooltip="where to measure and steer; empty: the site the "
                                                            "dictionary was trained on"),
                io.Combo.Input("source", options=list(SOURCES),
                               tooltip="prompts: sample the positive and negative prompts and compare their "
                                       "features; words: take the features the feature index associates with a "
                                       "word (no sampling)"),
                io.String.Input("positive", multiline=True, default="a handwritten seven",
                                tooltip="prompts showing the concept, one per line; with source words: one word "
                                        "the feature index knows"),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="prompts without it, one per line (empty: the empty prompt); with source "
                                        "words: one word or empty; replace mode replaces this concept"),
                io.Int.Input("top_n", default=DEFAULT_TOP_N, min=1, max=4096,
                             tooltip="how many features the concept keeps, strongest first"),
                io.Float.Input("strength", default=DEFAULT_STRENGTH, min=-100.0, max=100.0, step=0.05,
                               tooltip="clamp: the fraction 0..1 of the way to the positive prompts' values (1 "
                                       "clamps); add and replace: the concept's multiplier, 1 adding the measured "
                                       "activation difference of its features (8 with top_n 8 worked best); "
                                       "replace: also the fraction 0..1 of the negative concept removed"),
                io.Combo.Input("mode", options=list(CONCEPT_MODES), default=DEFAULT_MODE,
                               tooltip="add: add the concept everywhere; replace: on the tokens where the negative "
                                       "concept fires, remove it and add the positive one; clamp (the measured best): "
                                       "at every step and image position, set the top_n features that differ most "
                                       "there to the positive prompts' values (source prompts; sample at the "
                                       "measured size)"),
                *window_inputs(*DEFAULT_WINDOW, "steer"),
                io.Boolean.Input("cond_only", default=True,
                                 tooltip="steer only the positive prompt's half of CFG (off: both halves)"),
                io.Latent.Input("latent", tooltip="source prompts: an empty latent; its size is the measuring "
                                                  "samples' size, its batch the samples per prompt"),
                *sampling_inputs("prompt i of each list is sampled with seed + i",
                                 "sampling steps; the codes of every step are averaged", "guidance scale while measuring",
                                 prefix="source prompts: "),
                io.Mask.Input("mask", optional=True,
                              tooltip="where on the image to steer (weights 0..1, resized to the site's token grid)"),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="the steered clone of the model"),
                     CONCEPT.Output(display_name="concept",
                                    tooltip="the concept, its dictionary, site and mode: connect to Steer Sweep"),
                     io.String.Output(display_name="features",
                                      tooltip="the concept's features, weights and labels"),
                     io.Image.Output(display_name="pictures",
                                     tooltip="each feature's strongest image with its heatmap (or a chart of the "
                                             "weights when the dictionary has no feature index)")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dictionary: Optional[str] = None, source: Optional[str] = None,
                        mode: Optional[str] = None, sampler_name: Optional[str] = None,
                        scheduler: Optional[str] = None) -> bool | str:
        return check_choices(cls, dictionary=dictionary, source=source, mode=mode, sampler_name=sampler_name,
                             scheduler=scheduler)

    @classmethod
    def execute(cls, model, clip, dictionary: str, site: str, source: str, positive: str, negative: str,
                top_n: int, strength: float, mode: str, window_start: float, window_end: float, cond_only: bool,
                latent, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                mask: Optional[Tensor] = None) -> io.NodeOutput:
        import comfy.model_management

        require_choices(cls, source=source, mode=mode, sampler_name=sampler_name, scheduler=scheduler)
        steer_window, mask = window(window_start, window_end), mask_2d(mask)
        path = dictionary_path_or_error(dictionary)
        sae = load_dictionary(path).to(comfy.model_management.get_torch_device())
        index = index_beside(path)
        site_name = site.strip() or sae.site.name
        scheduled = None
        if mode == "clamp" and source == "words":
            raise InputError("clamp mode measures the positive and negative prompts at every step and position: set "
                             "source to prompts")
        if mode == "clamp" and not 0 <= strength <= 1:
            raise InputError(f"clamp strength {strength:g}: it is the fraction 0..1 of the way to the positive "
                             "prompts' values; past 1 it overshoots them and only breaks the picture")
        if mode == "clamp":
            sampling = Sampling(latent, seed, steps, cfg, sampler_name, scheduler)
            target, scheduled, site_name = scheduled_from_prompts(
                model, clip, sae, site_name, positive_prompts(positive), negative_prompts(negative), top_n, sampling)
            negative_concept = None
        elif source == "words":
            target, negative_concept = concepts_from_words(index, dictionary, positive, negative, top_n, mode)
            site_name = resolve_site(model, site_name)[1].name
        else:
            sampling = Sampling(latent, seed, steps, cfg, sampler_name, scheduler)
            target, negative_concept, site_name = concepts_from_prompts(
                model, clip, sae, site_name, positive_prompts(positive), negative_prompts(negative), top_n, mode,
                sampling)
        concept = ConceptSteering(sae, site_name, mode, target, negative_concept, cond_only, mask, scheduled)
        patched, _ = patch_site(model, site_name, concept.site_function(strength, steer_window), width=sae.d_in)
        text = describe_concept(concept, index, dictionary, strength)
        pictures = concept_pictures(concept.target, index)
        return io.NodeOutput(patched, concept, text, pictures,
                             ui={**ui.PreviewText(text).as_dict(), **ui.PreviewImage(pictures, cls=cls).as_dict()})


@dataclass(frozen=True)
class Sampling:
    """The KSampler settings a node samples with inside itself."""

    latent: Any
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str

    def sample(self, model, positive: list, negative: list) -> Tensor:
        """The sampled latents, exactly as KSampler samples them (same noise, same settings, denoise 1)."""
        import comfy.sample

        if not isinstance(self.latent, dict) or not isinstance(self.latent.get("samples"), Tensor):
            raise InputError("latent is not a LATENT: connect an empty latent (e.g. Empty Organism Latent)")
        if not math.isfinite(self.cfg):  # NaN passes ComfyUI's range check, and would make every sample NaN
            raise InputError(f"cfg {self.cfg}: use a finite guidance scale, e.g. 4")
        samples = fitted_latent(self.latent["samples"], model)
        noise = comfy.sample.prepare_noise(samples, self.seed, self.latent.get("batch_index"))
        return comfy.sample.sample(model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler, positive,
                                   negative, samples, noise_mask=self.latent.get("noise_mask"), disable_pbar=True,
                                   seed=self.seed)


def fitted_latent(samples: Tensor, model) -> Tensor:
    """``samples`` as KSampler gives them to the model (an all-zero latent widened to its channels); InputError,
    in one line, for a latent it cannot sample (another model's channels, a video latent for an image model, an
    empty batch) instead of a shape error from deep inside the model."""
    import comfy.sample

    dims = 2 + int(getattr(model.model.latent_format, "latent_dimensions", 2))
    channels = model_latent_channels(model)
    if samples.ndim == dims and 0 not in samples.shape:
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
        if samples.shape[1] == channels:
            return samples
    raise InputError(f"latent has shape {tuple(samples.shape)} but the model samples {dims - 2}-d latents of "
                     f"{channels} channels: connect an empty latent made for this model")


def positive_prompts(text: str) -> list[str]:
    """The positive prompts, one per line: at least one."""
    prompts = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not prompts:
        raise InputError("positive is empty: type the prompts that show the concept, one per line")
    return prompts


def negative_prompts(text: str) -> list[str]:
    """The negative prompts, one per line; none typed: the empty prompt (what CFG's uncond half shows)."""
    return [line.strip() for line in str(text).splitlines() if line.strip()] or [""]


def sample_prompts(model, clip, sae: Dictionary, site: str, sides: dict[str, list[str]], meter_for: Any,
                   sampling: Sampling) -> str:
    """Sample each side's prompts once (prompt i with seed + i, the empty prompt as negative) while
    ``meter_for(side)`` reads the site; returns the resolved site's name. One progress bar over every prompt."""
    import comfy.model_management
    import comfy.utils

    uncond = encode(clip, "")
    bar = comfy.utils.ProgressBar(sum(len(prompts) for prompts in sides.values()))
    for side, prompts in sides.items():
        patched, where = patch_site(model, site, meter_for(side), width=sae.d_in)
        for i, prompt in enumerate(prompts):
            comfy.model_management.throw_exception_if_processing_interrupted()
            replace(sampling, seed=sampling.seed + i).sample(patched, encode(clip, prompt), uncond)
            bar.update(1)
    return where.name


def concepts_from_prompts(model, clip, sae: Dictionary, site: str, positive: list[str], negative: list[str],
                          top_n: int, mode: str, sampling: Sampling) -> tuple[Concept, Optional[Concept], str]:
    """``(target, source, site)``: sample every prompt once, reading the codes at every step; add mode keeps the
    difference of the mean codes, replace mode the features each side adds over the other."""
    meters = {"positive": _CodeMeter(sae), "negative": _CodeMeter(sae)}
    where = sample_prompts(model, clip, sae, site, {"positive": positive, "negative": negative}, meters.get,
                           sampling)
    pos, neg = (meter.mean(side) for side, meter in meters.items())
    if mode == "replace":
        return (concept_from_codes(pos, neg, top_n, sign="positive", dictionary=sae),
                concept_from_codes(neg, pos, top_n, sign="positive", dictionary=sae), where)
    return concept_from_codes(pos, neg, top_n, dictionary=sae), None, where


def scheduled_from_prompts(model, clip, sae: Dictionary, site: str, positive: list[str], negative: list[str],
                           top_n: int, sampling: Sampling) -> tuple[Concept, ScheduledConcept, str]:
    """``(summary, scheduled, site)``: sample every prompt once, reading the codes at every step and position; the
    clamp concept per step and position, and a summary concept to list (the difference of the mean codes over
    every step and position, at most :data:`SHOWN_FEATURES` features: a clamp keeps more per position)."""
    meters = {"positive": StepCodeMeter(sae), "negative": StepCodeMeter(sae)}
    where = sample_prompts(model, clip, sae, site, {"positive": positive, "negative": negative}, meters.get,
                           sampling)
    scheduled = scheduled_concept_from_meters(meters["positive"], meters["negative"], top_n)
    overall = [torch.stack([meter.step_mean(p).mean(0) for p in meter.progress(side)]).mean(0)
               for side, meter in meters.items()]
    shown = min(top_n, SHOWN_FEATURES)
    return concept_from_codes(overall[0], overall[1], shown, dictionary=sae), scheduled, where


def concepts_from_words(index: Optional[FeatureIndex], dictionary: str, positive: str, negative: str, top_n: int,
                        mode: str) -> tuple[Concept, Optional[Concept]]:
    """``(target, source)`` from the feature index's words: the positive word's concept, and the negative word's
    when one is typed (replace mode needs it: it is what gets replaced)."""
    if index is None:
        raise InputError(f"source words reads the feature index beside {dictionary}, which has none: build one with "
                         "Build Feature Index, or set source to prompts")
    target = concept_from_words(index, one_word(positive, "positive"), top_n)
    word = str(negative).strip()
    if not word:
        if mode == "replace":
            raise InputError("replace mode with source words needs a negative word: the concept to detect and "
                             "replace")
        return target, None
    return target, concept_from_words(index, one_word(word, "negative"), top_n)


def one_word(text: str, input_name: str) -> str:
    words = str(text).split()
    if len(words) != 1:
        raise InputError(f"{input_name} {str(text).strip()[:40]!r}: source words takes one word the feature index "
                         "knows, e.g. seven; set source to prompts for prompts")
    return words[0]


def index_beside(path: Path) -> Optional[FeatureIndex]:
    """The feature index beside the dictionary file, or None when it has none."""
    folder = index_folder_for(path)
    if not (folder / "index.json").is_file():
        return None
    return open_index(folder, path)


def feature_name(index: Optional[FeatureIndex], feature: int) -> str:
    """A feature's label, else its strongest prompt words, from the index."""
    if index is None:
        return ""
    label = index.label(feature)
    if label:
        return label
    words = [word for word, _ in index.feature(feature)["words"][:SHOWN_WORDS]]
    return ", ".join(words) if words else "never fired in the index"


def describe_concept(concept: ConceptSteering, index: Optional[FeatureIndex], dictionary: str,
                     strength: float) -> str:
    """The node's text: what steers, and one line per feature with its weight and label."""
    if concept.scheduled is not None:
        plan = concept.scheduled
        parts = [(f"clamps, at each of {plan.steps} steps x {plan.tokens} positions, its {plan.features.shape[2]} "
                  "features that differ most there to the positive prompts' values; over all steps and positions "
                  "the strongest are",
                  concept.target)]
    else:
        parts = [("adds" if concept.mode == "add" else "adds, where the negative concept fires,", concept.target)]
    if concept.source is not None:
        parts.append(("subtracts" if concept.mode == "add" else "removes there", concept.source))
    lines = [f"{dictionary} at {concept.site}: {concept.mode}, strength {strength:g}"
             + ("" if index is not None else "; no feature index (build one to see labels and pictures)")]
    for verb, part in parts:
        coverage = "" if math.isnan(part.coverage) else f", {part.coverage:.0%} of the difference's length"
        lines.append(f"{verb} {len(part.features)} feature(s){coverage}:")
        for feature, weight in zip(part.features, part.weights):
            name = feature_name(index, feature)
            lines.append(f"  #{feature} {weight:+.4g}" + (f"  {name}" if name else ""))
    return "\n".join(lines)


def concept_pictures(concept: Concept, index: Optional[FeatureIndex]) -> Tensor:
    """Each feature's strongest image with its heatmap, labelled by id and weight, in one strip; a bar chart of
    the weights when there is no index."""
    labels = [f"#{f} {w:+.3g}" for f, w in zip(concept.features, concept.weights)]
    if index is None:
        return pil_to_image(bar_chart(labels, list(concept.weights), "concept features",
                                      x_label="weight (activation difference)"))
    tiles = [index.tile(f, 0).convert("RGB") if index.feature(f)["top"] else None for f in concept.features]
    size = next((tile.size for tile in tiles if tile is not None), (MIN_CELL, MIN_CELL))
    cells = torch.stack([pil_to_image(tile.resize(size))[0] if tile is not None else torch.full((*size[::-1], 3), 0.5)
                         for tile in tiles])
    return labelled_grid(cells[None], [""], labels)


# ----------------------------------------------------------------------------- Steer Sweep


class SAESteerSweep(io.ComfyNode):
    """A grid of samples: steering strengths across, steering windows down, every cell from the same noise."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAESteerSweep",
            display_name="Steer Sweep",
            category=f"{CATEGORY}/steer",
            description=("Samples one steer at several strengths (across) and windows of sampling (down), every "
                         "cell with the same seed, and lays the pictures out in a labelled grid, so you can pick "
                         "the setting by eye. Steers the features typed here, or the concept of a Steer by Concept "
                         "when one is connected (with its own dictionary, site and mode; the features, mode, units, "
                         "site and dictionary inputs are then unused). A zero strength samples exactly as the "
                         "unsteered model."),
            inputs=[
                io.Model.Input("model", tooltip="the model to steer (it is not changed)"),
                io.Conditioning.Input("positive", tooltip="the positive prompt of every cell"),
                io.Conditioning.Input("negative", tooltip="the negative prompt of every cell"),
                io.Latent.Input("latent", tooltip="an empty latent: the pictures' size and batch"),
                io.Vae.Input("vae", tooltip="decodes the samples"),
                *sampling_inputs("the noise seed of every cell", "sampling steps per cell"),
                site_input("double_blocks.1:image"),
                io.String.Input("features", default="0",
                                tooltip="comma-separated feature ids, as in Steer (swap: source, target pairs); "
                                        "ignored when a concept is connected"),
                io.Combo.Input("mode", options=list(MODES),
                               tooltip="for the features: add, clamp, ablate or swap, as in Steer"),
                io.Combo.Input("units", options=list(UNITS),
                               tooltip="for the features: what strength 1 means, as in Steer"),
                io.String.Input("strengths", default="0, 0.05, 0.1, 0.2",
                                tooltip="the columns: comma-separated strengths (with a concept: its multiplier, a "
                                        "clamp concept's fraction 0..1 of the way; ablate and swap: fractions 0..1)"),
                io.String.Input("windows", default="0-1, 0-0.3, 0.3-1",
                                tooltip="the rows: comma-separated parts of sampling start-end (0 = first step, "
                                        "1 = last), e.g. 0-0.3"),
                io.Boolean.Input("cond_only", default=True,
                                 tooltip="for the features: steer only the positive prompt's half of CFG"),
                DICTIONARY.Input("dictionary", optional=True,
                                 tooltip="the features' dictionary (Load Dictionary); not needed with a concept"),
                CONCEPT.Input("concept", optional=True,
                              tooltip="a Steer by Concept's concept: sweeps it (its dictionary, site and mode) "
                                      "instead of the features"),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="the labelled grid of each cell's first picture: "
                                                                  "strengths across, windows down"),
                     io.Image.Output(display_name="images", tooltip="every cell's pictures, row by row, as a batch")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, mode: Optional[str] = None, units: Optional[str] = None,
                        sampler_name: Optional[str] = None, scheduler: Optional[str] = None) -> bool | str:
        return check_choices(cls, mode=mode, units=units, sampler_name=sampler_name, scheduler=scheduler)

    @classmethod
    def execute(cls, model, positive, negative, latent, vae, seed: int, steps: int, cfg: float, sampler_name: str,
                scheduler: str, site: str, features: str, mode: str, units: str, strengths: str, windows: str,
                cond_only: bool, dictionary: Optional[Dictionary] = None,
                concept: Optional[ConceptSteering] = None) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        require_choices(cls, mode=mode, units=units, sampler_name=sampler_name, scheduler=scheduler)
        columns, rows = parse_strengths(strengths), parse_windows(windows)
        check_cells(len(rows), len(columns))
        if concept is not None:
            require_linked(concept, ConceptSteering, "concept", "Steer by Concept")
            sae, site = concept.dictionary, concept.site
            if concept.mode == "clamp" and any(not 0 <= s <= 1 for s in columns):
                raise InputError("a clamp concept's strengths are fractions 0..1 of the way to the positive prompts' "
                                 "values: type strengths between 0 and 1")
            functions = [[concept.site_function(s, w) for s in columns] for _, w in rows]
        else:
            if dictionary is None:
                raise InputError("no dictionary: connect Load Dictionary (for the features) or a Steer by Concept's "
                                 "concept")
            require_linked(dictionary, Dictionary, "dictionary", "Load Dictionary or Train Dictionary")
            sae, ids = dictionary, parse_features(features)
            functions = [[steer_function(sae, [Steer(ids, s, mode=mode, units=units, window=w, cond_only=cond_only)])
                          for s in columns] for _, w in rows]  # validated before sampling
        check_sampling_inputs(model, vae, positive, negative)
        sampling = Sampling(latent, seed, steps, cfg, sampler_name, scheduler)
        bar = comfy.utils.ProgressBar(len(rows) * len(columns))
        images = []
        for row in functions:
            for function in row:
                comfy.model_management.throw_exception_if_processing_interrupted()
                patched, _ = patch_site(model, site, function, width=sae.d_in)
                images.append(decode(vae, sampling.sample(patched, positive, negative)))
                bar.update(1)
        cells = torch.stack([image[0] for image in images]).reshape(len(rows), len(columns), *images[0].shape[1:])
        grid = labelled_grid(cells, [label for label, _ in rows], [f"{s:g}" for s in columns],
                             title="strength across, window down")
        return io.NodeOutput(grid, torch.cat(images), ui=ui.PreviewImage(grid, cls=cls))


def decode(vae, samples: Tensor) -> Tensor:
    """The samples' pictures, as VAE Decode gives them (a video's frames one after another)."""
    images = vae.decode(samples)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images


def check_sampling_inputs(model, vae, positive, negative) -> None:
    """Refuse, before the first cell is sampled, what is not a MODEL, a positive or negative that is not this
    model's CONDITIONING, and what is not a VAE or is one for another model's latents."""
    adapter_for(model)  # an InputError for what is not a MODEL
    check_conditioning(positive, model, "positive")
    check_conditioning(negative, model, "negative")
    if vae is None or not hasattr(vae, "decode"):
        raise InputError("vae is not a VAE: connect one (Load Checkpoint, or Load Model Organism's vae)")
    made, taken = getattr(vae, "latent_channels", None), model_latent_channels(model)
    if made is not None and int(made) != taken:
        raise InputError(f"the VAE decodes {made}-channel latents but the model makes {taken}: connect the VAE that "
                         "belongs to this model")


def parse_strengths(text: str) -> list[float]:
    """``"0, 0.05, 0.1"`` -> ``[0.0, 0.05, 0.1]``: finite numbers, at least one."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise SteerError("strengths is empty: type comma-separated numbers, e.g. 0, 0.05, 0.1")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise SteerError(f"strength {part!r} is not a number: type comma-separated numbers, e.g. 0, 0.05, 0.1") \
                from None
        if not math.isfinite(value):
            raise SteerError(f"strength {part!r} is not a finite number: type numbers such as 0.1")
        if abs(value) > MAX_STRENGTH:
            raise SteerError(f"strength {part!r} is beyond +-{MAX_STRENGTH:g}, the Steer node's range: far past the "
                             "point where pictures turn to texture; type a smaller number")
        values.append(value)
    return values


WINDOW_TEXT = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*-\s*([0-9]*\.?[0-9]+)\s*")


def parse_windows(text: str) -> list[tuple[str, Optional[tuple[float, float]]]]:
    """``"0-1, 0-0.3"`` -> ``[("0-1", None), ("0-0.3", (0.0, 0.3))]``: each row's label and steering window."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ScheduleError("windows is empty: type comma-separated start-end parts of sampling, e.g. 0-1, 0-0.3")
    rows = []
    for part in parts:
        match = WINDOW_TEXT.fullmatch(part)
        if match is None:
            raise ScheduleError(f"window {part!r} is not start-end: type two numbers 0..1 joined by '-', e.g. 0-0.3")
        start, end = float(match[1]), float(match[2])
        if end > 1.0:
            raise ScheduleError(f"window {part!r} ends after 1, the last step: use points of sampling 0..1")
        if start > end:
            raise ScheduleError(f"window {part!r} starts after it ends: type start-end with start <= end")
        rows.append((part, window(start, end)))
    return rows


def check_cells(rows: int, columns: int) -> None:
    if rows * columns > MAX_CELLS:
        raise SteerError(f"{columns} strengths x {rows} windows make {rows * columns} cells, more than "
                         f"{MAX_CELLS}: sweep fewer strengths or windows")


# ----------------------------------------------------------------------------- labelled grids


@dataclass(frozen=True)
class GridLayout:
    """Where the cells and labels of a grid picture lie, in pixels."""

    rows: int
    columns: int
    cell_height: int
    cell_width: int
    scale: int
    """Each cell's picture is enlarged (nearest) this many times."""
    left: int
    top: int

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the whole picture."""
        return (self.top + self.rows * (self.cell_height + GAP),
                self.left + self.columns * (self.cell_width + GAP))

    def corner(self, row: int, column: int) -> tuple[int, int]:
        """``(y, x)`` of a cell's top-left pixel."""
        return self.top + row * (self.cell_height + GAP), self.left + column * (self.cell_width + GAP)


def _text_size(text: str) -> tuple[int, int]:
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=ImageFont.load_default())
    return box[2], box[3]


def grid_layout(rows: int, columns: int, cell: tuple[int, int], row_labels: Sequence[str],
                column_labels: Sequence[str], title: str = "") -> GridLayout:
    """The layout of :func:`labelled_grid` for cells of ``cell`` = ``(height, width)`` pixels."""
    scale = max(1, -(-MIN_CELL // max(cell)))
    label_width = max((_text_size(label)[0] for label in row_labels if label), default=0)
    text_height = max((_text_size(label)[1] for label in (*column_labels, title) if label), default=0)
    lines = int(bool(any(column_labels))) + int(bool(title))
    return GridLayout(rows, columns, cell[0] * scale, cell[1] * scale, scale,
                      left=GAP + (label_width + GAP if label_width else 0), top=GAP + lines * (text_height + GAP))


def labelled_grid(cells: Tensor, row_labels: Sequence[str], column_labels: Sequence[str], title: str = "") -> Tensor:
    """``cells`` ``(rows, columns, H, W, 3)`` in [0, 1] -> one IMAGE ``(1, height, width, 3)`` with the row labels on
    the left and the column labels above; small cells are enlarged, and each cell's pixels are kept exactly."""
    rows, columns, height, width = cells.shape[:4]
    layout = grid_layout(rows, columns, (height, width), row_labels, column_labels, title)
    canvas = Image.new("RGB", layout.size[::-1], "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    text_height = _text_size("0")[1]
    if title:
        draw.text((GAP, GAP), title, fill="black", font=font)
    for c, label in enumerate(column_labels):
        draw.text((layout.corner(0, c)[1], layout.top - GAP - text_height), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        y = layout.corner(r, 0)[0] + (layout.cell_height - text_height) // 2
        draw.text((GAP, y), label, fill="black", font=font)
    picture = pil_to_image(canvas)[0]
    enlarged = cells.float().cpu().repeat_interleave(layout.scale, 2).repeat_interleave(layout.scale, 3)
    for r in range(rows):
        for c in range(columns):
            y, x = layout.corner(r, c)
            picture[y:y + layout.cell_height, x:x + layout.cell_width] = enlarged[r, c, ..., :3]
    return picture[None]
