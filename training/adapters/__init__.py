"""Sites of diffusers models, one adapter per group of model classes behind one interface.

    site = resolve_site(pipe.transformer, "double_blocks.1:image")   # or diffusers' "transformer_blocks.1:image"
    sites = available_sites(pipe.transformer)                       # list[Site], extra["d"] = token width
    with attach(pipe.transformer, {site: fn}, context=SamplingState(pipe.scheduler)):
        pipe(...)                                                   # fn(h, ctx) runs at the site on every call

``attach`` takes the denoiser (``pipe.transformer`` / ``pipe.unet``), not the pipeline. Every name a
user or a dictionary file gives is turned into a site by :func:`resolve_site` (the model's catalogue
from :mod:`sae_core.sites`), so both runtimes' names and the old ones resolve the same way.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Mapping, Union

from torch import nn

from sae_core import Catalogue, Site, SiteError, SiteFunction

from .base import Adapter, ContextLike, ContextSource, ModelCall, Span, Tap
from .sampling import SamplingState
from .transformers import TransformerAdapter
from .unet import UNetAdapter

ADAPTERS: tuple[Adapter, ...] = (TransformerAdapter(), UNetAdapter())


def adapter_for(model: Any) -> Adapter:
    """The adapter for ``model``'s class; SiteError naming the supported classes otherwise."""
    for adapter in ADAPTERS:
        if adapter.handles(model):
            return adapter
    supported = ", ".join(name for adapter in ADAPTERS for name in adapter.model_classes)
    raise SiteError(f"unsupported model class {type(model).__name__}: supported are {supported} "
                    "(pass the pipeline's denoiser, pipe.transformer or pipe.unet)")


def catalogue(model: nn.Module) -> Catalogue:
    """Every site of ``model`` and both runtimes' names for its blocks."""
    return adapter_for(model).catalogue(model)


def available_sites(model: nn.Module) -> list[Site]:
    return adapter_for(model).available_sites(model)


def resolve_site(model: nn.Module, name: Union[Site, str]) -> Site:
    """The one way a name becomes a site: ``model``'s own site for ``name`` (either runtime's naming, old
    names, or a dictionary's Site); SiteError listing the model's sites otherwise."""
    return adapter_for(model).resolve(model, name)


def attach(model: nn.Module, site_functions: Mapping[Union[Site, str], SiteFunction], *,
           context: ContextLike = None) -> AbstractContextManager[None]:
    """See :meth:`Adapter.attach`: run site functions during model calls, hooks gone on exit."""
    return adapter_for(model).attach(model, site_functions, context=context)


__all__ = ["ADAPTERS", "Adapter", "ContextLike", "ContextSource", "ModelCall", "SamplingState", "Span", "Tap",
           "TransformerAdapter", "UNetAdapter", "adapter_for", "attach", "available_sites", "catalogue",
           "resolve_site"]
