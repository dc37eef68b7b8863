"""Sites: where in a model a dictionary reads and writes, for every family and both runtimes.

    catalogue = transformer_catalogue("flux", {"double_blocks": 19, "single_blocks": 38}, 3072)
    site = catalogue.resolve("transformer_blocks.18:image")   # diffusers' name -> double_blocks.18:image
    catalogue.module(site, "diffusers")                        # "transformer_blocks.18"

A runtime adapter reads a model's numbers, asks for its catalogue here, and only says where a site's
tensor is and how to patch it. Site functions get ``(batch, tokens, d)`` and a :class:`SiteContext`
that both runtimes build with :func:`call_context`.
"""
from .catalogue import CONTEXT, Block, Catalogue, block_sites, context_block, parse_site
from .context import SiteContext, SiteFunction, call_context, cond_from_chunks, first_float, prompt_rows
from .families import FAMILIES, BlockKind, Family, family, transformer_catalogue
from .site import STREAMS, Site
from .unet import REVELIO_BLOCKS, UNetShape, unet_catalogue

__all__ = [
    "CONTEXT", "Block", "BlockKind", "block_sites", "Catalogue", "FAMILIES", "Family", "REVELIO_BLOCKS", "STREAMS", "Site", "SiteContext",
    "SiteFunction", "UNetShape", "call_context", "cond_from_chunks", "context_block", "family", "first_float", "parse_site",
    "prompt_rows", "transformer_catalogue", "unet_catalogue",
]
