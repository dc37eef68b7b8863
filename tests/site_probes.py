"""A probe site function shared by the adapter tests of both runtimes."""
from __future__ import annotations


class Recorder:
    """A site function that keeps a copy of what it sees (tokens and context) and returns its input unchanged."""

    def __init__(self):
        self.h, self.ctx = [], []

    def __call__(self, h, ctx):
        self.h.append(h.detach().clone())
        self.ctx.append(ctx)
        return h

    @property
    def calls(self) -> list:
        """``[(tokens, ctx), ...]``, one per call."""
        return list(zip(self.h, self.ctx))
