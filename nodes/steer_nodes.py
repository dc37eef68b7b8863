"""Steer: edit a site's activations along dictionary features while sampling (chains with other Steers)."""
from __future__ import annotations

from typing import Optional

import torch
from comfy_api.latest import io

from ..sae_core import MODES, Dictionary, Steer, UNITS, steer_function
from .adapters import patch_site
from .common import (CATEGORY, DICTIONARY, SIGMA_MAX, check_choices, mask_2d, parse_features, require_choices,
                     require_linked, sigma_range, site_input, window, window_inputs)


class SAESteer(io.ComfyNode):
    """A clone of MODEL whose sampling adds, clamps, ablates or swaps dictionary features at one site."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SAESteer",
            display_name="Steer",
            category=f"{CATEGORY}/steer",
            description=("Steers sampling along dictionary features at one site: add a feature, clamp it to a "
                         "value, ablate it or move one feature's activation onto another, in a part of sampling, "
                         "on the prompt's half of CFG, inside a mask. Chain several Steers; a zero strength "
                         "samples exactly as the unpatched model."),
            inputs=[
                io.Model.Input("model", tooltip="the model to steer (a patched clone is returned)"),
                DICTIONARY.Input("dictionary", tooltip="a dictionary trained on this site (Load/Train Dictionary)"),
                site_input("double_blocks.1:image"),
                io.Combo.Input("mode", options=list(MODES),
                               tooltip="add: add the feature's direction; clamp: set its activation to the strength; "
                                       "ablate: remove the strength's fraction of it; swap: move (source, target) "
                                       "pairs' activation from source to target"),
                io.String.Input("features", default="0",
                                tooltip="comma-separated feature ids (swap: source, target pairs)"),
                io.Float.Input("strength", default=0.1, min=-100.0, max=100.0, step=0.01,
                               tooltip="add: amount in units (token_norm 0.1 visibly changes the model organisms' "
                                       "pictures and keeps them clean; 0.5 turns them into texture); clamp: target "
                                       "activation in units; ablate, swap: the fraction 0..1 of the activation (1 = all); 0 "
                                       "leaves sampling untouched"),
                io.Combo.Input("units", options=list(UNITS),
                               tooltip="what strength 1 means: token_norm, the mean token norm along the feature's "
                                       "unit direction; mean_activation, the feature's mean activation when it "
                                       "fires; raw, one unit of activation"),
                *window_inputs(0.0, 1.0, "steer"),
                io.Boolean.Input("cond_only", default=True,
                                 tooltip="steer only the positive prompt's half of CFG (off: both halves)"),
                io.Mask.Input("mask", optional=True,
                              tooltip="where on the image to steer (weights 0..1, resized to the site's token grid)"),
                io.Boolean.Input("subtract_uncond", default=False, optional=True,
                                 tooltip="also subtract the edit from the negative prompt's half of CFG"),
                io.Float.Input("sigma_min", default=0.0, min=0.0, max=SIGMA_MAX, step=0.001, optional=True,
                               tooltip="steer only while the noise level sigma is at least this"),
                io.Float.Input("sigma_max", default=SIGMA_MAX, min=0.0, max=SIGMA_MAX, step=0.001, optional=True,
                               tooltip=f"steer only while sigma is at most this ({SIGMA_MAX:g}: no upper bound)"),
            ],
            outputs=[io.Model.Output(tooltip="the steered clone of the model")],
        )

    @classmethod
    def validate_inputs(cls, mode: Optional[str] = None, units: Optional[str] = None) -> bool | str:
        return check_choices(cls, mode=mode, units=units)

    @classmethod
    def execute(cls, model, dictionary, site: str, mode: str, features: str, strength: float, units: str,
                window_start: float, window_end: float, cond_only: bool, mask: Optional[torch.Tensor] = None,
                subtract_uncond: bool = False, sigma_min: float = 0.0, sigma_max: float = SIGMA_MAX) -> io.NodeOutput:
        require_choices(cls, mode=mode, units=units)
        require_linked(dictionary, Dictionary, "dictionary", "Load Dictionary or Train Dictionary")
        steer = Steer(parse_features(features), strength, mode=mode, units=units,
                      window=window(window_start, window_end), sigma_range=sigma_range(sigma_min, sigma_max),
                      cond_only=cond_only, subtract_uncond=subtract_uncond, mask=mask_2d(mask))
        patched, _ = patch_site(model, site, steer_function(dictionary, [steer]), width=dictionary.d_in)
        return io.NodeOutput(patched)
