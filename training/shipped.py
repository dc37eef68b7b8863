"""``python -m training organism-dictionaries``: the dictionaries the plugin ships for its model organisms.

One TopK SAE per organism, at the site its example workflows use, trained on its own captions, with its feature
index (and prompt-word labels) beside it: ``models/sae/<name>.safetensors`` and ``<name>.features/``. The plugin
registers that folder as a second ``models/sae``, so the examples and the feature browser work on a clean install
with nothing to download. Rerunning on a CPU rebuilds the same weights, index pages, images and labels (checked
2026-12-01); the files differ only in the training time the header records and the content hash covering it.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from organism.data import CLASSES, class_prompt, organism_data
from sae_core import DictionaryConfig, ShardReader, TrainConfig, save_dictionary, train_dictionary
from sae_core.feature_index import index_folder_for
from sae_core.labels import label_index_by_words

from .atlas_run import build_index
from .capture import CaptureSettings, capture, site_dir
from .runner import load_runner


@dataclass(frozen=True)
class Shipped:
    model: str
    site: str
    name: str


SHIPPED = (Shipped("organism-flux", "double_blocks.1:image", "organism_flux_db1_image"),
           Shipped("organism-unet", "output_blocks.3:residual", "organism_unet_ob3_residual"),
           Shipped("organism-unet", "context:text", "organism_unet_context_text"))
"""The third is the prompt's tokens of the U-Net organism: the site where its clamped concepts steer best."""
EXPANSION, K, STEPS = 8, 8, 2000
"""8x wide, 8 active, 2000 steps of 1024: the demo's recipe (held-out FVU 0.12 on the Flux organism)."""
CAPTIONS, INDEX_CAPTIONS = 240, 120


def build_shipped(out: Path, seed: int = 0, which: tuple[Shipped, ...] = SHIPPED) -> list[Path]:
    """Capture, train and index each shipped dictionary into ``out`` (the shipped ones: seed 0); returns the
    dictionary files."""
    captions = sorted(set(organism_data()[0].captions))
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    train_prompts = [captions[i] for i in order[:CAPTIONS]]
    index_prompts = [class_prompt(c) for c in range(len(CLASSES))] + \
        [captions[i] for i in order[CAPTIONS:CAPTIONS + INDEX_CAPTIONS]]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for item in which:
        runner = load_runner(item.model)
        site = runner.site(item.site)
        with tempfile.TemporaryDirectory() as scratch:
            acts = Path(scratch) / "activations"
            capture(runner, CaptureSettings(model=item.model, prompts=train_prompts, images_per_prompt=2, seed=seed),
                    [site], acts, shard_tokens=16384)
            config = TrainConfig(DictionaryConfig(kind="topk", k=K, n_latents=EXPANSION * int(site.extra["d"])),
                                 total_steps=STEPS, batch_size=1024, warmup_steps=50, seed=seed, dead_tokens=200_000)
            reader = ShardReader(site_dir(acts, site), batch_size=1024, seed=seed)
            dictionary = train_dictionary(reader, config, site=site).dictionary
        path = save_dictionary(dictionary, out / f"{item.name}.safetensors")
        folder = index_folder_for(path)
        shutil.rmtree(folder, ignore_errors=True)
        index = build_index(runner, dictionary, site, index_prompts, folder, images_per_prompt=2, seed=seed + 2000,
                            top_m=8, dictionary_path=path)
        label_index_by_words(index)
        written.append(path)
    return written
