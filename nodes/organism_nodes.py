"""The model organism's four ComfyUI nodes: load it into ComfyUI's own Flux or SD1.5 U-Net, encode a prompt
with its sentence encoder, an empty latent and the exact decoder.

The work (diffusers -> ComfyUI weight conversion, model classes, encoder, decoder) is in
``organism/comfy.py``. ``organism/`` is shared with the headless trainer; the plugin needs neither
``training/`` nor diffusers (tests/test_boundaries.py holds it to that).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from comfy_api.latest import io

from ..organism.comfy import (FAMILIES, OrganismCLIP, OrganismVAE, conditioning, empty_latent, latent_to_image,
                              load_organism, organism_family)
from ..organism.errors import OrganismError
from ..sae_core import InputError
from .common import CATEGORY, check_choices, require_choices

ORGANISM = f"{CATEGORY}/organism"
ORGANISM_FOLDER = "sae_organisms"
"""ComfyUI's ``models/sae_organisms``: where saved organisms (pipeline folders) are picked from by name."""


def register_organism_folder() -> None:
    """Make ``models/sae_organisms`` a ComfyUI model folder (cheap; safe to call more than once)."""
    import folder_paths

    if ORGANISM_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[ORGANISM_FOLDER] = (
            [os.path.join(folder_paths.models_dir, ORGANISM_FOLDER)], set())


def organism_folder(name: str) -> tuple[str, str]:
    """``(path, root)`` of organism folder ``name`` inside a registered ``models/sae_organisms`` folder; ``("",
    "")`` for the committed organism. A path (absolute, ``~``, ``..``) is refused: a server reads no other
    folder, and its errors name none."""
    import folder_paths

    name = str(name).strip()
    if not name:
        return "", ""
    parts = Path(name).parts
    if any(ord(c) < 32 for c in name):
        raise InputError(f"organism folder {name!r} holds control characters: type a folder name")
    if Path(name).is_absolute() or name.startswith(("~", "\\")) or ".." in parts or ":" in name:
        raise InputError(f"organism folder {name!r}: give the name of a folder inside models/{ORGANISM_FOLDER} (an "
                         "organism saved with save_pretrained), not a path; empty: the committed organism")
    for root in folder_paths.get_folder_paths(ORGANISM_FOLDER):
        base = Path(root).resolve()
        candidate = (base / name).resolve()
        if base in candidate.parents and candidate.is_dir():
            return str(candidate), str(base)
    raise InputError(f"no organism folder {name!r} in models/{ORGANISM_FOLDER}: save an organism there with "
                     "save_pretrained, or leave folder empty for the committed one")


@contextmanager
def organism_errors_as_input_errors(root: str = "") -> Iterator[None]:
    """The organism's errors, and a folder name the file system refuses (too long, ...), as the plugin's
    InputError: ComfyUI names an error by its class's module, and the organism package's module path is the
    plugin's folder on disk, while InputError reads ``diffusion_sae.InputError``. The server's ``root`` folder
    is named as ``models/sae_organisms`` in the message."""
    try:
        yield
    except OrganismError as err:
        message = str(err).replace(root, f"models/{ORGANISM_FOLDER}") if root else str(err)
        raise InputError(message) from err
    except OSError as err:
        raise InputError(f"the organism folder cannot be read ({err.strerror or type(err).__name__}): give a folder "
                         "saved with save_pretrained, or leave it empty for the committed one") from err


class SAELoadModelOrganism(io.ComfyNode):
    """The committed (or any saved) model organism as a ComfyUI MODEL."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAELoadModelOrganism",
            display_name="Load Model Organism",
            category=ORGANISM,
            description=("Loads a model organism (a small text-to-image model of 32x32 digits and animal "
                         "silhouettes) into ComfyUI's own Flux or SD1.5 U-Net, to try every node without "
                         "downloading a model."),
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES),
                               tooltip="flux: FLUX.1-style transformer (rectified flow); unet: SD1.5-style U-Net "
                                       "(epsilon)"),
                io.String.Input("folder", default="", optional=True,
                                tooltip="the name of a folder in models/sae_organisms holding an organism saved with "
                                        "save_pretrained; empty: the committed organism/weights/<family>"),
            ],
            outputs=[io.Model.Output(tooltip="the organism's denoiser as a ComfyUI MODEL"),
                     io.Clip.Output(tooltip="its sentence encoder as a CLIP: ComfyUI's CLIP Text Encode and Build "
                                            "Feature Index encode prompts with it"),
                     io.Vae.Output(tooltip="its exact 32x32 gray latent map as a VAE: VAE Decode / VAE Encode, "
                                           "Capture Activations from Images")],
        )

    @classmethod
    def validate_inputs(cls, family: Optional[str] = None) -> bool | str:
        return check_choices(cls, family=family)

    @classmethod
    def execute(cls, family: str, folder: str = "") -> io.NodeOutput:
        require_choices(cls, family=family)
        with organism_errors_as_input_errors():
            path, root = organism_folder(folder)
        with organism_errors_as_input_errors(root):
            return io.NodeOutput(load_organism(family, path), OrganismCLIP(), OrganismVAE())


class SAEOrganismTextEncode(io.ComfyNode):
    """A prompt -> the organism's CONDITIONING (its sentence encoder's 16 token states and pooled vector)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAEOrganismTextEncode",
            display_name="Organism Text Encode",
            category=ORGANISM,
            description=("Encodes a prompt with the organism's sentence encoder (all-MiniLM-L6-v2: 16 token states "
                         "and the pooled vector) into CONDITIONING for a KSampler."),
            inputs=[
                io.Model.Input("model", tooltip="the organism (Load Model Organism)"),
                io.String.Input("prompt", multiline=True, default="a handwritten seven",
                                tooltip="what to draw: a digit or an animal silhouette, in words"),
            ],
            outputs=[io.Conditioning.Output(tooltip="the prompt's conditioning")],
        )

    @classmethod
    def execute(cls, model, prompt: str) -> io.NodeOutput:
        if organism_family(model) is None:
            raise InputError("Organism Text Encode needs the MODEL from Load Model Organism (other models have "
                             "their own text encoders: use CLIPTextEncode)")
        return io.NodeOutput(conditioning(prompt))


class SAEEmptyOrganismLatent(io.ComfyNode):
    """Zeros of the organism's latent shape: (batch, 4, 16, 16), a 32x32 picture."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAEEmptyOrganismLatent",
            display_name="Empty Organism Latent",
            category=ORGANISM,
            description="An empty latent of the organism's shape (4 x 16 x 16: a 32x32 picture) to sample into.",
            inputs=[io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="how many pictures")],
            outputs=[io.Latent.Output(tooltip="zeros of shape (batch, 4, 16, 16)")],
        )

    @classmethod
    def execute(cls, batch_size: int) -> io.NodeOutput:
        return io.NodeOutput({"samples": empty_latent(batch_size)})


class SAEOrganismDecode(io.ComfyNode):
    """The organism's exact decoder: pixel_shuffle(2) of the latent, [-1, 1] -> [0, 1], gray -> RGB."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAEOrganismDecode",
            display_name="Organism Decode",
            category=ORGANISM,
            description="Turns the organism's latents into pictures (exactly: no VAE is involved), optionally enlarged.",
            inputs=[
                io.Latent.Input("samples", tooltip="the organism's sampled latents"),
                io.Int.Input("upscale", default=4, min=1, max=32,
                             tooltip="nearest-neighbour enlargement (1: 32x32)"),
            ],
            outputs=[io.Image.Output(tooltip="the pictures, gray as RGB")],
        )

    @classmethod
    def execute(cls, samples: dict[str, Any], upscale: int = 4) -> io.NodeOutput:
        latent = samples.get("samples") if isinstance(samples, dict) else None
        if not isinstance(latent, torch.Tensor):
            raise InputError("samples is not a LATENT: connect a KSampler's output")
        with organism_errors_as_input_errors():
            return io.NodeOutput(latent_to_image(latent, upscale))


NODES: list[type[io.ComfyNode]] = [SAELoadModelOrganism, SAEOrganismTextEncode, SAEEmptyOrganismLatent,
                                   SAEOrganismDecode]
