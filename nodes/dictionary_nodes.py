"""Load Dictionary and Train Dictionary: a dictionary from ``models/sae``, the Hub, or captured shards."""
from __future__ import annotations

import os
import re

import torch

from ..sae_core import DictionaryError, ShardReader, TrainConfig, load_dictionary, save_dictionary, train_dictionary
from ..sae_core.plots import line_chart
from .common import CAPTURE, CATEGORY, DICTIONARY, describe, pil_to_image, sae_files, sae_save_dir

NONE = "(none)"


class SAELoadDictionary:
    """A dictionary file from ``models/sae``, or a Hugging Face id (``owner/repo/subfolder``) when one is typed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"dictionary": ([NONE] + sae_files(), {"tooltip": "a file in models/sae"})},
            "optional": {"hub_id": ("STRING", {"default": "", "tooltip": "hf://owner/repo/subfolder; overrides the file"})},
        }

    RETURN_TYPES = (DICTIONARY, "STRING")
    RETURN_NAMES = ("dictionary", "description")
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/dictionary"

    def load(self, dictionary, hub_id=""):
        import folder_paths

        if hub_id.strip():
            source = hub_id.strip()
        elif dictionary == NONE:
            raise DictionaryError("no dictionary chosen: pick a file from models/sae or type a Hub id")
        else:
            source = folder_paths.get_full_path_or_raise("sae", dictionary)
        sae = load_dictionary(source)
        return (sae, describe(sae))


class SAETrainDictionary:
    """Train a TopK / BatchTopK SAE or grow an ITDA dictionary on captured activation shards.

    Connect the sampler's LATENT to ``after`` so training waits for the capture to finish."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kind": (["topk", "batchtopk", "itda"],),
                "k": ("INT", {"default": 32, "min": 1, "max": 4096}),
                "expansion": ("INT", {"default": 16, "min": 1, "max": 256}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 10_000_000}),
                "lr": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-5,
                                 "tooltip": "0: the default for the dictionary size"}),
                "batch_size": ("INT", {"default": 4096, "min": 1, "max": 1 << 20}),
                "name": ("STRING", {"default": "my_dictionary"}),
            },
            "optional": {
                "capture": (CAPTURE,),
                "shards_folder": ("STRING", {"default": "", "tooltip": "a folder written by Capture Activations (relative: inside output/)"}),
                "after": ("LATENT", {"tooltip": "the sampler's output, so training runs after the capture"}),
            },
        }

    RETURN_TYPES = (DICTIONARY, "IMAGE", "STRING")
    RETURN_NAMES = ("dictionary", "loss_curve", "summary")
    FUNCTION = "train"
    CATEGORY = f"{CATEGORY}/dictionary"
    OUTPUT_NODE = True

    def train(self, kind, k, expansion, steps, lr, batch_size, name, capture=None, shards_folder="", after=None):
        import comfy.model_management
        import comfy.utils

        import folder_paths

        if capture is None and not shards_folder.strip():
            raise DictionaryError("no activations to train on: connect a capture or give a shards folder")
        if not re.fullmatch(r"[\w.-]+", name):
            raise DictionaryError(f"dictionary name {name!r}: use letters, digits, '.', '-' and '_' only")
        if capture is not None and capture.buffer is not None:
            data = capture.buffer.tensors()["activations"].float()
            if not len(data):
                raise DictionaryError("the memory capture is empty: connect the sampler's LATENT to 'after' so it runs first")
            site, batch = capture.site, min(batch_size, len(data))
        else:
            folder = capture.directory if capture is not None else \
                os.path.join(folder_paths.get_output_directory(), os.path.expanduser(shards_folder.strip()))
            probe = ShardReader(folder, batch_size=1, shuffle=False)
            data = ShardReader(folder, batch_size=min(batch_size, probe.n_tokens), shuffle=True)
            site, batch = data.site, data.batch_size
        device = str(comfy.model_management.get_torch_device())
        config = TrainConfig(kind=kind, k=k, expansion_factor=expansion, total_steps=steps, lr=lr or None,
                             batch_size=batch, log_every=max(1, steps // 100), device=device,
                             warmup_steps=min(100, steps // 10), checkpoint_every=steps + 1)
        bar = comfy.utils.ProgressBar(steps)
        with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
            result = train_dictionary(data, config, site=site,
                                      progress=lambda step, total, metrics: bar.update_absolute(step, total))
        sae = result.dictionary.cpu()
        save_dictionary(sae, os.path.join(sae_save_dir(), f"{name}.safetensors"))
        loss = "relative_loss" if kind == "itda" else "fvu"  # ITDA reports each input's relative error
        chart = line_chart({loss: [(m["step"], m[loss]) for m in result.history]}, f"{name}: training loss")
        final = result.history[-1] if result.history else {}
        summary = (f"{describe(sae)}; trained on {len(data) if torch.is_tensor(data) else data.n_tokens} captured vectors, "
                   f"{final.get('step', 0)} steps, final {loss} {final.get(loss, float('nan')):.4f}, "
                   f"{result.rejected_batches} batches with NaN/inf rejected; saved as {name}.safetensors")
        return {"ui": {"text": [summary]}, "result": (sae, pil_to_image(chart), summary)}
