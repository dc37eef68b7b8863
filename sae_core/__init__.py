"""Diffusion SAE's engine: sparse dictionaries over model activations.

A dictionary is an ``encode``/``decode`` pair plus a file format::

    from sae_core import TrainConfig, train_dictionary, save_dictionary, load_dictionary

    result = train_dictionary(activations, TrainConfig(kind="topk", k=32, total_steps=2000))
    sae = result.dictionary
    codes = sae.encode(activations[:8])        # SparseCodes(values, indices)
    recon = sae.decode(codes)                  # model space
    direction = sae.direction(123)             # model-space feature direction
    save_dictionary(sae, "my_site.safetensors")
    sae = load_dictionary("my_site.safetensors")   # or a SAELens/sparsify/SDLens folder, or a Hub id

This package imports neither ComfyUI nor diffusers.
"""
from .errors import DictionaryError
from .fileformat import read_header, save_dictionary
from .foreign import export_saelens
from .itda import ITDA, gradient_pursuit
from .kernels import SparseCodes, sparse_decode
from .loading import check_site_width, load_dictionary
from .metrics import evaluate
from .normalize import Standardizer, fit_standardizer
from .sae import SparseAutoencoder
from .shards import ActivationBuffer, ShardReader, ShardWriter
from .site import Site
from .steering import Steer, steer_function
from .train import TrainConfig, TrainResult, train_dictionary

__all__ = [
    "ActivationBuffer", "DictionaryError", "ITDA", "ShardReader", "ShardWriter", "Site", "Steer", "SparseAutoencoder", "SparseCodes", "Standardizer", "TrainConfig",
    "TrainResult", "check_site_width", "evaluate", "export_saelens", "fit_standardizer", "gradient_pursuit",
    "load_dictionary", "read_header", "save_dictionary", "sparse_decode", "steer_function", "train_dictionary",
]
