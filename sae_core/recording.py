"""One recorder for every front end: the site function that keeps a site's tokens while a model runs.

Capture (ComfyUI's node and ``python -m training capture``), real-image capture, Record Features and
the atlas all record through :class:`Recorder`, so they agree on what a sample is, which tokens are
kept and how an unknown noise level is stored:

* the rows of a call map to the samples of the generation under way as ``row % len(sample_ids)``
  (batched guidance puts the uncond and cond halves in the order of the prompts), and only the
  prompt's rows are kept unless ``cond_only`` is off;
* a token subset (``tokens_per_image`` or ``token_fraction``) is drawn per call from a generator
  seeded by (seed, sample id, call of this generation): a sample keeps the same tokens whatever batch
  it was generated in, so a resumed capture equals an unbroken one;
* an unknown sigma is NaN (never 0.0, which is a real noise level);
* :func:`write_records` stores a generation's records sample by sample, so shards end on sample
  boundaries and a resumed capture never holds part of a sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .errors import ConfigError
from .shards import ActivationBuffer, ShardWriter
from .sites.context import SiteContext, prompt_rows
from .timesteps import Window, in_window, validate_window

KEEP = ("all", "first", "last")
POOLS = ("none", "mean")


class Record(NamedTuple):
    """What one model call left at the site."""

    acts: Tensor
    """(rows, tokens kept, d) float32 on the CPU."""
    rows: Tensor
    """(rows,) index of each row's sample in the generation's ``sample_ids``."""
    tokens: Tensor
    """(rows, tokens kept) token positions; -1 for a pooled vector."""
    sigma: float
    """Noise level of the call; NaN when the runtime could not tell."""
    progress: Optional[float]
    grid: Optional[tuple[int, int]]


@dataclass
class Recorder:
    """Site function that keeps the site's tokens of each call inside ``window`` (see the module docstring).

    ``keep``: "all" calls, only the "first" one in the window, or only the "last" one (what a
    picture of the finished sample needs). ``pool="mean"`` keeps one mean vector per row (Revelio).
    ``stream``: hand each call's record to this function instead of keeping it, so a long run
    holds no more than one call's tokens (capture to shards, running statistics).
    """

    window: Optional[Window] = None
    tokens_per_image: Optional[int] = None
    token_fraction: Optional[float] = None
    cond_only: bool = True
    seed: int = 0
    keep: str = "all"
    pool: str = "none"
    sample_ids: Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))
    stream: Optional[Callable[[Record], None]] = None
    records: list[Record] = field(default_factory=list)
    calls: int = 0

    def __post_init__(self) -> None:
        self.window = validate_window(self.window)
        if self.keep not in KEEP:
            raise ConfigError(f"keep={self.keep!r}: use one of {', '.join(KEEP)}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool={self.pool!r}: use one of {', '.join(POOLS)}")
        if self.tokens_per_image is not None and self.tokens_per_image < 1:
            raise ConfigError(f"tokens_per_image={self.tokens_per_image}: keep at least 1 token per image")
        if self.token_fraction is not None and not 0.0 < self.token_fraction <= 1.0:
            raise ConfigError(f"token_fraction={self.token_fraction}: use a share in (0, 1]")

    def begin(self, sample_ids: Union[Sequence[int], Tensor]) -> None:
        """Start a generation of these samples: earlier records and the call count are dropped."""
        self.sample_ids = torch.as_tensor(sample_ids, dtype=torch.long).reshape(-1)
        self.records, self.calls = [], 0

    def __call__(self, h: Tensor, ctx: SiteContext) -> Tensor:
        self.calls += 1
        if not in_window(ctx, self.window) or (self.keep == "first" and self.records):
            return h
        rows = prompt_rows(ctx, h.shape[0]) if self.cond_only else torch.arange(h.shape[0])
        if len(rows) == 0:
            return h
        x = h.detach()[rows.to(h.device)].float().cpu()
        tokens = torch.arange(h.shape[1]).expand(len(rows), -1)
        samples = rows % len(self.sample_ids)
        if self.pool == "mean":
            x, tokens = x.mean(dim=1, keepdim=True), torch.full((len(rows), 1), -1, dtype=torch.long)
        else:
            n = self._tokens_kept(h.shape[1])
            if n < h.shape[1]:
                tokens = torch.stack([self._subset(h.shape[1], n, int(self.sample_ids[s])) for s in samples])
                x = torch.gather(x, 1, tokens.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        sigma = float(ctx.sigma) if ctx.sigma is not None else math.nan
        record = Record(x, samples, tokens, sigma, ctx.progress, ctx.grid)
        if self.stream is not None:
            self.stream(record)
        elif self.keep == "last":
            self.records = [record]
        else:
            self.records.append(record)
        return h

    def _tokens_kept(self, n_tokens: int) -> int:
        if self.tokens_per_image is not None:
            return min(self.tokens_per_image, n_tokens)
        if self.token_fraction is not None:
            return min(max(1, round(self.token_fraction * n_tokens)), n_tokens)
        return n_tokens

    def _subset(self, n_tokens: int, n: int, sample: int) -> Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + sample) * 10_007 + self.calls)
        return torch.randperm(n_tokens, generator=gen)[:n].sort().values

    def take(self) -> list[Record]:
        """The generation's records; the recorder is empty afterwards."""
        records, self.records, self.calls = self.records, [], 0
        return records


def write_records(sink: Union[ShardWriter, ActivationBuffer], records: Sequence[Record], sample_ids: Tensor,
                  resume_from: int = 0) -> int:
    """Add a generation's records to shards or a memory buffer, sample by sample (every call of sample
    ``s``, then ``s + 1``, ...); samples below ``resume_from`` are already stored and skipped. Returns
    the number of vectors added."""
    if not records:
        return 0
    ids = torch.as_tensor(sample_ids, dtype=torch.long).reshape(-1)
    acts = torch.cat([r.acts.reshape(-1, r.acts.shape[-1]) for r in records])
    samples = torch.cat([ids[r.rows].repeat_interleave(r.tokens.shape[1]) for r in records])
    tokens = torch.cat([r.tokens.reshape(-1) for r in records])
    sigmas = torch.cat([torch.full((r.acts.shape[0] * r.acts.shape[1],), r.sigma) for r in records])
    order = torch.sort(samples, stable=True).indices
    acts, samples, tokens, sigmas = acts[order], samples[order], tokens[order], sigmas[order]
    add = sink.add if isinstance(sink, ShardWriter) else sink.append
    added = 0
    for sample in torch.unique(samples).tolist():
        if sample < resume_from:
            continue
        rows = samples == sample
        add(acts[rows], sample, tokens[rows], sigmas[rows])
        added += int(rows.sum())
    return added
