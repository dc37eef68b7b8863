"""Sites of diffusers models, one adapter per family behind one interface.

    sites = available_sites(pipe.transformer)             # list[Site], extra["d"] = token width
    with attach(pipe.transformer, {site: fn}, context=SamplingState(pipe.scheduler)):
        pipe(...)                                          # fn(h, ctx) runs at the site on every call

``attach`` takes the denoiser (``pipe.transformer`` / ``pipe.unet``), not the pipeline.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Mapping

from torch import nn

from sae_core.errors import DictionaryError
from sae_core.intervention import SiteFunction
from sae_core.site import Site

from .base import Adapter, CallContext, ContextLike, ContextSource, ModelCall
from .flux import FluxAdapter
from .sampling import SamplingState
from .unet import UNetAdapter

ADAPTERS: tuple[Adapter, ...] = (FluxAdapter(), UNetAdapter())


def adapter_for(model: Any) -> Adapter:
    """The adapter for ``model``'s class; DictionaryError naming the supported classes otherwise."""
    for adapter in ADAPTERS:
        if adapter.handles(model):
            return adapter
    supported = ", ".join(name for adapter in ADAPTERS for name in adapter.model_classes)
    raise DictionaryError(f"unsupported model class {type(model).__name__}: supported are {supported} "
                          "(pass the pipeline's denoiser, pipe.transformer or pipe.unet)")


def available_sites(model: nn.Module) -> list[Site]:
    return adapter_for(model).available_sites(model)


def attach(model: nn.Module, site_functions: Mapping[Site, SiteFunction], *,
           context: ContextLike = None) -> AbstractContextManager[None]:
    """See :meth:`Adapter.attach`: run site functions during model calls, hooks gone on exit."""
    return adapter_for(model).attach(model, site_functions, context=context)


__all__ = ["ADAPTERS", "Adapter", "CallContext", "ContextLike", "ContextSource", "FluxAdapter", "ModelCall",
           "SamplingState", "UNetAdapter", "adapter_for", "attach", "available_sites"]
