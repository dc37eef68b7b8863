"""Capture Activations: record a site's activations, into shards on disk or a bounded memory buffer,
while the graph's sampler runs."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from ..sae_core import ActivationBuffer, DictionaryError, ShardReader, ShardWriter, Site
from ..sae_core.intervention import SiteContext
from ..sae_core.timesteps import in_window
from .common import CAPTURE, CATEGORY, SITE_HELP, resolve_site, window

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Capture:
    """An ``SAE_CAPTURE`` handle: where the vectors go, and how many are there.

    With a ``directory`` they go to shards (each sampling run reopens the folder and appends, and
    :meth:`finish`, run when a sampling run ends, writes the last partial shard); with
    ``directory=None`` they go to a memory buffer of at most ``max_vectors``, which refuses an
    overflowing step with a clear error. :meth:`record` is the site function (it returns ``h``)."""

    def __init__(self, directory: Optional[Path], site: Site, fraction: float, cond_only: bool,
                 window: Optional[tuple[float, float]], dtype: torch.dtype, seed: int = 0, max_vectors: int = 0):
        self.directory, self.site, self.fraction, self.cond_only = directory, site, fraction, cond_only
        self.window, self.dtype = window, dtype
        self._generator = torch.Generator().manual_seed(seed)
        self._writer: Optional[ShardWriter] = None
        self.buffer = ActivationBuffer(max_vectors) if directory is None else None
        self._first_sample = 0

    def record(self, h: torch.Tensor, ctx: SiteContext) -> torch.Tensor:
        if not in_window(ctx, self.window):
            return h
        rows = torch.arange(h.shape[0])
        if self.cond_only and ctx.cond is not None:
            rows = rows[torch.as_tensor(ctx.cond).reshape(-1).bool().cpu()]
        if len(rows) == 0:
            return h
        n = max(1, round(self.fraction * h.shape[1]))
        tokens = torch.randperm(h.shape[1], generator=self._generator)[:n].sort().values
        acts = h.detach()[rows.to(h.device)][:, tokens.to(h.device)].float().cpu()
        if self.buffer is not None:
            sample = (self._first_sample + torch.arange(len(rows))).unsqueeze(1).expand(-1, n)
            self.buffer.append(acts, sample, tokens.expand(len(rows), -1), float(ctx.sigma or 0.0))
            return h
        if self._writer is None:
            self._writer = ShardWriter(self.directory, self.site, dtype=self.dtype)
            self._first_sample = self._writer.next_sample_id
        sample = (self._first_sample + torch.arange(len(rows))).unsqueeze(1).expand(-1, n)
        self._writer.add(acts, sample, tokens.expand(len(rows), -1), float(ctx.sigma or 0.0))
        return h

    def finish(self) -> None:
        if self._writer is not None:
            self._writer, writer = None, self._writer
            writer.close()

    @property
    def n_vectors(self) -> int:
        """Vectors captured so far (in memory, or in shards on disk plus any of a run still going)."""
        if self.buffer is not None:
            return len(self.buffer)
        if self._writer is not None:
            return self._writer.n_tokens
        try:
            return ShardReader(self.directory, batch_size=1, shuffle=False).n_tokens
        except DictionaryError:
            return 0

    def __repr__(self) -> str:
        return f"Capture({self.directory or 'memory'}, site={self.site}, vectors={self.n_vectors})"


class SAECaptureActivations:
    """Patch MODEL so that the sampler it goes to records one site's activations into
    ``output/<folder>`` (shards for Train Dictionary), or into memory when ``destination`` is
    "memory" (at most ``max_vectors``; nothing touches the disk)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "site": ("STRING", {"default": "double_blocks.1:image", "tooltip": SITE_HELP}),
                "window_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "window_end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "token_fraction": ("FLOAT", {"default": 1.0, "min": 0.001, "max": 1.0, "step": 0.001,
                                             "tooltip": "random share of each image's tokens to keep"}),
                "cond_only": ("BOOLEAN", {"default": True}),
                "folder": ("STRING", {"default": "sae_activations/run1", "tooltip": "inside ComfyUI's output folder"}),
                "dtype": (list(DTYPES),),
            },
            "optional": {
                "destination": (["shards", "memory"], {"tooltip": "memory: keep vectors in RAM, bounded by max_vectors"}),
                "max_vectors": ("INT", {"default": 1_000_000, "min": 1, "max": 2**31 - 1}),
            },
        }

    RETURN_TYPES = ("MODEL", CAPTURE)
    RETURN_NAMES = ("model", "capture")
    FUNCTION = "patch"
    CATEGORY = f"{CATEGORY}/capture"

    def patch(self, model, site, window_start, window_end, token_fraction, cond_only, folder, dtype,
              destination="shards", max_vectors=1_000_000):
        import comfy.patcher_extension
        import folder_paths

        adapter, where, _ = resolve_site(model, site)
        directory = None
        if destination == "shards":
            output = Path(folder_paths.get_output_directory()).resolve()
            directory = (output / folder.strip()).resolve()
            if not folder.strip() or output not in directory.parents:
                raise DictionaryError(f"capture folder {folder!r} must be a relative path inside ComfyUI's output folder")
        gate = window(window_start, window_end)
        capture = Capture(directory, dataclasses.replace(where, timestep_window=gate), token_fraction, cond_only,
                          gate, DTYPES[dtype], max_vectors=max_vectors)

        def record(h, ctx):
            return capture.record(h, ctx)

        def finish_after_sampling(executor, *args, **kwargs):
            try:
                return executor(*args, **kwargs)
            finally:
                capture.finish()

        patched = adapter.patch(model, {where: record})
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "diffusion_sae_capture",
                                     finish_after_sampling)
        return (patched, capture)
