"""Diff-C Probe: where in the model, and when in sampling, the classes of a folder of labelled images are readable
(Revelio, Kim et al., ICCV 2025).

Each real image is VAE-encoded, noised with seeded noise to every chosen level and given to the model for ONE
pass with an empty prompt, as Capture Activations from Images does it (``comfy.sample.sample_custom`` with a
one-call sampler and cfg 1); the tokens of every chosen site are mean-pooled per image in that same pass. For each
(site, level) a light linear classifier (``sae_core.probe.probe_accuracy``) is fitted on a stratified share of
the images and scored on the rest; the accuracies come out as a heatmap and a markdown table.

A level is a point of sampling (0: the first step, the most noise; 1: the last), turned into a noise level by the
model's own ``percent_to_sigma``, the mapping ComfyUI's timestep ranges use, so it means the same on eps, v and
flow models. Images are read only from a folder inside ComfyUI's input folder, one subfolder per class.
"""
from __future__ import annotations

import math
import re
import reprlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from comfy_api.latest import io, ui
from torch import Tensor

from ..sae_core import InputError, Recorder, Site, SiteError
from ..sae_core.probe import ProbeTable, probe_accuracy, stratified_split
from ..sae_core.sites import block_sites
from .adapters import adapter_for
from .common import CATEGORY, pil_to_image
from .image_capture_nodes import _one_model_call, _zero_conditioning, check_conditioning, check_vae_fits

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""Files of a class folder that are read as images; any other file (a caption, a note) is skipped."""
FOLDER_HELP = "a folder inside ComfyUI's input folder with one subfolder of images per class, e.g. probe/animals"


@dataclass(frozen=True)
class LabelledImages:
    """The images of a class-per-subfolder folder: where each is, its class, and the one size they are read at."""

    classes: list[str]
    paths: list[Path]
    labels: Tensor
    """(images,) class ids: indices into ``classes``."""
    size: tuple[int, int]
    """(width, height): the most common size; other images are resized to it, so that they batch."""
    root: Path
    """ComfyUI's input folder, resolved: messages name files relative to it."""

    def named(self, path: Path) -> str:
        return f"input/{path.relative_to(self.root).as_posix()}"


def input_folder(folder: str) -> tuple[Path, Path]:
    """``(folder, input root)``, both resolved, for a folder input that a workflow may set to anything: only a
    relative path that stays inside ComfyUI's input folder (no absolute path, ``~`` or ``..``, nor a symlink out
    of it) is taken, and messages echo the value as typed, never the server's paths."""
    import folder_paths

    text = str(folder).strip()
    fix = f"give {FOLDER_HELP}"
    if not text:
        raise InputError(f"folder is empty: {fix}")
    if any(ord(c) < 32 for c in text):
        raise InputError(f"folder {reprlib.repr(folder)} holds control characters: {fix}")
    if Path(text).is_absolute() or text.startswith(("~", "\\")) or ".." in Path(text).parts:
        raise InputError(f"folder {reprlib.repr(folder)} is not a relative path inside ComfyUI's input folder: {fix}")
    root = Path(folder_paths.get_input_directory()).resolve()
    try:
        directory = (root / text).resolve()
        found = directory.is_dir()
    except (OSError, RuntimeError):  # a name the file system refuses (too long, ...), a symlink loop
        directory, found = root / text, False
    if root not in directory.parents:
        raise InputError(f"folder {reprlib.repr(folder)} leaves ComfyUI's input folder: {fix}")
    if not found:
        raise InputError(f"no folder {reprlib.repr(folder)} in ComfyUI's input folder: {fix}")
    return directory, root


def labelled_images(folder: str) -> LabelledImages:
    """The images of ``folder`` (inside input/), labelled by their subfolder; InputError for fewer than 2
    classes, a class with fewer than 2 images, an unreadable image, or a file that leads out of input/."""
    from PIL import Image

    directory, root = input_folder(folder)
    subfolders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes, paths, labels, sizes = [], [], [], []
    for subfolder in subfolders:
        files = sorted(p for p in subfolder.iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
        if not files:
            continue
        where = f"input/{(directory / subfolder.name).relative_to(root).as_posix()}"
        if len(files) < 2:
            raise InputError(f"class folder {where} holds 1 image: a train/test split needs at least 2 per class; "
                             "add images or remove the folder")
        for path in files:
            resolved = path.resolve()
            if root not in resolved.parents:
                raise InputError(f"{where}/{path.name} leads out of ComfyUI's input folder: copy the image in")
            try:
                with Image.open(resolved) as image:
                    sizes.append(image.size)
            except Exception as err:  # Pillow raises many types for a bad file; its messages hold server paths
                raise InputError(f"{where}/{path.name} is not a readable image ({type(err).__name__}): remove or "
                                 "replace it") from None
            paths.append(resolved)
            labels.append(len(classes))
        classes.append(subfolder.name)
    if len(classes) < 2:
        raise InputError(f"folder {reprlib.repr(folder)} holds {len(classes)} class folder(s) with images: the probe "
                         f"needs at least 2; {FOLDER_HELP}")
    size = Counter(sizes).most_common(1)[0][0]
    return LabelledImages(classes, paths, torch.tensor(labels), size, root)


def load_images(data: LabelledImages, index: Sequence[int]) -> Tensor:
    """The images at ``index`` as a ComfyUI IMAGE ``(batch, H, W, 3)`` in [0, 1], each at ``data.size``."""
    from PIL import Image, ImageOps

    pictures = []
    for i in index:
        path = data.paths[i]
        try:
            with Image.open(path) as image:
                picture = ImageOps.exif_transpose(image).convert("RGB")
        except Exception as err:  # see labelled_images: a file that only fails when decoded (truncated)
            raise InputError(f"{data.named(path)} is not a readable image ({type(err).__name__}): remove or replace "
                             "it") from None
        if picture.size != data.size:
            picture = picture.resize(data.size, Image.Resampling.BICUBIC)
        pictures.append(np.asarray(picture, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(pictures))


def chosen_sites(model, text: str) -> list[Site]:
    """The sites named in ``text`` (comma-separated, any runtime's naming), or every site of the model for
    "all"; an unknown site is the adapter's SiteError, which lists the model's sites."""
    adapter = adapter_for(model)
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise InputError("sites is empty: type comma-separated sites, e.g. double_blocks.0:image, "
                         "single_blocks.1:image, or all")
    if [name.lower() for name in names] == ["all"]:
        return block_sites(adapter.available_sites(model))
    return list(dict.fromkeys(adapter.resolve(model, name) for name in names))


def parse_levels(text: str) -> list[float]:
    """``"0.1, 0.5 0.9"`` -> ``[0.1, 0.5, 0.9]`` (sorted, each once); InputError for a value outside [0, 1]."""
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    fix = "give points of sampling from 0 (the first step, most noise) to 1 (the last), e.g. 0.1, 0.5, 0.9"
    if not parts:
        raise InputError(f"levels is empty: {fix}")
    levels = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"level {reprlib.repr(part)} is not a number: {fix}") from None
        if not 0.0 <= value <= 1.0:  # NaN too
            raise InputError(f"level {reprlib.repr(part)} is outside 0..1: {fix}")
        levels.append(value)
    return sorted(set(levels))


def level_sigma(model, level: float) -> float:
    """The noise level at ``level`` of sampling: ComfyUI's ``percent_to_sigma``, kept inside the model's sigma
    range (at 0 and 1 it returns markers, not sigmas)."""
    sampling = model.get_model_object("model_sampling")
    sigma = float(sampling.percent_to_sigma(float(level)))
    return min(max(sigma, float(sampling.sigma_min)), float(sampling.sigma_max))


def encode_all(vae, data: LabelledImages, batch_size: int, step: Callable[[], None]) -> Tensor:
    """Every image's latent, encoded ``batch_size`` at a time (the pixels of one batch in memory at once)."""
    latents = []
    for start in range(0, len(data.paths), batch_size):
        latents.append(vae.encode(load_images(data, range(start, min(start + batch_size, len(data.paths)))))
                       .detach().float().cpu())
        step()
    return torch.cat(latents)


def pooled_activations(model, sites: list[Site], latents: Tensor, noise: Tensor, sigma: float, positive,
                       batch_size: int, seed: int, step: Callable[[], None]) -> dict[Site, Tensor]:
    """``{site: (images, width)}``: each site's tokens mean-pooled per image, all sites recorded in the same single
    pass of each batch of images noised to ``sigma``."""
    import comfy.sample
    import comfy.samplers

    recorders = {site: Recorder(pool="mean", keep="last") for site in sites}
    patched = adapter_for(model).patch(model, recorders)
    sampler = comfy.samplers.KSAMPLER(_one_model_call)
    sigmas = torch.tensor([float(sigma), 0.0])
    kept: dict[Site, list[Tensor]] = {site: [] for site in sites}
    for start in range(0, latents.shape[0], batch_size):
        rows = slice(start, min(start + batch_size, latents.shape[0]))
        n = rows.stop - rows.start
        for recorder in recorders.values():
            recorder.begin(range(n))
        comfy.sample.sample_custom(patched, noise[rows], 1.0, sampler, sigmas, positive, positive, latents[rows],
                                   disable_pbar=True, seed=int(seed))
        for site, recorder in recorders.items():
            records = recorder.take()
            if not records:
                raise SiteError(f"site {site.name} did not run during the model pass")
            vectors = torch.zeros(n, records[0].acts.shape[-1])
            vectors[records[0].rows] = records[0].acts[:, 0]
            kept[site].append(vectors)
        step()
    return {site: torch.cat(parts) for site, parts in kept.items()}


def chance_level(labels: Tensor) -> float:
    """Accuracy of always answering the most common class of ``labels`` (the test set's)."""
    return float(torch.bincount(labels).max()) / len(labels)


class SAEDiffCProbe(io.ComfyNode):
    """Labelled real images -> one noised pass per level -> class accuracy per (site, level)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAEDiffCProbe",
            display_name="Diff-C Probe",
            category=f"{CATEGORY}/inspect",
            description=("Where do the model's semantics live? (Revelio's Diff-C) Real images of a folder in "
                         "ComfyUI's input folder, one subfolder per class named by it (input/probe/animals/cat/"
                         "*.png, input/probe/animals/dog/*.png: at least 2 classes of at least 2 images), are "
                         "noised to each level and passed once through the model with an "
                         "empty prompt; a light linear classifier is trained on the pooled activations of each "
                         "site at each level and tested on held-out images. Shows the test accuracies as a "
                         "heatmap and a table (chance is noted beside them)."),
            inputs=[
                io.Model.Input("model", tooltip="the model to probe (left unchanged)"),
                io.Vae.Input("vae", tooltip="the model's VAE, to encode the images into latents"),
                io.String.Input("folder", default="probe/classes",
                                tooltip=f"{FOLDER_HELP}; the subfolder names are the class names (at least 2 "
                                        "classes of at least 2 images; images of another size are resized to the "
                                        "most common one)"),
                io.String.Input("sites", default="all",
                                tooltip="comma-separated sites to probe, e.g. double_blocks.0:image, "
                                        "output_blocks.1:residual; all: every block's site of the model (one pass records "
                                        "them all; not context:text, the prompt's tokens, the same for every image)"),
                io.String.Input("levels", default="0.1, 0.3, 0.5, 0.7, 0.9",
                                tooltip="comma-separated points of sampling the images are noised to: 0 the first "
                                        "step (most noise), 1 the last"),
                io.Float.Input("test_fraction", default=0.5, min=0.05, max=0.95, step=0.05,
                               tooltip="share of each class's images held out to test the classifier on"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="seed of the noise, of the train/test split and of the classifier"),
                io.Int.Input("batch_size", default=16, min=1, max=4096,
                             tooltip="images per model pass (lower it if memory runs out)"),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="the prompt of the passes; Revelio uses an empty one: "
                                              "CLIPTextEncode(\"\") (unconnected: zero text tokens)"),
            ],
            outputs=[io.Image.Output(display_name="heatmap", tooltip="test accuracy per site (rows) and level "
                                                                     "(columns)"),
                     io.String.Output(display_name="table", tooltip="the accuracies as a markdown table, with "
                                                                    "chance and the image counts")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, vae, folder: str, sites: str, levels: str, test_fraction: float, seed: int,
                batch_size: int, positive=None) -> io.NodeOutput:
        import comfy.sample
        import comfy.utils

        if not (math.isfinite(test_fraction) and 0.0 < test_fraction < 1.0):
            raise InputError(f"test_fraction {test_fraction}: use a share strictly between 0 and 1, e.g. 0.5")
        if int(batch_size) < 1:
            raise InputError(f"batch_size {batch_size}: use at least 1")
        data = labelled_images(folder)
        chosen = chosen_sites(model, sites)
        points = parse_levels(levels)
        sigmas = [level_sigma(model, level) for level in points]
        if positive is None:
            positive = _zero_conditioning(model)
        check_conditioning(positive, model)
        check_vae_fits(vae, model, load_images(data, [0]))
        train, test = stratified_split(data.labels, float(test_fraction), int(seed))

        n, batch = len(data.paths), int(batch_size)
        batches = math.ceil(n / batch)
        bar = comfy.utils.ProgressBar(batches * (1 + len(points)) + len(chosen) * len(points))
        latents = encode_all(vae, data, batch, lambda: bar.update(1))
        noise = comfy.sample.prepare_noise(latents, int(seed))  # one seeded draw per image, the same at every level
        features = {level: pooled_activations(model, chosen, latents, noise, sigma, positive, batch, int(seed),
                                              lambda: bar.update(1))
                    for level, sigma in zip(points, sigmas)}
        accuracy = [[0.0] * len(points) for _ in chosen]
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; the classifier needs gradients
            for row, site in enumerate(chosen):
                for col, level in enumerate(points):
                    x = features[level][site].clone()
                    accuracy[row][col] = probe_accuracy(x[train], data.labels[train], x[test], data.labels[test],
                                                        len(data.classes), seed=int(seed))
                    bar.update(1)
        table = ProbeTable([site.name for site in chosen], points, torch.tensor(accuracy),
                           chance_level(data.labels[test]), len(train), len(test))
        best_site, best_level, best = table.best()
        text = (f"Diff-C probe of input/{str(folder).strip()}: {n} images of {len(data.classes)} classes "
                f"({', '.join(data.classes)}); best {best_site} at level {best_level:g} ({best:.3f}).\n\n"
                + table.markdown())
        heatmap = pil_to_image(table.heatmap(f"Diff-C: input/{str(folder).strip()}"))
        return io.NodeOutput(heatmap, text, ui={**ui.PreviewText(text).as_dict(),
                                                **ui.PreviewImage(heatmap, cls=cls).as_dict()})
