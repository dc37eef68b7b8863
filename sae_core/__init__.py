"""Diffusion SAE's engine: sparse dictionaries over model activations.

A dictionary is an ``encode``/``decode`` pair plus a file format::

    from sae_core import DictionaryConfig, TrainConfig, train_dictionary, save_dictionary, load_dictionary

    result = train_dictionary(activations, TrainConfig(DictionaryConfig(kind="topk", k=32), total_steps=2000))
    sae = result.dictionary
    codes = sae.encode(activations[:8])        # SparseCodes(values, indices)
    recon = sae.decode(codes)                  # model space
    direction = sae.direction(123)             # model-space feature direction
    save_dictionary(sae, "my_site.safetensors")
    sae = load_dictionary("my_site.safetensors")   # or a SAELens/sparsify/SDLens folder, or a Hub id

This package imports neither ComfyUI nor diffusers.
"""
from .concepts import (Concept, ScheduledConcept, SpatialConcept, StepCodeMeter, clamp_steer_function,
                       concept_from_codes, concept_from_words, mean_codes, replace_steers, scheduled_concept_from_codes,
                       scheduled_concept_from_meters, spatial_concept_from_codes, spatial_steer_function)
from .config import DictionaryConfig, TrainConfig, options
from .dictionary import Dictionary
from .errors import (ConfigError, DictionaryError, InputError, SAEError, ScheduleError, ShardError, SiteError, SteerError,
                     TrainingError, WriteError)
from .fileformat import read_header, save_dictionary
from .foreign import export_saelens
from .itda import ITDA
from .kernels import SparseCodes
from .loading import check_site_width, load_dictionary
from .metrics import evaluate
from .normalize import Standardizer
from .recording import Record, Recorder, write_records
from .sae import SparseAutoencoder
from .shards import ActivationBuffer, ShardReader, ShardWriter
from .sites import Catalogue, Site, SiteContext, SiteFunction, call_context, prompt_rows, transformer_catalogue, unet_catalogue
from .steering import MODES, UNITS, Steer, steer_function
from .timesteps import in_window, schedule_progress, validate_sigma_range, validate_window
from .train import TrainResult, train_dictionary

__all__ = [
    # dictionaries and their files
    "Dictionary", "ITDA", "SparseAutoencoder", "SparseCodes", "Standardizer", "check_site_width", "evaluate",
    "export_saelens", "load_dictionary", "read_header", "save_dictionary",
    # training
    "DictionaryConfig", "TrainConfig", "TrainResult", "options", "train_dictionary",
    # activations
    "ActivationBuffer", "Record", "Recorder", "ShardReader", "ShardWriter", "write_records",
    # sites and when a site function acts
    "Catalogue", "Site", "SiteContext", "SiteFunction", "call_context", "in_window", "prompt_rows", "schedule_progress",
    "transformer_catalogue", "unet_catalogue", "validate_sigma_range", "validate_window",
    # steering
    "MODES", "UNITS", "Steer", "steer_function",
    # concepts: weighted sets of features
    "Concept", "SpatialConcept", "concept_from_codes", "concept_from_words", "mean_codes", "replace_steers",
    "spatial_concept_from_codes", "spatial_steer_function", "ScheduledConcept", "StepCodeMeter",
    "clamp_steer_function", "scheduled_concept_from_codes", "scheduled_concept_from_meters",
    # errors
    "ConfigError", "DictionaryError", "InputError", "SAEError", "ScheduleError", "ShardError", "SiteError", "SteerError",
    "TrainingError", "WriteError",
]
