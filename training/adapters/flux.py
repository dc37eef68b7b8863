"""Flux in diffusers (``FluxTransformer2DModel``): sites on the double and single transformer blocks.

Verified in diffusers 0.42.1, ``models/transformers/transformer_flux.py``:

* ``transformer_blocks[i]`` (FluxTransformerBlock) is called as ``block(hidden_states=image,
  encoder_hidden_states=text, temb=..., ...)`` and returns ``(encoder_hidden_states, hidden_states)``:
  TEXT first, IMAGE second.
* ``single_transformer_blocks[i]`` (FluxSingleTransformerBlock) also takes the two streams separately,
  concatenates ``cat([text, image], dim=1)`` inside, and returns them split again in the same order,
  ``(text, image)``: its image tokens are output[1], no slicing needed here.
* Under gradient checkpointing both are called positionally (hidden_states first); the hooks read either.
* ControlNet residuals are added after a block returns: a site sees the block's own output.

Sites (names as in ComfyUI's Flux, so dictionaries move between the two):
``double_blocks.{i}``: "image", "text", "update"; ``single_blocks.{i}``: "image", "update".
"update" is the image stream's block output minus its block input (SDLens's target).

Grid: FluxPipeline packs the (h, w) VAE latent into 2x2 patches, so the image tokens are an
(h/2, w/2) row-major grid and ``img_ids[:, 1:]`` holds each token's (row, col). The grid is read from
the ``img_ids`` of each call, so it is right for any resolution and for direct model calls, and it
is None when the ids are not one full row-major grid (e.g. Kontext's appended reference tokens).

Sigma: FluxPipeline passes ``timestep = t / 1000`` with ``t = sigma * 1000``
(FlowMatchEulerDiscreteScheduler), so the model's ``timestep`` input is the flow-matching sigma.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from sae_core.site import Site

from .base import Adapter, ModelCall, Tap, first_value, site_list

IMAGE, TEXT = 1, 0  # positions in both block kinds' (text, image) output tuples


def token_grid(img_ids: Optional[Tensor], tokens: int) -> Optional[tuple[int, int]]:
    """(rows, cols) when ``img_ids`` (tokens, 3) lays ``tokens`` image tokens out row-major; else None."""
    if img_ids is None or tokens == 0:
        return None
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # a batch dimension is deprecated but accepted
    if ids.shape[0] != tokens:
        return None
    pos = ids[:, 1:].detach().round().long().cpu()
    pos = pos - pos[0]
    cols = int(pos[:, 1].max()) + 1
    if tokens % cols:
        return None
    rows = tokens // cols
    expected = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    return (rows, cols) if torch.equal(pos, expected.reshape(-1, 2)) else None


class FluxAdapter(Adapter):
    model_classes = ("FluxTransformer2DModel",)

    def family(self, model: nn.Module) -> str:
        return "flux"

    def available_sites(self, model: nn.Module) -> list[Site]:
        d = int(model.inner_dim)
        names = []
        for i in range(len(model.transformer_blocks)):
            names += [(f"double_blocks.{i}", stream, d) for stream in ("image", "text", "update")]
        for i in range(len(model.single_transformer_blocks)):
            names += [(f"single_blocks.{i}", stream, d) for stream in ("image", "update")]
        return site_list("flux", names)

    def tap(self, model: nn.Module, site: Site) -> Tap:
        kind, index = site.block.split(".")
        blocks = model.transformer_blocks if kind == "double_blocks" else model.single_transformer_blocks
        module = blocks[int(index)]
        if site.stream == "text":
            return Tap(module, TEXT, "text")
        return Tap(module, IMAGE, "image", update=site.stream == "update")

    def model_call(self, model: nn.Module, arguments: Mapping[str, Any]) -> ModelCall:
        hidden = arguments["hidden_states"]
        timestep = first_value(arguments.get("timestep"))
        return ModelCall(batch=int(hidden.shape[0]), timestep=timestep, sigma=timestep,
                         grid=token_grid(arguments.get("img_ids"), int(hidden.shape[1])))
