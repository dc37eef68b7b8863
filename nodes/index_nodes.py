"""Build Feature Index: generate images for a list of prompts and index on which of them, where and when each
feature of a dictionary fires, beside the dictionary in ``models/sae`` (the feature browser reads it).

The index is the engine's (:mod:`sae_core.feature_index`), the same one ``python -m training atlas`` builds; this
node only generates with ComfyUI's own sampler, text encoder and VAE.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..sae_core import InputError, load_dictionary
from ..sae_core.feature_index import DictionaryIdentity, FeatureIndexBuilder, IndexProbe, index_folder_for, open_index
from ..sae_core.labels import label_index_by_words
from ..sae_core.loading import check_site_width
from .adapters import patch_site
from .common import CATEGORY, check_choices, pil_to_image, sae_files, sampling_inputs
from .routes import NotFound, dictionary_path

DEFAULT_PROMPTS = "\n".join(f"a handwritten {d}" for d in ("zero", "one", "two", "three", "seven")) + "\n" + \
    "\n".join(f"a {a}" for a in ("cat", "giraffe", "elephant"))
SHOWN = 8
"""Features whose strongest image the node shows when it is done."""


def prompt_lines(text: str) -> list[str]:
    prompts = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not prompts:
        raise InputError("prompts is empty: type one prompt per line")
    return prompts


def encode(clip: Any, text: str) -> list:
    if clip is None or not hasattr(clip, "tokenize"):
        raise InputError("clip is not a text encoder: connect a CLIP (Load Checkpoint, DualCLIPLoader, or Load "
                         "Model Organism's clip)")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def decoded_pixels(vae: Any, samples: torch.Tensor) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 of the sampled latents (the first frame of a video)."""
    images = vae.decode(samples)
    if images.ndim == 5:
        images = images[:, 0]
    return (images[..., :3].clamp(0, 1) * 255).round().byte().cpu().numpy()


def build_settings(prompts: list[str], negative: str, latent: torch.Tensor, **values: Any) -> dict[str, Any]:
    """What the images depend on: a resumed build must use the same, so the builder compares these."""
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    return {"prompts_sha256": digest, "n_prompts": len(prompts), "negative": negative,
            "latent_shape": list(latent.shape), **values}


class SAEBuildFeatureIndex(io.ComfyNode):
    """Generate one batch per prompt, read the dictionary's codes at the site, and write the feature index."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAEBuildFeatureIndex",
            display_name="Build Feature Index",
            category=f"{CATEGORY}/inspect",
            description=("Generates images for a list of prompts and indexes, for every feature of a models/sae "
                         "dictionary, its top images with heatmaps, how often and when it fires and its prompt "
                         "words; stored beside the dictionary (<name>.features) for the SAE features sidebar. "
                         "Resumes an interrupted build with the same settings."),
            inputs=[
                io.Model.Input("model", tooltip="the model the dictionary was trained on"),
                io.Clip.Input("clip", tooltip="the text encoder that encodes each prompt (the organism's: Load "
                                              "Model Organism's clip)"),
                io.Vae.Input("vae", tooltip="decodes the samples into the images the index shows"),
                io.Latent.Input("latent", tooltip="an empty latent: its size is the images' size, its batch the "
                                                  "images per prompt"),
                io.Combo.Input("dictionary", options=sae_files(),
                               tooltip="a dictionary file in models/sae; the index goes beside it"),
                io.String.Input("prompts", multiline=True, default=DEFAULT_PROMPTS,
                                tooltip="one prompt per line; their words are associated with the features"),
                io.String.Input("negative", default="", tooltip="the negative prompt of every generation"),
                io.String.Input("site", default="", tooltip="where to read the codes; empty: the site the "
                                                            "dictionary was trained on"),
                *sampling_inputs("the first prompt's noise seed; prompt i uses seed + i", "sampling steps per image"),
                io.Float.Input("at", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="the point of sampling (0 = first step, 1 = last) whose codes pick the top "
                                       "images and heatmaps; every step feeds the timestep profile"),
                io.Int.Input("top_m", default=8, min=1, max=64, tooltip="top images kept per feature"),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="replace an existing index built with other settings"),
            ],
            outputs=[io.String.Output(display_name="summary", tooltip="what was indexed, and where"),
                     io.Image.Output(display_name="top_features", tooltip="the strongest image of the most "
                                                                          "frequent features, heatmap overlaid")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dictionary: Optional[str] = None, sampler_name: Optional[str] = None,
                        scheduler: Optional[str] = None) -> bool | str:
        return check_choices(cls, dictionary=dictionary, sampler_name=sampler_name, scheduler=scheduler)

    @classmethod
    def execute(cls, model, clip, vae, latent, dictionary: str, prompts: str, negative: str, site: str, seed: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, at: float, top_m: int,
                overwrite: bool) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import comfy.utils

        path = dictionary_path_or_error(dictionary)
        sae = load_dictionary(path).to(comfy.model_management.get_torch_device())
        lines = prompt_lines(prompts)
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        batch = samples.shape[0]
        probe = IndexProbe(sae, at=at)
        patched, where = patch_site(model, site.strip() or sae.site.name, probe)
        check_site_width(sae, int(where.extra["d"]), where.name)
        settings = build_settings(lines, negative, samples, site=where.name, seed=seed, steps=steps, cfg=cfg,
                                  sampler=sampler_name, scheduler=scheduler, at=at)
        folder = index_folder_for(path)
        builder = FeatureIndexBuilder(folder, DictionaryIdentity.of(sae, path), top_m=top_m, source=settings,
                                      overwrite=overwrite)
        negative_cond = encode(clip, negative)
        bar = comfy.utils.ProgressBar(len(lines))
        first = builder.n_images // batch
        for i in range(first, len(lines)) if not builder.complete else ():
            comfy.model_management.throw_exception_if_processing_interrupted()
            probe.begin(batch)
            noise = comfy.sample.prepare_noise(samples, seed + i)
            out = comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, encode(clip, lines[i]),
                                      negative_cond, samples, seed=seed + i, disable_pbar=True)
            probe.feed(builder, decoded_pixels(vae, out), [lines[i]] * batch, seeds=[seed + i] * batch)
            builder.maybe_checkpoint()
            bar.update_absolute(i + 1, len(lines))
        if builder.complete:  # built before with these settings: reused as it is, labels included
            index = open_index(folder)
        else:
            index = builder.finish()
            label_index_by_words(index)
        summary = (f"indexed {index.n_latents} features of {dictionary} at {where.name} over "
                   f"{index.header['counts']['images']} images ({len(lines)} prompts x {batch}); "
                   f"stored in models/sae/{folder.name}; open the SAE features sidebar to browse it")
        shown = strongest_tiles(index)
        return io.NodeOutput(summary, shown, ui={**ui.PreviewText(summary).as_dict(),
                                                 **ui.PreviewImage(shown, cls=cls).as_dict()})


def dictionary_path_or_error(name: str):
    try:
        return dictionary_path(name)
    except NotFound as err:  # the routes' refusal, as the node's error type
        raise InputError(str(err)) from None


def strongest_tiles(index) -> torch.Tensor:
    """A row of the most frequent features' strongest images, same size each, as one IMAGE batch."""
    rows = [row for row in index.page(limit=SHOWN, sort="frequency")["features"] if row["thumbnail"]]
    tiles = [index.tile(row["id"], 0).convert("RGB") for row in rows]
    if not tiles:
        return torch.zeros(1, 64, 64, 3)
    size = tiles[0].size
    return torch.cat([pil_to_image(tile.resize(size)) for tile in tiles])
