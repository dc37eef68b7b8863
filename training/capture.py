"""Capture: generate images from prompts and store the chosen sites' activations as shards.

One shard directory per site (``OUT/<block>-<stream>/``, see :class:`sae_core.ShardWriter`), each with
the run's settings in its manifest. Sample ``s`` is image ``s % images_per_prompt`` of prompt
``s // images_per_prompt``, drawn from noise seeded ``seed + s``, so any sample can be regenerated and a
rerun after a kill continues at the first sample not yet on disk, with the same images it would have
made. A capture whose settings differ from the directory's is refused rather than mixed in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from sae_core.errors import DictionaryError
from sae_core.intervention import SiteContext, cond_rows
from sae_core.shards import DTYPES, ShardWriter
from sae_core.site import Site
from sae_core.timesteps import in_window, validate_window

from .runner import Runner

log = logging.getLogger("training.capture")


def site_dir(out: Path, site: Site) -> Path:
    return out / site.name.replace(":", "-")


@dataclass
class CaptureSettings:
    """What makes two captures the same data: stored in each manifest and checked on resume."""

    model: str
    prompts: list[str]
    images_per_prompt: int = 1
    seed: int = 0
    steps: Optional[int] = None
    guidance: Optional[float] = None
    window: Optional[tuple[float, float]] = None
    tokens_per_image: Optional[int] = None
    cond_only: bool = True

    def manifest(self) -> dict[str, Any]:
        return {"capture": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}}

    @property
    def n_samples(self) -> int:
        return len(self.prompts) * self.images_per_prompt


@dataclass
class Recorder:
    """Site function that keeps the site's tokens of every call inside the window (cond rows by default).

    ``sample_ids`` are the samples of the generation under way; rows map to them as
    ``row % len(sample_ids)`` (batched guidance puts ``[uncond, cond]`` halves in the order of the
    prompts). With ``tokens_per_image`` a random subset of each row's tokens is kept per call, seeded
    by (seed, sample id, call of this generation): a sample keeps the same tokens whatever batch it
    is generated in, so a resumed capture equals an unbroken one.
    """

    window: Optional[tuple[float, float]]
    tokens_per_image: Optional[int]
    cond_only: bool
    seed: int
    sample_ids: Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))
    records: list[tuple[Tensor, Tensor, Tensor, float]] = field(default_factory=list)
    calls: int = 0

    def __call__(self, h: Tensor, ctx: SiteContext) -> Tensor:
        self.calls += 1
        if not in_window(ctx, self.window):
            return h
        rows = cond_rows(ctx, h.shape[0]) if self.cond_only else torch.arange(h.shape[0])
        x = h[rows].detach().float().cpu()
        tokens = torch.arange(h.shape[1]).expand(len(rows), -1)
        if self.tokens_per_image and self.tokens_per_image < h.shape[1]:
            samples = self.sample_ids[rows % len(self.sample_ids)].tolist()
            tokens = torch.stack([self._subset(h.shape[1], sample) for sample in samples])
            x = torch.gather(x, 1, tokens.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        sigma = float(ctx.sigma) if ctx.sigma is not None else float("nan")
        self.records.append((x, rows % len(self.sample_ids), tokens, sigma))
        return h

    def _subset(self, n_tokens: int, sample: int) -> Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + sample) * 10_007 + self.calls)
        return torch.randperm(n_tokens, generator=gen)[: self.tokens_per_image]

    def take(self) -> list[tuple[Tensor, Tensor, Tensor, float]]:
        records, self.records, self.calls = self.records, [], 0
        return records


def _check_settings(writer: ShardWriter, settings: dict[str, Any], where: Path) -> None:
    """A non-empty directory captured with other settings is refused: its data would be mixed."""
    previous = writer.extra.get("capture")
    if previous is not None and writer.n_tokens and previous != settings:
        changed = sorted(k for k in {**previous, **settings} if previous.get(k) != settings.get(k))
        raise DictionaryError(f"{where} holds a capture made with other settings ({', '.join(changed)} differ): "
                              "rerun with the same options to resume it, or capture into a new --out folder")


def _write_samples(writer: ShardWriter, records: list[tuple[Tensor, Tensor, Tensor, float]], ids: Tensor,
                   resume_from: int) -> None:
    """Add a batch's records sample by sample (every step of sample s, then s + 1, ...), so shards end
    on sample boundaries and a resumed capture never holds part of a sample."""
    if not records:
        return
    acts = torch.cat([x.reshape(-1, x.shape[-1]) for x, _, _, _ in records])
    samples = torch.cat([ids[rows].repeat_interleave(tokens.shape[1]) for _, rows, tokens, _ in records])
    tokens = torch.cat([tokens.reshape(-1) for _, _, tokens, _ in records])
    sigmas = torch.cat([torch.full((x.shape[0] * x.shape[1],), sigma) for x, _, _, sigma in records])
    order = torch.sort(samples, stable=True).indices
    acts, samples, tokens, sigmas = acts[order], samples[order], tokens[order], sigmas[order]
    for sample in torch.unique(samples).tolist():
        if sample < resume_from:
            continue  # already on disk from an earlier run
        rows = samples == sample
        writer.add(acts[rows], sample, tokens[rows], sigmas[rows])


def capture(runner: Runner, settings: CaptureSettings, sites: Sequence[Site], out: Path, *, batch_size: int = 8,
            shard_tokens: int = 65536, dtype: str = "float16", progress: bool = True) -> dict[str, Any]:
    """Run the capture (resuming whatever ``out`` holds); returns a summary with token counts per site."""
    if settings.images_per_prompt < 1:
        raise DictionaryError("images_per_prompt must be at least 1")
    if dtype not in DTYPES:
        raise DictionaryError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    window = validate_window(settings.window)
    writers: dict[Site, ShardWriter] = {}
    for site in sites:
        where = site_dir(out, site)
        writer = ShardWriter(where, site, shard_tokens=shard_tokens, dtype=DTYPES[dtype], whole_adds=True)
        _check_settings(writer, settings.manifest()["capture"], where)
        writer.extra.update(settings.manifest())
        writers[site] = writer
    resume_from = {site: w.next_sample_id for site, w in writers.items()}  # sites may stand at different samples
    start = min(resume_from.values())
    total = settings.n_samples
    if start:
        log.info("resuming the capture in %s at sample %d of %d", out, start, total)
    recorders = {site: Recorder(window, settings.tokens_per_image, settings.cond_only, settings.seed) for site in sites}
    bar = tqdm(total=total, initial=min(start, total), desc="capture", unit="image", disable=not progress)
    try:
        for first in range(start, total, batch_size):
            ids = list(range(first, min(first + batch_size, total)))
            prompts = [settings.prompts[s // settings.images_per_prompt] for s in ids]
            for recorder in recorders.values():
                recorder.sample_ids = torch.tensor(ids)
            runner.generate(prompts, [settings.seed + s for s in ids], steps=settings.steps,
                            guidance=settings.guidance, site_functions=recorders)
            for site, recorder in recorders.items():
                _write_samples(writers[site], recorder.take(), torch.tensor(ids), resume_from[site])
            bar.update(len(ids))
    finally:
        bar.close()
        for writer in writers.values():
            writer.close()
    summary = {site.name: {"directory": str(site_dir(out, site)), "tokens": writers[site].n_tokens} for site in sites}
    for site in sites:
        if not writers[site].n_tokens:
            raise DictionaryError(f"no activations were captured at {site.name}: is the window {settings.window} "
                                  "outside the sampling schedule?")
    return summary


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(folder: Path) -> list[Path]:
    """The folder's pictures in name order; a clear error when there is no folder or no picture."""
    if not folder.is_dir():
        raise DictionaryError(f"image folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DictionaryError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def capture_images(runner: Runner, folder: Path, sites: Sequence[Site], out: Path, *, levels: Sequence[float] = (0.5,),
                   prompt: str = "", seed: int = 0, shard_tokens: int = 65536, dtype: str = "float16",
                   progress: bool = True) -> dict[str, Any]:
    """Revelio's route: real images noised to each of ``levels`` (sampling progress of a 20-step schedule),
    one denoiser pass each, the sites' tokens stored with sample id = the image's index in name order."""
    files = image_files(folder)
    settings = {"capture": {"model": runner.name, "images": [p.name for p in files], "levels": list(levels),
                            "prompt": prompt, "seed": seed}}
    recorders = {site: Recorder(None, None, True, seed) for site in sites}
    writers = {}
    for site in sites:
        writer = ShardWriter(site_dir(out, site), site, shard_tokens=shard_tokens, dtype=DTYPES[dtype], whole_adds=True)
        _check_settings(writer, settings["capture"], site_dir(out, site))
        writer.extra.update(settings)
        writers[site] = writer
    resume_from = {site: w.next_sample_id for site, w in writers.items()}
    try:
        for index in tqdm(range(min(resume_from.values()), len(files)), desc="capture images", unit="image",
                          disable=not progress):
            image = runner.load_image(files[index])
            for recorder in recorders.values():
                recorder.sample_ids = torch.tensor([index])
            for level in levels:
                runner.denoise_once(image, prompt, level, seed + index, recorders)
            for site, recorder in recorders.items():
                _write_samples(writers[site], recorder.take(), torch.tensor([index]), resume_from[site])
    finally:
        for writer in writers.values():
            writer.close()
    return {site.name: {"directory": str(site_dir(out, site)), "tokens": writers[site].n_tokens} for site in sites}
