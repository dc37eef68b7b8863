"""What a training run is told: the dictionary's shape and how to train it, declared once.

:class:`DictionaryConfig` is what the dictionary file's header needs to rebuild the dictionary (kind,
width, sparsity, input normalisation); :class:`TrainConfig` holds one and adds the optimiser, the
schedule, the data, ITDA's growth rule and the device. Every field carries its own docstring (meaning,
unit, why this default) and its allowed values (a declared tuple of choices, or bounds), and
:func:`options` reads both, so the command line (``python -m training train``) and the Train
Dictionary node build their flags and inputs from here instead of repeating them. Values are checked
when a config is built: a bad one is refused with a one-line message naming the option.
"""
from __future__ import annotations

import ast
import inspect
import math
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from functools import lru_cache
from numbers import Integral, Real
from typing import Any, Mapping, Union, get_args, get_origin, get_type_hints

import torch

from .errors import ConfigError
from .normalize import MODES

TRAINABLE_KINDS = ("topk", "batchtopk", "itda", "matryoshka_batchtopk")
"""The dictionary kinds :func:`~sae_core.train.train_dictionary` builds (others are only read from files)."""
B_DEC_INITS = ("geometric_median", "mean", "zeros")
"""Where an SAE's decoder bias starts."""
COMPUTE_DTYPES = ("float32", "bfloat16")
"""Precisions of the SAE encoder's matmul."""
INT_MAX = 2**63 - 1
"""The largest whole-number option: torch holds counts, steps and seeds in 64 bits."""


def spec(default: Any = MISSING, *, default_factory: Any = MISSING, choices: tuple[str, ...] | None = None,
         ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
         resumable: bool = False) -> Any:
    """A dataclass field with its allowed values: ``choices``, or bounds ``ge``/``gt`` (min) and ``le``/``lt`` (max).

    ``resumable``: the option may differ from the checkpoint's when a run resumes (schedule length,
    logging, device); any other difference means another run, which is refused."""
    metadata = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "resumable": resumable}
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass(frozen=True)
class Option:
    """One config field as a front end needs it (see :func:`options`)."""

    name: str
    type: type
    """``int``, ``float`` or ``str``; for a tuple field, its elements' type."""
    default: Any
    help: str
    """The field's docstring on one line."""
    owner: type
    """The dataclass that declares the field (:class:`DictionaryConfig` or :class:`TrainConfig`)."""
    choices: tuple[str, ...] | None = None
    """The allowed values of a choice field."""
    min: float | None = None
    """The smallest allowed value (of each element, for a tuple); None: no lower bound."""
    max: float | None = None
    """The largest allowed value; None: no upper bound."""
    min_open: bool = False
    """``min`` itself is not allowed (e.g. a learning rate must be above 0)."""
    max_open: bool = False
    """``max`` itself is not allowed."""
    optional: bool = False
    """``None`` is allowed: the value is then derived (the help says how)."""
    length: int | None = None
    """For a tuple field, its number of elements."""
    resumable: bool = False
    """The option may differ from the checkpoint's when a run resumes (see :func:`spec`)."""

    def check(self, value: Any) -> Any:
        """``value`` as stored (an int for a float, a list for a tuple), or a ConfigError naming the option."""
        if value is None and self.optional:
            return None
        if self.length is not None:
            if not isinstance(value, (tuple, list)) or len(value) != self.length:
                raise self._refuse(value, f"must be {self.length} numbers")
            return tuple(self._check_one(v, value) for v in value)
        return self._check_one(value, value)

    def _check_one(self, v: Any, whole: Any) -> Any:
        if self.choices is not None:
            if v not in self.choices:
                raise self._refuse(whole, f"must be one of {', '.join(self.choices)}")
            return v
        if self.type is str:
            if not isinstance(v, str) or not v:
                raise self._refuse(whole, "must be a non-empty string")
            return v
        if isinstance(v, bool) or not isinstance(v, Real):
            raise self._refuse(whole, f"must be a {'whole number' if self.type is int else 'number'}")
        if self.type is int:
            if not isinstance(v, Integral):
                raise self._refuse(whole, "must be a whole number")
            v = int(v)
            if v > INT_MAX:
                raise self._refuse(whole, f"must be at most {INT_MAX}")
        else:
            v = float(v)
            if not math.isfinite(v):
                raise self._refuse(whole, "must be a finite number")
        if self.min is not None and (v <= self.min if self.min_open else v < self.min):
            raise self._refuse(whole, f"must be {'above' if self.min_open else 'at least'} {self.min:g}")
        if self.max is not None and (v >= self.max if self.max_open else v > self.max):
            raise self._refuse(whole, f"must be {'below' if self.max_open else 'at most'} {self.max:g}")
        return v

    def _refuse(self, value: Any, problem: str) -> ConfigError:
        unset = "; leave it unset (None) for the default" if self.optional else ""
        return ConfigError(f"training option {self.name}={value!r}: {problem}{unset}")


@lru_cache(maxsize=None)
def options(cls: type) -> tuple[Option, ...]:
    """Every option of config class ``cls``, a nested config's in its place (TrainConfig: DictionaryConfig's first)."""
    hints = get_type_hints(cls)
    docs = _attribute_docs(cls)
    found: list[Option] = []
    for f in fields(cls):
        kind = hints[f.name]
        if is_dataclass(kind):
            found += options(kind)
            continue
        kind, optional = _strip_none(kind)
        length = None
        if get_origin(kind) is tuple:
            element_types = get_args(kind)
            kind, length = element_types[0], len(element_types)
        meta = f.metadata
        found.append(Option(
            name=f.name, type=kind, default=f.default, help=docs.get(f.name, ""), owner=cls,
            choices=meta.get("choices"), min=_first(meta.get("ge"), meta.get("gt")),
            max=_first(meta.get("le"), meta.get("lt")), min_open=meta.get("gt") is not None,
            max_open=meta.get("lt") is not None, optional=optional, length=length,
            resumable=meta.get("resumable", False),
        ))
    return tuple(found)


def _first(a: float | None, b: float | None) -> float | None:
    return a if a is not None else b


def _strip_none(kind: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; ``int`` -> ``(int, False)``."""
    if get_origin(kind) in (Union, types.UnionType):
        rest = [a for a in get_args(kind) if a is not type(None)]
        return rest[0], len(rest) < len(get_args(kind))
    return kind, False


@lru_cache(maxsize=None)
def _attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right under the field in ``cls``'s source, on one line.

    Without the source (an install of bytecode only) there is no help text; checks and defaults still work."""
    try:
        source = inspect.getsource(cls)
    except OSError:
        return {}
    tree = ast.parse(source.lstrip())
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _validate(config: Any) -> None:
    """Check (and normalise: ints to floats, lists to tuples) every direct field of ``config``."""
    for option in options(type(config)):
        if option.owner is type(config):
            object.__setattr__(config, option.name, option.check(getattr(config, option.name)))


@dataclass(frozen=True)
class DictionaryConfig:
    """The dictionary to build: what its file's header records to rebuild it."""

    kind: str = spec("topk", choices=TRAINABLE_KINDS)
    """Dictionary kind: 'topk' keeps the k largest latents of each token (Gao et al. 2024); 'batchtopk' keeps
    the batch's tokens x k largest while training and a learned threshold at inference (Bussmann et al.
    2024); 'itda' grows a dictionary of real activations with their provenance (Leask et al. 2025);
    'matryoshka_batchtopk' is a BatchTopK SAE trained to reconstruct from nested prefixes of its latents too
    (see matryoshka_levels), so the first latents carry the general features (Bussmann et al. 2025). Default
    'topk': the simplest to train, and its sparsity is exactly k."""
    k: int = spec(32, ge=1)
    """Active latents per token (TopK, BatchTopK), or the target L0 of ITDA's encoder; a count. Default 32:
    few enough that a token's code can be read feature by feature."""
    n_latents: int | None = spec(None, ge=1)
    """Dictionary width (number of latents) of a TopK/BatchTopK SAE. Unset: expansion_factor x d_in, the
    activation width, which only the data tells. ITDA ignores it: its dictionary grows up to max_atoms."""
    expansion_factor: int = spec(16, ge=1)
    """Latents per activation dimension when n_latents is unset. Default 16: 49152 latents on a 3072-wide
    Flux stream, which one GPU trains."""
    normalization: str = spec("scale", choices=MODES)
    """Input normalisation, stored with the dictionary so that encode takes and decode returns model-space
    activations: 'scale' (one scalar making the mean squared norm d_in), 'standardize' (per-dimension mean
    and std) or 'none'. Default 'scale': diffusion residual streams have huge outlier tokens and scales that
    differ by orders of magnitude between blocks, and one scalar tames that without changing the geometry."""
    matryoshka_levels: int = spec(5, ge=2)
    """matryoshka_batchtopk: how many nested prefixes of the latents training reconstructs from, each twice
    the size of the one before: n/2^(levels-1), ..., n/2, n for n latents (rounded down, so n must be at least
    2^(levels-1)). Other kinds ignore it. Default 5: n/16, n/8, n/4, n/2, n, a coarse level of a sixteenth of
    the latents and four refinements."""

    def __post_init__(self) -> None:
        _validate(self)
        if self.kind != "itda" and self.n_latents is not None and self.k > self.n_latents:
            raise ConfigError(f"training option k={self.k}: must be at most n_latents={self.n_latents}; "
                                  "lower k or widen the dictionary")
        if self.kind == "matryoshka_batchtopk" and self.n_latents is not None:
            geometric_prefixes(self.n_latents, self.matryoshka_levels)

    def width(self, d_in: int) -> int:
        """The number of latents of an SAE over ``d_in``-wide activations."""
        return self.n_latents or self.expansion_factor * d_in

    def prefixes(self, d_in: int) -> tuple[int, ...] | None:
        """The nested sizes of a Matryoshka SAE over ``d_in``-wide activations (None for the other kinds)."""
        if self.kind != "matryoshka_batchtopk":
            return None
        return geometric_prefixes(self.width(d_in), self.matryoshka_levels)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; saved in checkpoints and in the trained dictionary's header."""

    dictionary: DictionaryConfig = spec(default_factory=DictionaryConfig)
    """The dictionary to build (its kind, width, sparsity and normalisation)."""
    total_steps: int = spec(1000, ge=1, resumable=True)
    """Training steps, one batch each (ITDA: batches it grows from). May be raised when resuming, to train on.
    Default 1000: a short first run; dictionaries meant for use train for many more."""
    batch_size: int = spec(4096, ge=1)
    """Activation vectors per step when the data is one tensor (other sources bring their own batches, e.g.
    ShardReader's batch_size). Default 4096: the tokens of one 1024x1024 Flux image."""
    lr: float | None = spec(None, gt=0)
    """Adam's peak learning rate. Unset (None, or 0 in the ComfyUI node): 2e-4 / sqrt(n_latents / 2^14),
    Gao et al.'s scaling for TopK SAEs (wider dictionaries need smaller steps). ITDA does not use it."""
    betas: tuple[float, float] = spec((0.9, 0.999), ge=0, lt=1)
    """Adam's decay rates of the gradient's first and second moments. Default: PyTorch's and Adam's own."""
    warmup_steps: int | None = spec(None, ge=0, resumable=True)
    """Steps over which the learning rate rises linearly to its peak; 0: none. Unset: a tenth of total_steps,
    at least 1 and at most 100 (100 for the default 1000 steps), so a short run still reaches its peak
    rate. May change when resuming, because its default follows total_steps."""
    decay_fraction: float = spec(0.2, ge=0, le=1)
    """Final fraction of total_steps over which the learning rate falls linearly to 0; 0: no decay.
    Default 0.2: the last fifth of the run anneals."""
    grad_clip: float = spec(1.0, gt=0)
    """Largest global L2 norm of the gradient per step (larger ones are scaled down). Default 1.0: one
    outlier batch cannot undo what training learned."""
    auxk: int | None = spec(None, ge=0)
    """Dead latents in the AuxK loss, which trains them on what the live latents fail to reconstruct (Gao et
    al.); 0 disables it. Unset: half the activation width, d_in // 2, as Gao et al. suggest."""
    auxk_coef: float = spec(1 / 32, ge=0)
    """Weight of the AuxK loss against the reconstruction loss. Default 1/32, Gao et al.'s."""
    dead_tokens: int = spec(1_000_000, ge=1)
    """Tokens a latent may stay silent before it counts as dead (reported as dead_fraction, trained by AuxK).
    Default 1M: a tenth of Gao et al.'s 10M, for runs this much shorter."""
    threshold_momentum: float = spec(0.99, ge=0, lt=1)
    """BatchTopK: per-step decay of the running average that becomes the inference threshold (the batch's
    smallest kept activation). Default 0.99: an average over about the last 100 steps."""
    b_dec_init: str = spec("geometric_median", choices=B_DEC_INITS)
    """Where an SAE's decoder bias starts, computed on the init sample: 'geometric_median', 'mean' or
    'zeros'. Default 'geometric_median': robust to the outlier tokens that drag a mean (OpenAI and SDLens
    initialise so)."""
    loss_threshold: float = spec(0.3, gt=0)
    """ITDA: an input whose relative reconstruction error ||x - x_hat||^2 / ||x||^2 exceeds this becomes a
    new atom; stored in the dictionary's header. Lower: a larger, more exact dictionary. Default 0.3: a new
    atom only for an input that the atoms so far explain less than 70% of."""
    max_atoms: int = spec(50_000, ge=1)
    """ITDA: the dictionary stops growing at this many atoms; stored in its header. Default 50000 bounds the
    memory its encoder needs per token."""
    init_tokens: int = spec(16_384, ge=1)
    """Activation vectors used to fit the normalisation and the decoder bias before the first step (a seeded
    random subset of a tensor, else the first batches, which are then trained on as usual). Default 16384:
    four Flux images' tokens, enough for a stable mean and scale."""
    seed: int = spec(0)
    """Seed of the initial weights, the tensor's per-epoch shuffle and the init sample: the same seed on the
    same data gives the same dictionary."""
    log_every: int = spec(50, ge=1, resumable=True)
    """Steps between entries of the training history (loss, L0, dead fraction, learning rate). Default 50:
    twenty points on the default run's curve."""
    checkpoint_every: int = spec(500, ge=1, resumable=True)
    """Steps between checkpoints when a checkpoint directory is given (the last step always writes one).
    Default 500: a kill loses at most 500 steps while checkpoint writes stay rare."""
    device: str = spec("cpu", resumable=True)
    """Torch device to train on ('cpu', 'cuda', 'cuda:1', 'mps'). Default 'cpu' works everywhere; the
    command line and the node pass their accelerator."""
    compute_dtype: str = spec("float32", choices=COMPUTE_DTYPES)
    """Precision of the SAE encoder's matmul; weights and codes stay float32. 'bfloat16' halves encoder
    matmul time on GPUs; default 'float32' is exact on every device."""

    def __post_init__(self) -> None:
        if not isinstance(self.dictionary, DictionaryConfig):
            raise ConfigError(f"training option dictionary={self.dictionary!r}: must be a DictionaryConfig")
        _validate(self)
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ConfigError(f"training option device={self.device!r}: not a torch device ({err})") from err

    def warmup(self) -> int:
        """The warm-up length in steps: ``warmup_steps``, or when unset a tenth of the run, within 1..100."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(100, max(1, self.total_steps // 10))

    def lr_factor(self, step: int) -> float:
        """The learning rate at 0-based ``step`` as a fraction of the peak: linear warm-up, flat, linear decay."""
        warmup = self.warmup()
        if step < warmup:
            return (step + 1) / warmup
        decay_steps = int(self.total_steps * self.decay_fraction)
        decay_start = self.total_steps - decay_steps
        if decay_steps and step >= decay_start:
            return max(0.0, (self.total_steps - step) / decay_steps)
        return 1.0

    def peak_lr(self, n_latents: int) -> float:
        """``lr``, or when unset the default for an SAE of ``n_latents`` latents."""
        return self.lr or default_lr(n_latents)

    def flat(self) -> dict[str, Any]:
        """Every option by name, the dictionary's among them (the form the command line and the node use)."""
        values = asdict(self.dictionary)
        values.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "dictionary"})
        return values

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"dictionary": {...}, <training options>}``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """A config from :meth:`to_dict`'s form, or from the flat one that :meth:`flat` gives and that
        checkpoints and dictionary headers written before the split hold."""
        dictionary_names = {f.name for f in fields(DictionaryConfig)}
        known = dictionary_names | {f.name for f in fields(cls)} - {"dictionary"}
        if not isinstance(data, Mapping):
            raise ConfigError(f"a training config must be a table of options, not {type(data).__name__}")
        values = dict(data)
        nested = values.pop("dictionary", None)
        nested = {} if nested is None else nested
        if not isinstance(nested, Mapping):
            raise ConfigError(f"training option dictionary={nested!r}: must be a table of "
                                  + ", ".join(sorted(dictionary_names)))
        unknown = (set(values) - known) | (set(nested) - dictionary_names)
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(sorted(map(str, unknown)))}; "
                                  f"valid: {', '.join(sorted(known))}")
        shape = {name: values.pop(name) for name in dictionary_names & set(values)}
        twice = set(shape) & set(nested)
        if twice:
            raise ConfigError(f"training option(s) {', '.join(sorted(twice))} given twice, "
                                  "inside and outside 'dictionary'")
        return cls(dictionary=DictionaryConfig(**shape, **nested), **values)


def default_lr(n_latents: int) -> float:
    """Gao et al.'s scaling: larger dictionaries need smaller steps."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def geometric_prefixes(n_latents: int, levels: int) -> tuple[int, ...]:
    """``levels`` nested sizes, each half the next, the last ``n_latents``: n/2^(levels-1), ..., n/2, n."""
    if levels > n_latents.bit_length():  # n >> (levels - 1) would be 0: a prefix without latents
        raise ConfigError(f"training option matryoshka_levels={levels}: {levels} levels, each prefix half the next, "
                          f"need n_latents >= 2^{levels - 1} but it is {n_latents}; lower matryoshka_levels or "
                          "widen the dictionary")
    return tuple(n_latents >> j for j in reversed(range(levels)))

