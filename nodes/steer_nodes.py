"""Steer: edit a site's activations along dictionary features while sampling (chains with other Steers)."""
from __future__ import annotations

from ..sae_core import Steer, check_site_width, steer_function
from ..sae_core.steering import MODES, UNITS
from .common import CATEGORY, DICTIONARY, SIGMA_MAX, SITE_HELP, mask_2d, parse_features, resolve_site, sigma_range, window


class SAESteer:
    """Add, clamp or ablate dictionary features at one site; everything is checked before sampling."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "dictionary": (DICTIONARY,),
                "site": ("STRING", {"default": "double_blocks.1:image", "tooltip": SITE_HELP}),
                "mode": (list(MODES), {"tooltip": "swap takes (source, target) feature pairs"}),
                "features": ("STRING", {"default": "0", "tooltip": "comma-separated feature ids"}),
                "strength": ("FLOAT", {"default": 0.5, "min": -100.0, "max": 100.0, "step": 0.01}),
                "units": (list(UNITS),),
                "window_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "window_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "cond_only": ("BOOLEAN", {"default": True}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "where on the image to steer"}),
                "subtract_uncond": ("BOOLEAN", {"default": False, "tooltip": "also subtract the edit from the uncond half (CFG)"}),
                "sigma_min": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e4, "step": 0.001,
                                        "tooltip": "act only while sigma is in [sigma_min, sigma_max]"}),
                "sigma_max": ("FLOAT", {"default": SIGMA_MAX, "min": 0.0, "max": SIGMA_MAX, "step": 0.001}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = f"{CATEGORY}/steer"

    def patch(self, model, dictionary, site, mode, features, strength, units, window_start, window_end,
              cond_only, mask=None, subtract_uncond=False, sigma_min=0.0, sigma_max=SIGMA_MAX):
        adapter, where, width = resolve_site(model, site)
        check_site_width(dictionary, width, where.name)
        steer = Steer(parse_features(features), strength, mode=mode, units=units,
                      window=window(window_start, window_end), sigma_range=sigma_range(sigma_min, sigma_max),
                      cond_only=cond_only, subtract_uncond=subtract_uncond, mask=mask_2d(mask))
        return (adapter.patch(model, {where: steer_function(dictionary, [steer])}),)
