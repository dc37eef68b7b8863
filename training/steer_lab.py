"""``python -m training steer-lab``: does steering work? Class flips on the model organisms, against controls.

The question an artist asks of a steer is "does it turn my picture into the thing I asked for, and is the
picture still a picture?". On the organisms both halves are measurable: a classifier knows the 20 classes.
For a target class the lab generates the other classes of its domain (digits or animals) under a steer and
counts, per method:

* **flip**: the share of samples the classifier now calls the target;
* **clean**: the share that still look like real pictures of *some* class to the judge (:data:`CLEAN_QUANTILE`):
  texture and noise do not;
* **clean flip**: both at once, the figure methods are ranked by.

Every method is chosen from *choosing seeds* (profiles and trial steers) that never overlap the evaluation
seeds, and every SAE method is paired with two controls of the same size, added the same way: the same
weights on random features, and the same vector rotated to a random direction (mean and max over a few).

Methods (``METHODS``), each a recipe "target class -> steers at a site":

* ``feature:specific``, ``feature:words``, ``feature:causal``: add one feature, chosen by activation
  specificity (mean code on the target's prompts minus the other classes'), by prompt-word association in the
  shipped feature index, or by a short trial steer on the choosing seeds (the candidate that most raises the
  classifier's probability of the target);
* ``concept``: the SAE-projected difference of means (:func:`sae_core.concepts.concept_from_codes`), its top-n
  features with their weights, added in raw units (strength 1 adds exactly the mean difference they explain);
* ``concept:spatial``: a concept per token position (:func:`sae_core.concepts.spatial_concept_from_codes`),
  each position's vector added there;
* ``concept:clamp``: a concept per sampling step and position, clamped
  (:func:`sae_core.concepts.clamp_steer_function`): the sample's own activation of each selected feature is
  moved to the target's mean there and then;
* ``replace``: detect-then-replace (:func:`sae_core.concepts.replace_steers`): where features of the other
  classes fire, remove them and add the target's concept; other tokens are left bit for bit;
* ``diff_of_means``: the plain supervised difference of mean activations (the bar), raw units;
* ``diff_of_means:spatial``: the same difference per step and position (the bar for the two above).

``--groups`` steers several sites at once (each its own part of the recipe). Every row also reports its digit
and animal targets apart: the two domains steer very differently.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from organism.data import ANIMALS, CLASSES, DIGITS, class_prompt
from sae_core import (DictionaryConfig, InputError, Recorder, ShardReader, Site, SiteFunction, Steer, TrainConfig,
                      in_window, load_dictionary, prompt_rows, save_dictionary, steer_function, train_dictionary)
from sae_core.steering import add_direction

if TYPE_CHECKING:
    from .runner import Runner

CLEAN_QUANTILE = 0.99
"""A sample counts as a clean picture when the judge's features lie no farther from the nearest class than those of
99 % of real held-out images (Mahalanobis distance in the classifier's last hidden layer, classes' means and a shared
covariance fitted on the training split). The classifier's confidence alone does not separate pictures from noise:
it gives uniform noise a median top probability of 0.6 (measured 2026-12-01)."""


# ----------------------------------------------------------------------------- classes and seeds


def domain_of(target: int) -> list[int]:
    """The classes a target is reached from: the other digits for a digit, the other animals for an animal."""
    first, size = (0, len(DIGITS)) if target < len(DIGITS) else (len(DIGITS), len(ANIMALS))
    return [c for c in range(first, first + size) if c != target]


def fixed_half(seed: int = 0) -> list[int]:
    """Ten of the twenty classes, drawn once by ``seed``: a subset nobody picked by hand."""
    classes = list(range(len(CLASSES)))
    random.Random(seed).shuffle(classes)
    return sorted(classes[:len(classes) // 2])


@dataclass(frozen=True)
class Seeds:
    """Choosing seeds (profiles, trial steers) and evaluation seeds never overlap."""

    profile: tuple[int, ...] = (100, 101, 102, 103)
    trial: tuple[int, ...] = (200,)
    evaluate: tuple[int, ...] = (1000, 1001, 1002)

    def __post_init__(self) -> None:
        if set(self.evaluate) & (set(self.profile) | set(self.trial)):
            raise InputError("the evaluation seeds overlap the seeds features are chosen with: keep them apart")


# ----------------------------------------------------------------------------- profiles


@dataclass
class SiteProfile:
    """Per class prompt, at one site: mean activation and each dictionary's mean codes (over tokens, steps, seeds)."""

    activation_means: Tensor
    """(classes, d) float64"""
    code_means: dict[str, Tensor]
    """kind -> (classes, n_latents) float64"""
    step_means: dict[str, Tensor] = field(default_factory=dict)
    """kind -> (classes, steps, tokens, n_latents) float32: the mean code at each sampling step and token position
    (where the class is drawn: on an image stream the digit's strokes sit at some positions and not others, and
    what a feature holds changes along sampling)."""
    step_activations: Optional[Tensor] = None
    """(classes, steps, tokens, d) float32: the mean activation at each step and position."""

    @cached_property
    def position_means(self) -> dict[str, Tensor]:
        """kind -> (classes, tokens, n_latents): the mean code at each position over every step."""
        return {kind: means.mean(1) for kind, means in self.step_means.items()}

    def contrast(self, target: int, of: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(target's mean, mean over the other classes of its domain) of ``of`` (default: activation means)."""
        values = self.activation_means if of is None else of
        return values[target], values[domain_of(target)].mean(0)


def profile_sites(runner: Runner, dictionaries: dict[Site, dict[str, Any]], seeds: Sequence[int],
                  batch_size: int = 40) -> dict[Site, SiteProfile]:
    """Mean activations and codes per class prompt at every site at once (cond rows, every step; per step and
    position too)."""
    n, steps = len(CLASSES), runner.defaults()[0]
    act_sums = {site: torch.zeros(n, int(site.extra["d"]), dtype=torch.float64) for site in dictionaries}
    code_sums = {site: {kind: torch.zeros(n, d.n_latents, dtype=torch.float64) for kind, d in kinds.items()}
                 for site, kinds in dictionaries.items()}
    counts = {site: torch.zeros(n, dtype=torch.float64) for site in dictionaries}
    step_sums: dict[Site, dict[str, Tensor]] = {site: {} for site in dictionaries}
    step_act_sums: dict[Site, Tensor] = {}
    jobs = [(c, s) for c in range(n) for s in seeds]
    for start in tqdm(range(0, len(jobs), batch_size), desc="profile classes", unit="batch", leave=False):
        chunk = jobs[start:start + batch_size]
        owner = torch.tensor([c for c, _ in chunk])
        recorders = {site: Recorder(stream=_accumulator(site, owner, act_sums, code_sums, step_sums, step_act_sums,
                                                        counts, dictionaries, steps))
                     for site in dictionaries}
        for recorder in recorders.values():
            recorder.begin(range(len(chunk)))
        runner.generate([class_prompt(c) for c, _ in chunk], [s for _, s in chunk], site_functions=recorders)
    profiles = {}
    for site in dictionaries:
        per_class = counts[site][:, None]
        per_step = (per_class / (steps * step_act_sums[site].shape[2]))[:, :, None, None].float()
        profiles[site] = SiteProfile(act_sums[site] / per_class,
                                     {kind: total / per_class for kind, total in code_sums[site].items()},
                                     {kind: total / per_step for kind, total in step_sums[site].items()},
                                     step_act_sums[site] / per_step)
    return profiles


def _accumulator(site, owner, act_sums, code_sums, step_sums, step_act_sums, counts, dictionaries,
                 steps) -> Callable:
    def accumulate(record) -> None:
        x = record.acts.double()  # (rows, tokens, d)
        rows_owner = owner[record.rows]
        tokens = x.shape[1]
        step = _step_index(record, steps)
        if site not in step_act_sums:
            step_act_sums[site] = torch.zeros(len(CLASSES), steps, tokens, x.shape[-1])
        step_act_sums[site][:, step].index_add_(0, rows_owner, record.acts.float())
        act_sums[site].index_add_(0, rows_owner, x.sum(1))
        counts[site].index_add_(0, rows_owner, torch.full((len(rows_owner),), float(tokens), dtype=torch.float64))
        per_token = rows_owner.repeat_interleave(tokens)
        position = torch.arange(tokens).repeat(len(rows_owner))
        for kind, dictionary in dictionaries[site].items():
            with torch.no_grad():
                codes = dictionary.encode(record.acts.reshape(-1, x.shape[-1]).float())
            values, indices = codes.values.double().cpu(), codes.indices.cpu()
            where = (per_token[:, None].expand_as(indices), indices)
            code_sums[site][kind].index_put_(where, values, accumulate=True)
            if kind not in step_sums[site]:
                step_sums[site][kind] = torch.zeros(len(CLASSES), steps, tokens, dictionary.n_latents)
            where = (per_token[:, None].expand_as(indices), position[:, None].expand_as(indices), indices)
            step_sums[site][kind][:, step].index_put_(where, values.float(), accumulate=True)

    return accumulate


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Outcome:
    """What a steer did to the samples of one target: counts, so outcomes add up over targets."""

    samples: int = 0
    flipped: int = 0
    clean: int = 0
    clean_flipped: int = 0
    kept: int = 0

    def add(self, other: "Outcome") -> "Outcome":
        return Outcome(*(a + b for a, b in zip(self.counts(), other.counts())))

    def counts(self) -> tuple[int, ...]:
        return self.samples, self.flipped, self.clean, self.clean_flipped, self.kept

    def rates(self) -> dict[str, float]:
        n = max(self.samples, 1)
        return {"flip": self.flipped / n, "clean": self.clean / n, "clean_flip": self.clean_flipped / n,
                "kept": self.kept / n, "samples": self.samples}


Judge = Callable[[Tensor], tuple[Tensor, Tensor]]
"""Images (B, C, H, W) in [0, 1] -> (class ids (B,), clean (B,) bool)."""


@dataclass
class OrganismJudge:
    """The organism classifier's verdict, and whether its features say "a real picture" (:data:`CLEAN_QUANTILE`)."""

    classifier: torch.nn.Module
    means: Tensor
    precision: Tensor
    threshold: float

    @classmethod
    def fit(cls, classifier: torch.nn.Module) -> "OrganismJudge":
        from organism.data import organism_data

        train, held = organism_data()
        judge = cls(classifier, torch.zeros(0), torch.zeros(0), math.inf)
        features = judge.features(train.images)
        means = torch.stack([features[train.labels == c].mean(0) for c in range(len(CLASSES))])
        centred = features - means[train.labels]
        covariance = centred.T @ centred / len(features) + 1e-3 * torch.eye(features.shape[1], dtype=torch.float64)
        judge.means, judge.precision = means, torch.linalg.inv(covariance)
        judge.threshold = float(judge.distance(held.images).quantile(CLEAN_QUANTILE))
        return judge

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """The classifier's last hidden layer for images in [-1, 1]."""
        body = self.classifier[:-1]
        return torch.cat([body(x[i:i + 512].float()) for i in range(0, len(x), 512)]).double()

    def distance(self, x: Tensor) -> Tensor:
        """Squared Mahalanobis distance to the nearest class mean."""
        d = self.features(x)[:, None, :] - self.means[None]
        return torch.einsum("ncd,de,nce->nc", d, self.precision, d).min(1).values

    def probabilities(self, images: Tensor) -> Tensor:
        from organism.classifier import classify

        return classify(self.classifier, images[:, :1] * 2 - 1)[1]

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images[:, :1] * 2 - 1
        return self.probabilities(images).argmax(-1), self.distance(x) <= self.threshold


def run_steered(runner: Runner, functions: dict[Site, SiteFunction], target: int, seeds: Sequence[int],
                batch_size: int = 64) -> tuple[list[int], list[int], Tensor]:
    """Generate every source class of ``target``'s domain x ``seeds`` under ``functions``: (asked, seeds, images)."""
    jobs = [(c, s) for c in domain_of(target) for s in seeds]
    images = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        images.append(runner.generate([class_prompt(c) for c, _ in chunk], [s for _, s in chunk],
                                      site_functions=functions))
    return [c for c, _ in jobs], [s for _, s in jobs], torch.cat(images)


def outcome_of(judge: Judge, images: Tensor, asked: Sequence[int], target: int) -> Outcome:
    predicted, clean = judge(images)
    flipped = predicted == target
    return Outcome(len(predicted), int(flipped.sum()), int(clean.sum()), int((flipped & clean).sum()),
                   int((predicted == torch.tensor(list(asked))).sum()))


# ----------------------------------------------------------------------------- dictionaries per site


def lab_dictionaries(runner: Runner, sites: Sequence[Site], kinds: Sequence[str], work: Path, seed: int,
                     steps: int, captions: Sequence[str]) -> dict[Site, dict[str, Any]]:
    """Per site, a dictionary of each kind trained with the shipped recipe (8x wide, k=8 or target L0 8) on one
    capture of ``captions`` (16 tokens per image and step), all cached under ``work``: a rerun trains nothing
    that is there, and a killed run resumes."""
    from .capture import CaptureSettings, capture, site_dir

    def path(site: Site, kind: str) -> Path:
        return work / "dictionaries" / f"{kind}_{site.name.replace(':', '-')}.safetensors"

    missing = [site for site in sites if any(not path(site, kind).exists() for kind in kinds)]
    acts = work / "activations"
    if missing:
        settings = CaptureSettings(model=runner.name, prompts=list(captions), images_per_prompt=1, seed=seed,
                                   tokens_per_image=16)
        capture(runner, settings, missing, acts, batch_size=32, shard_tokens=65536)
    for site in missing:
        for kind in kinds:
            if path(site, kind).exists():
                continue
            options = dict(kind=kind, k=8) if kind == "itda" else dict(kind=kind, k=8, n_latents=8 * int(site.extra["d"]))
            config = TrainConfig(DictionaryConfig(**options), total_steps=steps // 6 if kind == "itda" else steps,
                                 batch_size=1024, warmup_steps=50, seed=seed, dead_tokens=100_000,
                                 **({"loss_threshold": 0.35} if kind == "itda" else {}))
            reader = ShardReader(site_dir(acts, site), batch_size=1024, seed=seed)
            result = train_dictionary(reader, config, site=site,
                                      checkpoint_dir=path(site, kind).with_suffix(".checkpoint"))
            path(site, kind).parent.mkdir(parents=True, exist_ok=True)
            save_dictionary(result.dictionary, path(site, kind))
    return {site: {kind: load_dictionary(path(site, kind)) for kind in kinds} for site in sites}


# ----------------------------------------------------------------------------- recipes


@dataclass
class Part:
    """What a recipe does at one site: steers through a dictionary, and/or a plain vector added in raw units."""

    dictionary: Any
    steers: list[Steer] = field(default_factory=list)
    vector: Optional[Tensor] = None
    vector_units: str = "raw"
    """``raw``: ``vector`` is added as it is; ``token_norm``: its unit direction x ``vector_strength`` x the row's
    mean token norm (what a token_norm feature add puts on a token)."""
    vector_strength: float = 1.0
    detect: tuple[int, ...] = ()
    """For ``vector``: add it only on tokens where one of these features fires (as a detect-gated Steer would)."""
    positional: Optional[Any] = None
    """A :class:`sae_core.concepts.SpatialConcept` added in raw units to each prompt row, position by position."""
    position_vectors: Optional[Tensor] = None
    """Or given ``(tokens, d)`` vectors for that (a spatial concept's random-direction control)."""
    clamp: Optional[Any] = None
    """A :class:`sae_core.concepts.ScheduledConcept` clamped at ``clamp_strength`` on the prompt rows."""
    clamp_strength: float = 1.0
    turned: Optional[int] = None
    """For ``clamp``: a random-direction control of it. Each token's edit is replaced by a fixed random direction
    (drawn from this seed, one per step and position) of the edit's own norm."""
    step_vectors: Optional[Tensor] = None
    """``(steps, tokens, d)`` vectors added on the prompt rows at the nearest measured step (evenly spaced)."""

    def by_position(self) -> Optional[Tensor]:
        """The ``(tokens, d)`` vectors added per position, if any."""
        if self.position_vectors is not None:
            return self.position_vectors
        return None if self.positional is None else self.positional.vectors(self.dictionary)


@dataclass
class Recipe:
    """A method's steer for one target: a part per site, and what it chose (for the report)."""

    parts: dict[Site, Part]
    chosen: str = ""

    def functions(self, window: Optional[tuple[float, float]]) -> dict[Site, SiteFunction]:
        return {site: _part_function(part, window) for site, part in self.parts.items()}


def _step_index(ctx, steps: int) -> int:
    """The step of an evenly spaced ``steps``-step schedule a call belongs to (profiles are kept per step)."""
    return int(round(ctx.progress * (steps - 1)))


def _part_function(part: Part, window: Optional[tuple[float, float]]) -> SiteFunction:
    from sae_core.concepts import add_per_position, clamp_steer_function

    steers = [_windowed(s, window) for s in part.steers]
    steered = steer_function(part.dictionary, steers) if steers else None
    per_position = part.by_position()
    clamped = None
    if part.clamp is not None:
        clamped = clamp_steer_function(part.dictionary, part.clamp, part.clamp_strength, window)
        if part.turned is not None:
            clamped = _turned(clamped, part.turned, part.clamp)

    def apply(h: Tensor, ctx) -> Tensor:
        if clamped is not None:
            h = clamped(h, ctx)
        if part.step_vectors is not None and in_window(ctx, window):
            h = add_per_position(h, ctx, part.step_vectors[_step_index(ctx, part.step_vectors.shape[0])])
        if per_position is not None and in_window(ctx, window):
            h = add_per_position(h, ctx, per_position)
        if part.vector is not None and in_window(ctx, window):
            weights = torch.zeros(h.shape[0], h.shape[1], device=h.device)
            weights[prompt_rows(ctx, h.shape[0]).to(h.device)] = 1.0
            if part.detect:
                from sae_core.steering import feature_activations

                weights = weights * (feature_activations(h, part.dictionary, part.detect) > 0).any(-1)
            h = add_direction(h, part.vector, part.vector_strength, part.vector_units, token_weights=weights)
        return steered(h, ctx) if steered is not None else h

    return apply


def _turned(clamped: SiteFunction, seed: int, concept) -> SiteFunction:
    """``clamped``'s edit with each token's change turned to a fixed random direction of the same norm."""
    def turned(h: Tensor, ctx) -> Tensor:
        edit = clamped(h, ctx) - h
        if not bool(edit.any()):
            return h
        step = concept.step_at(ctx.progress)
        gen = torch.Generator().manual_seed(seed * 1000 + step)
        directions = torch.randn(h.shape[1], h.shape[2], generator=gen).to(h.device)
        directions = directions / directions.norm(dim=-1, keepdim=True)
        return h + edit.norm(dim=-1, keepdim=True) * directions.to(h.dtype)

    return turned


def _windowed(steer: Steer, window: Optional[tuple[float, float]]) -> Steer:
    from dataclasses import replace

    return replace(steer, window=window)


def added_vector(part: Part) -> Tensor:
    """The raw-unit vector the part's add steers put on an edited token (token_norm adds are refused here)."""
    total = torch.zeros(part.dictionary.d_in, dtype=torch.float64)
    for steer in part.steers:
        if steer.mode != "add":
            continue
        if steer.units != "raw":
            raise InputError(f"a same-norm control of a {steer.units} add is built by random_direction_control")
        directions = torch.stack([part.dictionary.direction(f).detach().double().cpu() for f in steer.features])
        total += torch.tensor(steer.strengths, dtype=torch.float64) @ directions
    if part.vector is not None:
        total += part.vector.double()
    return total.float()


def random_features_control(recipe: Recipe, rng: torch.Generator, alive: dict[Site, Tensor]) -> Recipe:
    """The same steers with each added feature replaced by a random live feature of the same weight."""
    from dataclasses import replace

    parts = {}
    for site, part in recipe.parts.items():
        steers = []
        for steer in part.steers:
            if steer.mode == "add":
                pool = alive[site]
                picks = pool[torch.randperm(len(pool), generator=rng)[:len(steer.features)]].tolist()
                steer = replace(steer, features=tuple(picks))
            steers.append(steer)
        positional = part.positional
        if positional is not None:
            from sae_core.concepts import SpatialConcept

            pool, (tokens, n) = alive[site], positional.features.shape
            picks = torch.stack([pool[torch.randperm(len(pool), generator=rng)[:n]] for _ in range(tokens)])
            positional = SpatialConcept(picks, positional.weights)
        clamp = part.clamp
        if clamp is not None:
            from sae_core.concepts import ScheduledConcept

            pool = alive[site]
            picks = pool[torch.randint(len(pool), clamp.features.shape, generator=rng)]
            clamp = ScheduledConcept(picks, clamp.targets, clamp.progress)
        parts[site] = Part(part.dictionary, steers, part.vector, part.vector_units, part.vector_strength, part.detect,
                           positional, clamp=clamp, clamp_strength=part.clamp_strength)
    return Recipe(parts, "random features")


def random_direction_control(recipe: Recipe, rng: torch.Generator) -> Recipe:
    """The recipe's added vector turned to a random direction (same norm, same tokens); removals are kept."""
    parts = {}
    for site, part in recipe.parts.items():
        kept = [s for s in part.steers if s.mode != "add"]
        detect = next((s.detect for s in part.steers if s.detect), part.detect)
        token_norm = [s for s in part.steers if s.mode == "add" and s.units == "token_norm"]
        if token_norm:  # one token_norm feature add: the same strength along a random unit direction
            turned = torch.randn(part.dictionary.d_in, generator=rng)
            parts[site] = Part(part.dictionary, kept, turned, "token_norm", token_norm[0].strengths[0], detect)
            continue
        if part.clamp is not None:  # each token's clamp edit, turned
            seed = int(torch.randint(1 << 30, (1,), generator=rng))
            parts[site] = Part(part.dictionary, kept, clamp=part.clamp, clamp_strength=part.clamp_strength, turned=seed)
            continue
        if part.step_vectors is not None:  # a random direction per step and position, each of its norm
            turned = torch.randn(part.step_vectors.shape, generator=rng)
            turned = turned / turned.norm(dim=-1, keepdim=True) * part.step_vectors.norm(dim=-1, keepdim=True)
            parts[site] = Part(part.dictionary, kept, step_vectors=turned)
            continue
        if part.positional is not None:  # a random direction per position, each of that position's norm
            vectors = part.by_position()
            turned = torch.randn(vectors.shape, generator=rng)
            turned = turned / turned.norm(dim=-1, keepdim=True) * vectors.norm(dim=-1, keepdim=True)
            parts[site] = Part(part.dictionary, kept, position_vectors=turned)
            continue
        vector = added_vector(part)
        turned = torch.randn(vector.shape, generator=rng)
        parts[site] = Part(part.dictionary, kept, turned / turned.norm() * vector.norm(), detect=detect)
    return Recipe(parts, "random direction")


# ----------------------------------------------------------------------------- methods


METHODS = ("feature:specific", "feature:words", "feature:causal", "concept", "concept:spatial", "concept:clamp",
           "replace", "diff_of_means", "diff_of_means:spatial")
CANDIDATES = 8
"""Features a causal choice tries (the most specific ones), each in a short trial steer on the trial seeds."""


@dataclass
class Setting:
    """One cell of the sweep: how much, when, with how many features, where."""

    strength: float
    window: Optional[tuple[float, float]] = None
    top_n: int = 8

    def label(self) -> str:
        window = "all steps" if self.window is None else f"{self.window[0]:g}-{self.window[1]:g}"
        return f"strength {self.strength:g}, {window}, top {self.top_n}"


@dataclass
class Context:
    """What recipes are built from: the model, profiles, dictionaries and the judge, all from choosing seeds."""

    runner: Runner
    profiles: dict[Site, SiteProfile]
    dictionaries: dict[Site, dict[str, Any]]
    probabilities: Callable[[Tensor], Tensor]
    seeds: Seeds
    indexes: dict[Site, Any] = field(default_factory=dict)
    """Feature indexes (for ``feature:words``), where a site's dictionary has one."""
    causal_cache: dict[tuple, int] = field(default_factory=dict)


def class_word(target: int) -> str:
    return CLASSES[target]


def recipe(ctx: Context, method: str, target: int, sites: Sequence[Site], kind: str, setting: Setting) -> Recipe:
    """The steer ``method`` builds for ``target`` at ``sites`` (several sites: each gets its own part)."""
    parts, chosen = {}, []
    for site in sites:
        part, what = _site_recipe(ctx, method, target, site, kind, setting)
        parts[site] = part
        chosen.append(what)
    return Recipe(parts, "; ".join(chosen))


def _site_recipe(ctx: Context, method: str, target: int, site: Site, kind: str, setting: Setting) -> tuple[Part, str]:
    from sae_core.concepts import concept_from_codes, concept_from_words, replace_steers

    profile, dictionary = ctx.profiles[site], ctx.dictionaries[site][kind]
    positive, negative = profile.contrast(target, profile.code_means[kind])
    s = setting.strength
    if method == "none":
        return Part(dictionary), "nothing"
    if method == "diff_of_means":
        a, b = profile.contrast(target)
        return Part(dictionary, vector=(s * (a - b)).float()), "mean difference"
    if method == "concept":
        concept = concept_from_codes(positive, negative, setting.top_n, dictionary=dictionary)
        return Part(dictionary, [concept.steer(s)]), _describe(concept)
    if method == "concept:spatial":
        from sae_core.concepts import SpatialConcept, spatial_concept_from_codes

        means = profile.position_means[kind]
        concept = spatial_concept_from_codes(means[target], means[domain_of(target)].mean(0), setting.top_n)
        return Part(dictionary, positional=SpatialConcept(concept.features, s * concept.weights)), \
            f"top {setting.top_n} features at each of {concept.tokens} positions"
    if method == "concept:clamp":
        from sae_core.concepts import scheduled_concept_from_codes

        means = profile.step_means[kind]
        concept = scheduled_concept_from_codes(means[target], means[domain_of(target)].mean(0), setting.top_n)
        return Part(dictionary, clamp=concept, clamp_strength=s), \
            f"top {setting.top_n} features clamped at each of {concept.steps} steps x {concept.tokens} positions"
    if method == "diff_of_means:spatial":
        means = profile.step_activations
        return Part(dictionary, step_vectors=s * (means[target] - means[domain_of(target)].mean(0))), \
            "mean difference at each step and position"
    if method == "replace":
        target_concept = concept_from_codes(positive, negative, setting.top_n, dictionary=dictionary)
        source = concept_from_codes(negative, positive, setting.top_n, sign="positive")
        return Part(dictionary, replace_steers(source, target_concept, s)), \
            f"detect {list(source.features)} -> {_describe(target_concept)}"
    if method == "feature:specific":
        feature = int((positive - negative).argmax())
    elif method == "feature:words":
        if site not in ctx.indexes:
            raise InputError(f"feature:words needs a feature index for the dictionary at {site.name}")
        feature = concept_from_words(ctx.indexes[site], class_word(target), 1).features[0]
    elif method == "feature:causal":
        feature = _causal_feature(ctx, target, site, kind, positive - negative)
    else:
        raise InputError(f"unknown steering method {method!r}: use one of {', '.join(METHODS)}")
    return Part(dictionary, [Steer((feature,), (s,), units="token_norm")]), f"feature {feature}"


def _describe(concept) -> str:
    return "features " + ", ".join(f"{f} ({w:+.2f})" for f, w in zip(concept.features, concept.weights))


def _causal_feature(ctx: Context, target: int, site: Site, kind: str, specificity: Tensor) -> int:
    """Of the most specific features, the one whose trial steer (token_norm 0.5, trial seeds) most raises the
    classifier's mean probability of the target: chosen by effect, not by activation."""
    key = (target, site.name, kind)
    if key not in ctx.causal_cache:
        dictionary = ctx.dictionaries[site][kind]
        candidates = torch.argsort(specificity, descending=True)[:CANDIDATES].tolist()
        scores = []
        for f in candidates:
            functions = {site: steer_function(dictionary, [Steer((f,), (0.5,), units="token_norm")])}
            _, _, images = run_steered(ctx.runner, functions, target, ctx.seeds.trial)
            scores.append(float(ctx.probabilities(images)[:, target].mean()))
        ctx.causal_cache[key] = candidates[max(range(len(scores)), key=scores.__getitem__)]
    return ctx.causal_cache[key]


# ----------------------------------------------------------------------------- measuring


@dataclass
class Row:
    """One line of the lab's table: a method in a setting, over all targets, with its controls."""

    method: str
    sites: list[str]
    kind: str
    setting: Setting
    outcome: dict[str, float]
    controls: dict[str, dict[str, float]] = field(default_factory=dict)
    chosen: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    domains: dict[str, dict[str, float]] = field(default_factory=dict)
    """The outcome over the digit targets and over the animal targets apart."""

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "sites": self.sites, "kind": self.kind, "strength": self.setting.strength,
                "window": self.setting.window, "top_n": self.setting.top_n, "outcome": self.outcome,
                "domains": self.domains, "controls": self.controls, "chosen": self.chosen,
                "seconds": round(self.seconds, 1)}


def measure(ctx: Context, judge: Judge, method: str, sites: Sequence[Site], kind: str, setting: Setting,
            targets: Sequence[int], seeds: Sequence[int], controls: int = 0, control_seed: int = 0) -> Row:
    """Flip, clean and clean-flip rates of ``method`` over ``targets`` on ``seeds`` (the trial seeds while a
    setting is chosen, the evaluation seeds once it is), and with ``controls`` > 0 the mean and max of that many
    random-feature and random-direction controls of the same size."""
    started = time.perf_counter()
    total, chosen, domains = Outcome(), {}, {}
    recipes = {}
    for target in targets:
        r = recipe(ctx, method, target, sites, kind, setting)
        recipes[target] = r
        chosen[CLASSES[target]] = r.chosen
        asked, _, images = run_steered(ctx.runner, r.functions(setting.window), target, seeds)
        outcome = outcome_of(judge, images, asked, target)
        total = total.add(outcome)
        domain = "digits" if target < len(DIGITS) else "animals"
        domains[domain] = domains.get(domain, Outcome()).add(outcome)
    row = Row(method, [s.name for s in sites], kind, setting, total.rates(), chosen=chosen,
              domains={name: o.rates() for name, o in domains.items()})
    if controls:
        rng = torch.Generator().manual_seed(control_seed)
        alive = {site: (ctx.profiles[site].code_means[kind].sum(0) > 0).nonzero().flatten() for site in sites}
        for name, make in (("random features", lambda r: random_features_control(r, rng, alive)),
                           ("random direction", lambda r: random_direction_control(r, rng))):
            if method.startswith("diff_of_means") and name == "random features":
                continue  # a plain vector has no features to draw
            rates = []
            for _ in range(controls):
                draw = Outcome()
                for target in targets:
                    asked, _, images = run_steered(ctx.runner, make(recipes[target]).functions(setting.window), target,
                                                   seeds)
                    draw = draw.add(outcome_of(judge, images, asked, target))
                rates.append(draw.rates())
            row.controls[name] = {"flip_mean": sum(r["flip"] for r in rates) / len(rates),
                                  "flip_max": max(r["flip"] for r in rates),
                                  "clean_flip_max": max(r["clean_flip"] for r in rates),
                                  "clean_mean": sum(r["clean"] for r in rates) / len(rates)}
    row.seconds = time.perf_counter() - started
    return row


# ----------------------------------------------------------------------------- the lab


LAB_SITES = {"organism-flux": ("double_blocks.0:text", "double_blocks.1:text", "double_blocks.1:image"),
             "organism-unet": ("middle_block:residual", "output_blocks.1:residual", "output_blocks.3:residual")}
"""The residual streams swept by default (single_blocks.1:text is left out: the last block's text tokens feed
nothing, and steering them was measured to change nothing)."""
SHIPPED_SITES = {"organism-flux": ("double_blocks.1:image", "organism_flux_db1_image"),
                 "organism-unet": ("output_blocks.3:residual", "organism_unet_ob3_residual")}
"""Where each organism's shipped dictionary (with its feature index) sits: the lab uses it there, so
``feature:words`` reads the index the feature browser shows."""
STRENGTHS = {"feature:specific": (0.25, 1.0), "feature:words": (0.25, 1.0), "feature:causal": (0.25, 1.0),
             "concept": (2.0, 8.0, 32.0), "concept:spatial": (0.5, 1.0, 2.0), "concept:clamp": (0.5, 1.0),
             "replace": (2.0, 8.0, 32.0), "diff_of_means": (2.0, 8.0, 32.0), "diff_of_means:spatial": (0.5, 1.0, 2.0)}
"""Swept per method: token_norm for one feature (0.1 is Steer's default), multiples of the supervised mean
difference (raw units) for concepts and the diff of means, the fraction of the way to the target for a clamp
(1 clamps)."""
TOP_N = {"concept:clamp": 32}
"""Features kept per method (per position and step for a clamp) unless the plan says otherwise; others keep
:data:`DEFAULT_TOP_N`. A clamp only moves features toward values the target really has, so it can keep more: on
the U-Net organism's output_blocks.1 it flipped 0.17 of samples cleanly with 8 and 0.42 with 32 (180 samples,
2026-12-01)."""
DEFAULT_TOP_N = 8
WINDOWS = (None, (0.0, 0.5))


@dataclass
class LabPlan:
    model: str
    out: Path
    sites: list[str]
    methods: list[str]
    kinds: list[str]
    targets: list[int]
    seeds: Seeds
    windows: list[Optional[tuple[float, float]]]
    strengths: dict[str, tuple[float, ...]]
    top_n: Optional[int] = None
    """Features every concept keeps; None: :data:`TOP_N` per method."""
    groups: list[list[str]] = field(default_factory=list)
    """Sets of ``sites`` steered at once (each site its own part), swept beside the single sites."""
    controls: int = 2
    dictionary_steps: int = 1000
    captions: int = 240
    seed: int = 0


def _shipped_dictionary(model: str, site: Site):
    from sae_core.feature_index import index_folder_for, open_index

    name, stem = SHIPPED_SITES.get(model, (None, None))
    if name != site.name:
        return None, None
    path = Path(__file__).resolve().parent.parent / "models" / "sae" / f"{stem}.safetensors"
    if not path.exists():
        return None, None
    return load_dictionary(path), open_index(index_folder_for(path))


def run_lab(plan: LabPlan, runner: Runner, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Sweep every method x site x strength x window on the trial seeds, then measure each method's best setting
    (by clean flips on the trial seeds) on the evaluation seeds with its controls. Writes ``lab.json``,
    ``lab.md`` and pictures under ``plan.out``; returns the summary."""
    from organism.classifier import load_classifier
    from organism.data import organism_data

    started = time.perf_counter()
    sites = [runner.site(name) for name in plan.sites]
    plan.out.mkdir(parents=True, exist_ok=True)
    captions = sorted(set(organism_data()[0].captions))
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(plan.seed)).tolist()
    dictionaries = lab_dictionaries(runner, sites, plan.kinds, plan.out / "work", plan.seed, plan.dictionary_steps,
                                    [captions[i] for i in order[:plan.captions]])
    indexes = {}
    for site in sites:
        shipped, index = _shipped_dictionary(plan.model, site)
        if shipped is not None:
            dictionaries[site]["topk"], indexes[site] = shipped, index
    say(f"[lab] dictionaries ready at {', '.join(s.name for s in sites)} ({', '.join(plan.kinds)})")
    profiles = profile_sites(runner, dictionaries, plan.seeds.profile)
    judge = OrganismJudge.fit(load_classifier())
    ctx = Context(runner, profiles, dictionaries, judge.probabilities, plan.seeds, indexes)
    baseline = measure(ctx, judge, "none", sites[:1], "topk", Setting(0.0), plan.targets, plan.seeds.evaluate)
    say(f"[lab] unsteered: {_rates(baseline.outcome)}")
    sweep: list[Row] = []
    units = [[site] for site in sites] + [[runner.site(name) for name in group] for group in plan.groups]
    for method in plan.methods:
        top_n = plan.top_n or TOP_N.get(method, DEFAULT_TOP_N)
        for unit in units:
            if method == "feature:words" and any(site not in indexes for site in unit):
                continue
            for strength in plan.strengths[method]:
                for window in plan.windows:
                    setting = Setting(strength, window, top_n)
                    row = measure(ctx, judge, method, unit, "topk", setting, plan.targets, plan.seeds.trial)
                    sweep.append(row)
                    say(f"[sweep] {method:<21} {'+'.join(s.name for s in unit):<24} {setting.label():<34} "
                        f"{_rates(row.outcome)}")
    final: list[Row] = []
    for method in plan.methods:
        candidates = [r for r in sweep if r.method == method]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: (r.outcome["clean_flip"], -r.setting.strength))
        row = measure(ctx, judge, method, [runner.site(name) for name in best.sites], "topk", best.setting,
                      plan.targets, plan.seeds.evaluate, controls=plan.controls, control_seed=plan.seed)
        final.append(row)
        say(f"[final] {method:<21} {'+'.join(best.sites):<24} {best.setting.label():<34} {_rates(row.outcome)}  "
            f"controls: {_controls(row)}")
    final += _kind_rows(ctx, judge, plan, final, runner, say)
    summary = {"model": plan.model, "targets": [CLASSES[t] for t in plan.targets], "seeds": plan.seeds.__dict__,
               "clean_threshold": judge.threshold, "baseline": baseline.outcome,
               "sweep": [r.to_json() for r in sweep], "final": [r.to_json() for r in final],
               "seconds": round(time.perf_counter() - started, 1)}
    (plan.out / "lab.json").write_text(json.dumps(summary, indent=1))
    (plan.out / "lab.md").write_text(lab_markdown(summary))
    _pictures(ctx, plan, final, runner)
    say(f"[lab] done in {summary['seconds']} s: {plan.out / 'lab.md'}, {plan.out / 'lab.json'}, pictures")
    return summary


KIND_METHODS = ("concept", "concept:spatial", "concept:clamp")
"""The concept methods; the best of them (clean flips) is repeated with every other dictionary kind."""


def _kind_rows(ctx: Context, judge: Judge, plan: LabPlan, final: list[Row], runner: Runner,
               say: Callable[[str], None]) -> list[Row]:
    """The best concept method's setting with every other dictionary kind at the same sites."""
    best = max((r for r in final if r.method in KIND_METHODS), key=lambda r: r.outcome["clean_flip"], default=None)
    rows = []
    for kind in plan.kinds:
        if best is None or kind == "topk":
            continue
        row = measure(ctx, judge, best.method, [runner.site(name) for name in best.sites], kind, best.setting,
                      plan.targets, plan.seeds.evaluate, controls=plan.controls, control_seed=plan.seed)
        rows.append(row)
        say(f"[final] {best.method} ({kind}) {'+'.join(best.sites)} {best.setting.label()} {_rates(row.outcome)}  "
            f"controls: {_controls(row)}")
    return rows


def _rates(outcome: dict[str, float]) -> str:
    return (f"flip {outcome['flip']:.2f}  clean {outcome['clean']:.2f}  clean flip {outcome['clean_flip']:.2f}  "
            f"kept {outcome['kept']:.2f}")


def _controls(row: Row) -> str:
    return "; ".join(f"{name} flip {c['flip_mean']:.2f} mean / {c['flip_max']:.2f} max"
                     for name, c in row.controls.items()) or "none"


def lab_markdown(summary: dict[str, Any]) -> str:
    """The final table: one row per method (its best setting), flip / clean / clean flip, and the controls."""
    lines = [f"Targets: {', '.join(summary['targets'])}; unsteered: {_rates(summary['baseline'])}.", "",
             "| method | dictionary | site | setting | flip | clean | clean flip | clean flip: digits / animals "
             "| random features flip (mean / max) | random direction flip (mean / max) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in summary["final"]:
        window = "all steps" if row["window"] is None else f"{row['window'][0]:g}-{row['window'][1]:g}"
        cells = []
        for name in ("random features", "random direction"):
            c = row["controls"].get(name)
            cells.append("-" if c is None else f"{c['flip_mean']:.2f} / {c['flip_max']:.2f}")
        o, domains = row["outcome"], row.get("domains", {})
        split = " / ".join(f"{domains[d]['clean_flip']:.2f}" if d in domains else "-" for d in ("digits", "animals"))
        lines.append(f"| {row['method']} | {row['kind']} | {' + '.join(row['sites'])} | {row['strength']:g}, {window}, "
                     f"top {row['top_n']} | {o['flip']:.2f} | {o['clean']:.2f} | {o['clean_flip']:.2f} | {split} | "
                     f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines + [""] + sweep_markdown(summary["sweep"])) + "\n"


def sweep_markdown(sweep: Sequence[dict[str, Any]]) -> list[str]:
    """The sweep (trial seeds) as one table: per method and site, its best clean flip and the setting."""
    sites = list(dict.fromkeys("+".join(row["sites"]) for row in sweep))
    methods = list(dict.fromkeys(row["method"] for row in sweep))
    lines = ["Sweep on the trial seeds: per method and site, the best clean flip (flip, clean) and its strength and "
             "window.", "", "| method | " + " | ".join(sites) + " |", "| --- |" + " ---: |" * len(sites)]
    for method in methods:
        cells = []
        for site in sites:
            rows = [r for r in sweep if r["method"] == method and "+".join(r["sites"]) == site]
            if not rows:
                cells.append("-")
                continue
            best = max(rows, key=lambda r: (r["outcome"]["clean_flip"], -r["strength"]))
            window = "all" if best["window"] is None else f"{best['window'][0]:g}-{best['window'][1]:g}"
            o = best["outcome"]
            cells.append(f"{o['clean_flip']:.2f} ({o['flip']:.2f}, {o['clean']:.2f}) at {best['strength']:g}, {window}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _pictures(ctx: Context, plan: LabPlan, final: list[Row], runner: Runner) -> None:
    """One grid: for the first few targets, a source prompt unsteered and under each method's final setting."""
    from .grids import image_grid

    shown = plan.targets[:4]
    rows, labels = [], []
    for target in shown:
        source = domain_of(target)[0]
        seed = plan.seeds.evaluate[0]
        cells = [runner.generate([class_prompt(source)], [seed])]
        for row in final:
            if row.kind != "topk":
                continue
            r = recipe(ctx, row.method, target, [runner.site(s) for s in row.sites], row.kind, row.setting)
            cells.append(runner.generate([class_prompt(source)], [seed], site_functions=r.functions(row.setting.window)))
        rows.append(torch.cat(cells))
        labels.append(f"{CLASSES[source]} -> {CLASSES[target]}")
    columns = ["unsteered"] + [row.method for row in final if row.kind == "topk"]
    image_grid(torch.stack(rows), labels, columns, f"{plan.model}: steered to the target class").save(
        plan.out / "lab.png")
