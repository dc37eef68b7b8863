"""Record Features, Feature Heatmap, Top Features: which dictionary features fire where in a sample."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..sae_core import DictionaryError, check_site_width
from ..sae_core.intervention import SiteContext
from ..sae_core.timesteps import in_window
from .common import CATEGORY, DICTIONARY, RECORDING, SITE_HELP, pil_to_image, resolve_site, window


class Recording:
    """An ``SAE_RECORDING`` handle: dense feature activations ``(tokens, n_latents)`` of the first cond row
    at the last model call inside the window, and the token grid."""

    def __init__(self, dictionary, window: Optional[tuple[float, float]]):
        self.dictionary, self.window = dictionary, window
        self.activations: Optional[torch.Tensor] = None
        self.grid: Optional[tuple[int, int]] = None

    def record(self, h: torch.Tensor, ctx: SiteContext) -> torch.Tensor:
        if not in_window(ctx, self.window):
            return h
        row = 0
        if ctx.cond is not None:
            cond = torch.as_tensor(ctx.cond).reshape(-1).bool().cpu()
            if not bool(cond.any()):
                return h
            row = int(cond.nonzero()[0])
        with torch.no_grad():
            codes = self.dictionary.encode(h[row].detach().float().to(_device(self.dictionary)))
        dense = torch.zeros(h.shape[1], self.dictionary.n_latents)
        dense.scatter_add_(1, codes.indices.cpu().long(), codes.values.float().cpu())
        self.activations, self.grid = dense, ctx.grid
        return h

    def require(self) -> torch.Tensor:
        if self.activations is None:
            raise DictionaryError("the recording is empty: sample with the recording MODEL first (connect this "
                                  "node's image to the sampler's output) and check the window")
        return self.activations


def _device(module: torch.nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class SAERecordFeatures:
    """Patch MODEL so that sampling records which dictionary features fire on each token."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "dictionary": (DICTIONARY,),
                "site": ("STRING", {"default": "double_blocks.1:image", "tooltip": SITE_HELP}),
                "window_start": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "window_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
        }

    RETURN_TYPES = ("MODEL", RECORDING)
    RETURN_NAMES = ("model", "recording")
    FUNCTION = "patch"
    CATEGORY = f"{CATEGORY}/inspect"

    def patch(self, model, dictionary, site, window_start, window_end):
        adapter, where, width = resolve_site(model, site)
        check_site_width(dictionary, width, where.name)
        recording = Recording(dictionary, window(window_start, window_end))

        def record(h, ctx):
            return recording.record(h, ctx)

        return (adapter.patch(model, {where: record}), recording)


def feature_map(recording: Recording, feature: int) -> torch.Tensor:
    """``(rows, cols)`` map of one feature's activation, scaled to [0, 1]."""
    acts = recording.require()
    if not 0 <= feature < acts.shape[1]:
        raise DictionaryError(f"feature {feature} is out of range: this dictionary has {acts.shape[1]} latents")
    if recording.grid is None:
        raise DictionaryError("this site has no image grid (text tokens): a heatmap needs an image stream")
    values = acts[:, feature].reshape(recording.grid)
    return values / values.max() if values.max() > 0 else values


class SAEFeatureHeatmap:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "recording": (RECORDING,),
                             "feature": ("INT", {"default": 0, "min": 0, "max": 1 << 24}),
                             "opacity": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "overlay"
    CATEGORY = f"{CATEGORY}/inspect"

    def overlay(self, image, recording, feature, opacity):
        heat = feature_map(recording, feature)[None, None].float()
        heat = F.interpolate(heat, size=image.shape[1:3], mode="bilinear", align_corners=False)[0, 0]
        alpha = (opacity * heat.clamp(0, 1)).to(image)[None, :, :, None]
        red = torch.tensor([1.0, 0.0, 0.0]).to(image)
        return (image * (1 - alpha) + red * alpha,)


def bar_chart(labels: list[str], values: list[float], title: str) -> Image.Image:
    width, bar = 480, 22
    img = Image.new("RGB", (width, 40 + bar * len(labels)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title, fill="black")
    top = max(values, default=0) or 1.0
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 32 + i * bar
        draw.text((8, y + 4), label, fill="black")
        draw.rectangle([90, y + 2, 90 + int((width - 170) * value / top), y + bar - 4], fill="#d62728")
        draw.text((width - 74, y + 4), f"{value:.3g}", fill="black")
    return img


class SAETopFeatures:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "the sampled image: makes this run after sampling"}),
                             "recording": (RECORDING,), "n": ("INT", {"default": 10, "min": 1, "max": 256})}}

    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("features", "chart")
    FUNCTION = "top"
    CATEGORY = f"{CATEGORY}/inspect"

    def top(self, image, recording, n):
        acts = recording.require()
        mean = acts.mean(0)
        values, ids = mean.topk(min(n, acts.shape[1]))
        share = (acts[:, ids] > 0).float().mean(0)
        lines = [f"{int(i)}: mean {v:.4g}, fires on {s:.0%} of tokens" for i, v, s in zip(ids, values.tolist(), share.tolist())]
        chart = bar_chart([f"#{int(i)}" for i in ids], values.tolist(), "top features (mean activation)")
        return ("\n".join(lines), pil_to_image(chart))
