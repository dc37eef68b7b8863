"""``python -m training``: the headless trainer's command line.

    python -m training capture --model organism-flux --prompts prompts.txt --sites double_blocks.1:image --out runs/acts
    python -m training train --shards runs/acts/double_blocks.1-image --kind topk --k 16 --out runs/topk.safetensors
    python -m training eval --dictionary runs/topk.safetensors --model organism-flux --prompts prompts.txt --out runs/eval
    python -m training atlas --dictionary runs/topk.safetensors --model organism-flux --prompts prompts.txt --out runs/atlas
    python -m training steer --dictionary runs/topk.safetensors --model organism-flux --prompt "a handwritten two" \\
        --features 3 17 --strengths 0 0.5 1 --windows 0-1 0-0.3 --out runs/steer.png
    python -m training demo          # the whole loop on the model organism, with steering figures

Every subcommand takes ``--config FILE`` (TOML or JSON, see training/config.py); flags override it.
Every value is checked when it is parsed (type, range, a device this machine has, an output that can be
written), before any model is loaded: a mistake is one line ``error: ...`` and exit code 2.
``torchrun --nproc-per-node N -m training train ...`` trains data-parallel (each rank reads its own shards).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from organism.errors import OrganismError
from sae_core import (ConfigError, DictionaryConfig, DictionaryError, SAEError, ShardReader, TrainConfig, evaluate,
                      load_dictionary, save_dictionary, train_dictionary, validate_window)
from sae_core.config import Option, options
from sae_core.metrics import firing_histogram
from sae_core.plots import histogram_chart, line_chart
from sae_core.shards import DTYPES
from sae_core.synthetic import run_benchmark, superposition_data

from .config import (COUNT, FEATURE, FINITE, FRACTION, NON_NEGATIVE, POSITIVE, SEED, TEXT, ArgParser, Device, Number,
                     OutputPath, Span, Text, check_writable, parse_with_config)
from .steer_lab import LAB_SITES, METHODS as LAB_METHODS

log = logging.getLogger("training")


def tqdm_progress(desc: str, total: int, disable: bool = False):
    """A training progress callback that drives a tqdm bar, drawn from the first step on (a run refused before
    it trains prints its one-line error and nothing else)."""
    bars: list[tqdm] = []

    def update(step: int, total_steps: int, metrics: dict) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=desc, unit="step", leave=False, disable=disable))
        bar = bars[0]
        bar.update(step - bar.n)
        if "fvu" in metrics:
            bar.set_postfix(fvu=f"{metrics['fvu']:.3f}")
        elif "atoms" in metrics:
            bar.set_postfix(atoms=metrics["atoms"], loss=f"{metrics['relative_loss']:.3f}")
        if step >= total_steps:
            bar.close()

    return update


def say(message: str) -> None:
    print(message, flush=True)


def _window(values: Optional[list[float]]) -> Optional[tuple[float, float]]:
    return None if values is None else (float(values[0]), float(values[1]))


# ----------------------------------------------------------------------------- synthetic


SYNTHETIC_HELD_OUT = 10
"""The synthetic benchmark holds out one sample in this many for its scores."""


def _synthetic_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(DictionaryConfig(k=args.k, n_latents=args.latents or 2 * args.features, normalization="none"),
                       total_steps=args.steps, batch_size=args.batch_size, warmup_steps=50,
                       lr=args.lr, dead_tokens=50_000, loss_threshold=args.loss_threshold, seed=args.seed, log_every=25)


def cmd_synthetic(args: argparse.Namespace) -> int:
    data = superposition_data(n_samples=args.samples, d=args.d, n_features=args.features, mean_l0=args.l0, seed=args.seed)
    config = _synthetic_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = {}
    rows = run_benchmark(tuple(args.kinds), data, config, tqdm_progress, keep=trained)
    for kind, result in trained.items():
        save_dictionary(result.dictionary, out / f"{kind}.safetensors")
        edges, counts = firing_histogram(result.dictionary.firing_frequency)
        histogram_chart(edges, counts, f"{kind}: latent firing frequency", "log10 frequency").save(out / f"{kind}_firing.png")
    curves = {kind: [(h["step"], h["fvu"]) for h in result.history] for kind, result in trained.items() if kind != "itda"}
    line_chart(curves, "training FVU (synthetic superposition)", y_label="FVU", log_y=True).save(out / "training_curves.png")
    (out / "metrics.json").write_text(json.dumps(rows, indent=2))

    say(f"synthetic superposition: d={args.d}, {args.features} true features, mean L0 {args.l0}, {args.samples} samples")
    say(f"{'kind':<10} {'latents':>8} {'L0':>6} {'FVU':>7} {'recovery':>9} {'dead':>6} {'seconds':>8}")
    for r in rows:
        say(f"{r['kind']:<10} {r['latents']:>8} {r['l0']:>6.2f} {r['fvu']:>7.4f} {r['recovery']:>9.4f} {r['dead_fraction']:>6.3f} {r['seconds']:>8.1f}")
    say(f"dictionaries, curves and metrics.json written to {out}/")
    return 0


# ----------------------------------------------------------------------------- organism


def cmd_organism(args: argparse.Namespace) -> int:
    from organism import WEIGHTS
    from organism.data import organism_data

    from .organism_build import build_denoiser, fit_and_report
    from .organism_fit import FitConfig

    out = Path(args.out) if args.out else WEIGHTS
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    for kind in args.kinds:
        config = FitConfig(kind=kind, steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        report[kind] = {k: v for k, v in build_denoiser(kind, out, Path(args.work_dir), config).items() if k != "history"}
        say(f"organism {kind}: trained {args.train_steps} steps in {report[kind]['seconds_this_run']} s -> {out / kind}")
    if not args.skip_classifier:
        train, held_out = organism_data(args.seed)
        report["classifier"] = fit_and_report(train, held_out, out)
        say(f"classifier: held-out accuracy {report['classifier']['held_out_accuracy']:.3f} -> {out / 'classifier.safetensors'}")
    say(json.dumps(report, indent=1, default=str))
    return 0


# ----------------------------------------------------------------------------- capture


def _runner(args: argparse.Namespace):
    from .runner import load_runner

    return load_runner(args.model, device=args.device)


def _model_for(args: argparse.Namespace, dictionary: Any) -> tuple[Any, Any]:
    """``(runner, site)`` for commands that run a dictionary on a model (atlas, steer); the dictionary is read
    first, so a bad one is refused before the model loads."""
    runner = _runner(args)
    return runner, _site_for(runner, dictionary, args.site)


def _site_for(runner, dictionary: Any, name: Optional[str]) -> Any:
    """The model's site a dictionary acts at (``name``, else its own Site, family checked); their widths must agree."""
    from sae_core import check_site_width

    site = runner.site(name or dictionary.site)
    check_site_width(dictionary, int(site.extra["d"]), site.name)
    return site


def cmd_capture(args: argparse.Namespace) -> int:
    from .capture import CaptureSettings, capture, capture_images, image_files
    from .prompts import read_prompts

    if args.list_sites:
        for site in _runner(args).sites():
            say(f"{site.name}  (d={site.extra['d']})")
        return 0
    if args.images:
        image_files(Path(args.images))  # refuse a folder with no pictures before the model loads
        runner = _runner(args)
        sites = [runner.site(name) for name in args.sites]
        summary = capture_images(runner, Path(args.images), sites, Path(args.out), levels=args.image_levels,
                                 prompt=args.image_prompt, seed=args.seed, shard_tokens=args.shard_tokens, dtype=args.dtype)
        for name, info in summary.items():
            say(f"{name}: {info['tokens']} vectors in {info['directory']}")
        return 0
    prompts = read_prompts(args.prompts)
    runner = _runner(args)
    sites = [runner.site(name) for name in args.sites]
    settings = CaptureSettings(model=args.model, prompts=prompts, images_per_prompt=args.images_per_prompt, seed=args.seed,
                               steps=args.sample_steps, guidance=args.guidance, window=_window(args.window),
                               tokens_per_image=args.tokens_per_image, cond_only=not args.with_uncond)
    out = Path(args.out)
    summary = capture(runner, settings, sites, out, batch_size=args.batch_size, shard_tokens=args.shard_tokens, dtype=args.dtype)
    for name, info in summary.items():
        say(f"{name}: {info['tokens']} vectors in {info['directory']}")
    return 0


# ----------------------------------------------------------------------------- train


TRAIN_FLAG_NAMES = {"n_latents": "latents", "expansion_factor": "expansion", "total_steps": "train-steps"}
"""TrainConfig options whose ``train`` flag has another name (the one commands and config files already use)."""
TRAIN_SHARED_FLAGS = ("seed", "device")
"""TrainConfig options set by flags that other subcommands share: ``--seed`` (every one) and ``--device``
(default: the accelerator; under torchrun each rank's own)."""


def train_flag(option: Option) -> str:
    """The ``train`` flag of a TrainConfig option, without its dashes: ``total_steps`` -> ``train-steps``."""
    return TRAIN_FLAG_NAMES.get(option.name, option.name.replace("_", "-"))


def option_type(option: Option) -> Any:
    """The flag type that checks a TrainConfig option's declared type and bounds while parsing."""
    if option.type is str:
        return TEXT
    return Number(option.type, option.min, option.max, option.min_open, option.max_open)


def add_train_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig option, its default, choices and help (the field's docstring) taken from the dataclass."""
    for option in options(TrainConfig):
        if option.name in TRAIN_SHARED_FLAGS:
            continue
        flag: dict[str, Any] = {"default": option.default, "help": option.help.replace("%", "%%")}
        if option.choices is not None:
            flag["choices"] = option.choices
        else:
            flag["type"] = option_type(option)
        if option.length is not None:
            flag["nargs"] = option.length
        p.add_argument(f"--{train_flag(option)}", **flag)


def _train_config(args: argparse.Namespace, device: str) -> TrainConfig:
    values = {o.name: getattr(args, train_flag(o).replace("-", "_")) for o in options(TrainConfig) if o.name != "device"}
    return TrainConfig.from_dict({**values, "device": device})


def _streaming_data(args: argparse.Namespace, device: str):
    """Batches straight from the pipeline, never stored: every pass regenerates the same samples."""
    from sae_core import Recorder

    from .prompts import read_prompts

    prompts = read_prompts(args.prompts)
    runner = _runner(args)
    site = runner.site(args.site)

    def batches():
        recorder = Recorder(window=_window(args.window), tokens_per_image=args.tokens_per_image, seed=args.seed)
        pool: list[torch.Tensor] = []
        for first in range(0, len(prompts), 8):
            chunk = prompts[first:first + 8]
            recorder.begin(range(first, first + len(chunk)))
            runner.generate(chunk, [args.seed + first + i for i in range(len(chunk))], site_functions={site: recorder})
            pool.extend(record.acts.reshape(-1, record.acts.shape[-1]) for record in recorder.take())
            rows = torch.cat(pool)
            while rows.shape[0] >= args.batch_size:
                yield rows[: args.batch_size]
                rows = rows[args.batch_size:]
            pool = [rows]

    return batches, site


def cmd_train(args: argparse.Namespace) -> int:
    from sae_core.distributed import init_from_env, is_main

    rank, world, device = init_from_env(device=args.device)
    out = Path(args.out)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.parent / f"{out.stem}.checkpoint"
    config = _train_config(args, device)
    if args.shards:
        reader = ShardReader(args.shards, batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world)
        data, site = reader, reader.site
        source = f"{reader.n_tokens} vectors in {args.shards}" + (f" (rank {rank} of {world})" if world > 1 else "")
    else:
        if world > 1:
            raise ConfigError("streaming from a pipeline runs on one process: capture shards first for torchrun")
        data, site = _streaming_data(args, device)
        source = f"{args.model} streaming at {args.site}"
    if is_main():
        say(f"training {args.kind} on {source}; checkpoints in {checkpoint_dir}")
    result = train_dictionary(data, config, site=site, checkpoint_dir=checkpoint_dir,
                              progress=tqdm_progress(f"train {args.kind}", config.total_steps, disable=not is_main()))
    if not is_main():
        return 0
    if result.resumed_from_step is not None:
        say(f"resumed from step {result.resumed_from_step}")
    save_dictionary(result.dictionary, out)
    key = "relative_loss" if args.kind == "itda" else "fvu"
    curve = [(h["step"], h[key]) for h in result.history if key in h]
    if curve:
        line_chart({args.kind: curve}, f"{args.kind} at {site.name}: training {key}", y_label=key,
                   log_y=True).save(out.with_suffix(".curve.png"))
    last = result.history[-1] if result.history else {}
    say(f"dictionary written to {out} ({result.dictionary.n_latents} latents); last {key} "
        f"{last.get(key, float('nan')):.4f}; {result.rejected_batches} batches rejected")
    return 0


# ----------------------------------------------------------------------------- eval


def _classifier_for(runner) -> Any:
    if not runner.is_organism:
        return None
    from organism.classifier import classify_outputs, load_classifier

    model = load_classifier()
    return lambda images: classify_outputs(model, images)


def cmd_eval(args: argparse.Namespace) -> int:
    from .prompts import read_prompts

    dictionary = load_dictionary(args.dictionary)
    prompts = read_prompts(args.prompts)[: args.samples] if args.model else []
    reader = ShardReader(args.shards, batch_size=4096, shuffle=False, drop_last=False) if args.shards else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dictionary": args.dictionary}
    if reader is not None:
        x = torch.cat([batch["activations"] for batch in reader]).float()
        report["held_out"] = {k: round(v, 5) for k, v in evaluate(dictionary, x).items()}
        report["held_out"]["vectors"] = x.shape[0]
        say(f"held-out activations ({x.shape[0]} vectors): " + ", ".join(f"{k} {v}" for k, v in report["held_out"].items()))
    if args.model:
        from .grids import image_grid
        from .substitution import substitution_scores

        runner = _runner(args)
        runner.require_images("eval's substituted generation")
        site = _site_for(runner, dictionary, args.site)
        scores, images = substitution_scores(runner, dictionary, site, prompts, [args.seed + i for i in range(len(prompts))],
                                             _classifier_for(runner))
        report["substitution"] = scores
        shown = min(len(prompts), 12)
        image_grid(images[:, :shown], ["original", "substituted", "mean-ablated"], [str(i) for i in range(shown)],
                   f"reconstruction substituted at {site.name}").save(out / "substitution.png")
        say(f"substituted generation at {site.name}: " + json.dumps(scores))
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    say(f"report written to {out / 'eval.json'}")
    return 0


# ----------------------------------------------------------------------------- atlas


def cmd_atlas(args: argparse.Namespace) -> int:
    from sae_core.feature_index import index_folder_for, open_index
    from sae_core.labels import label_index_by_words

    from .atlas_run import build_atlas
    from .prompts import read_prompts

    prompts = read_prompts(args.prompts)
    dictionary = load_dictionary(args.dictionary)
    runner, site = _model_for(args, dictionary)
    runner.require_images("atlas")
    if args.beside and not Path(args.dictionary).is_file():
        raise ConfigError(f"--beside: {args.dictionary} is not a local dictionary file; the index goes beside one "
                          "(drop --beside to write it into --out)")
    beside = index_folder_for(args.dictionary) if args.beside else None
    index = build_atlas(runner, dictionary, site, prompts, Path(args.out), images_per_prompt=args.images_per_prompt,
                        seed=args.seed, at=args.at, top_m=args.top_m, n_features=args.features,
                        dictionary_path=args.dictionary if Path(args.dictionary).is_file() else None,
                        overwrite=args.overwrite, index_folder=beside)
    if beside is not None:
        label_index_by_words(open_index(beside))
        say(f"feature index written to {beside} (ComfyUI's SAE features tab shows it when the dictionary is in "
            "models/sae)")
    say(f"atlas written to {index} (open it in a browser; it works offline)")
    return 0


# ----------------------------------------------------------------------------- steer


def cmd_steer(args: argparse.Namespace) -> int:
    from .steer_grid import steering_grid

    dictionary = load_dictionary(args.dictionary)
    for f in args.features:
        if not 0 <= f < dictionary.n_latents:
            raise DictionaryError(f"feature {f} does not exist: the dictionary has {dictionary.n_latents} features "
                                  f"(0 to {dictionary.n_latents - 1})")
    runner, site = _model_for(args, dictionary)
    runner.require_images("steer")
    grid = steering_grid(runner, dictionary, site, args.prompt, args.seed, args.features, args.strengths,
                         args.windows, mode=args.mode, units=args.units)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    say(f"steering grid ({len(args.features) * len(args.windows)} rows x {len(args.strengths)} strengths) written to {out}")
    return 0


# ----------------------------------------------------------------------------- probe


DIFFC_FILES = ("diffc.json", "diffc.md", "diffc.png")


def cmd_probe(args: argparse.Namespace) -> int:
    from organism.data import CLASSES

    from sae_core.sites import block_sites

    from .probe import diffc_table, site_rows

    dictionary = load_dictionary(args.dictionary) if args.dictionary else None  # a bad file: refused before the model loads
    runner = _runner(args)
    sites = block_sites(runner.sites()) if args.sites == ["all"] else [runner.site(name) for name in args.sites]
    rows = site_rows(sites, dictionary, _site_for(runner, dictionary, None) if dictionary is not None else None)
    start = time.perf_counter()
    table = diffc_table(runner, rows, args.levels, args.per_class, args.test_fraction, args.seed, args.batch_size)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model, "per_class": args.per_class, "test_fraction": args.test_fraction,
                "seed": args.seed, "dictionary": args.dictionary, "prompt": "", "seconds": round(seconds, 1)}
    (out / "diffc.json").write_text(json.dumps({**table.to_json(), "settings": settings}, indent=1))
    (out / "diffc.md").write_text(table.markdown() + "\n")
    table.heatmap(f"Diff-C probe accuracy: {args.model}").save(out / "diffc.png")
    site, level, accuracy = table.best()
    say(table.markdown())
    short = table.n_train + table.n_test < len(CLASSES) * args.per_class
    shortfall = " (fewer where the held-out split has fewer)" if short else ""
    say(f"best: {site} at {level:g}, accuracy {accuracy:.3f} (chance {table.chance:.3f}); {args.per_class} images per "
        f"class{shortfall}, {seconds:.0f} s; " + ", ".join(DIFFC_FILES) + f" written to {out}/")
    return 0


# ----------------------------------------------------------------------------- steering lab


def cmd_steer_lab(args: argparse.Namespace) -> int:
    from .runner import load_runner
    from .steer_lab import LabPlan, Seeds, fixed_half, run_lab, STRENGTHS, WINDOWS

    if args.quick:
        strengths = {m: values[1:2] for m, values in STRENGTHS.items()}
        windows, dictionary_steps, captions, controls = [None], 60, 16, 1
    else:
        strengths, windows = dict(STRENGTHS), list(WINDOWS)
        dictionary_steps, captions, controls = args.dictionary_steps, 240, args.controls
    if args.strengths:
        strengths = {m: tuple(args.strengths) for m in strengths}
    if args.windows:
        windows = list(args.windows)
    targets = list(range(20)) if args.targets == "all" else fixed_half(args.seed)
    if args.quick:
        targets = targets[:2]
    seeds = Seeds(evaluate=tuple(1000 + i for i in range(args.eval_seeds)))
    if args.quick:
        seeds = Seeds(profile=seeds.profile[:1], trial=seeds.trial, evaluate=seeds.evaluate[:1])
    kinds = ["topk"] + [k for k in args.kinds if k != "topk"]
    sites = args.sites or _lab_sites(args.model)
    groups = [group.split("+") for group in args.groups]
    unknown = sorted({name for group in groups for name in group} - set(sites))
    if unknown or any(len(group) < 2 for group in groups):
        raise ConfigError(f"--groups: each group is two or more of the lab's sites joined by '+' ({', '.join(sites)}); "
                          f"{', '.join(unknown) or 'a group of one site'} is not")
    plan = LabPlan(args.model, Path(args.out), sites, args.methods, kinds, targets, seeds, windows, strengths,
                   top_n=args.top_n, groups=groups, controls=controls, dictionary_steps=dictionary_steps,
                   captions=captions, seed=args.seed)
    run_lab(plan, load_runner(args.model), say)
    return 0


def _lab_sites(model: str) -> list[str]:
    return list(LAB_SITES[model])


# ----------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args)
    return 0


def cmd_organism_dictionaries(args: argparse.Namespace) -> int:
    from .shipped import build_shipped

    for path in build_shipped(Path(args.out), seed=args.seed):
        say(f"wrote {path} and its feature index {path.with_suffix('.features')}")
    return 0


# ----------------------------------------------------------------------------- parser


FOLDER = OutputPath(folder=True)
DICTIONARY_FILE = OutputPath(folder=False, suffixes=(".safetensors",))
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
"""Picture formats a steering grid (an RGB image) is saved in, where this Pillow can write them."""


@lru_cache(maxsize=None)
def grid_file() -> OutputPath:
    """The steering grid's output: a file name whose suffix is a picture format Pillow writes here."""
    from PIL import Image

    Image.init()
    writable = Image.registered_extensions()
    return OutputPath(folder=False, suffixes=tuple(s for s in GRID_SUFFIXES if writable.get(s) in Image.SAVE))


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=TEXT, default="organism-flux",
                   help="organism-flux, organism-unet, a local diffusers pipeline folder or a Hub id (default organism-flux)")
    p.add_argument("--device", type=Device(), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N or mps (default: cuda where there is one)")
    p.add_argument("--sample-steps", type=COUNT, default=None, help="sampling steps (default: the pipeline's usual)")
    p.add_argument("--guidance", type=NON_NEGATIVE, default=None, help="guidance scale (default: the pipeline's usual)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = ArgParser(prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every training report")
    sub = parser.add_subparsers(dest="command", required=True)
    subs: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", type=TEXT, help="TOML or JSON file of options (flags override it)")
        p.add_argument("--seed", type=SEED, default=0)
        p.set_defaults(func=func)
        subs[name] = p
        return p

    syn = add("synthetic", "train TopK, BatchTopK and ITDA on the synthetic superposition benchmark", cmd_synthetic)
    syn.add_argument("--kinds", nargs="+", default=["topk", "batchtopk", "itda"],
                     choices=["topk", "batchtopk", "matryoshka_batchtopk", "itda"])
    syn.add_argument("--samples", type=Number(int, min=SYNTHETIC_HELD_OUT), default=50_000,
                     help=f"samples drawn; one in {SYNTHETIC_HELD_OUT} is held out for the scores")
    syn.add_argument("--d", type=COUNT, default=64, help="activation width")
    syn.add_argument("--features", type=COUNT, default=512, help="true features (more than --d: superposition)")
    syn.add_argument("--l0", type=POSITIVE, default=8.0, help="mean active true features per sample")
    syn.add_argument("--k", type=COUNT, default=8, help="dictionary L0 (k for SAEs, target L0 for ITDA)")
    syn.add_argument("--latents", type=COUNT, default=None, help="SAE width (default 2 x features)")
    syn.add_argument("--steps", type=COUNT, default=1500)
    syn.add_argument("--batch-size", type=COUNT, default=1024)
    syn.add_argument("--lr", type=POSITIVE, default=2e-3)
    syn.add_argument("--loss-threshold", type=POSITIVE, default=0.25, help="ITDA growth threshold")
    syn.add_argument("--out", type=FOLDER, default="runs/synthetic")

    org = add("organism", "rebuild the model organism: Flux and U-Net denoisers and the classifier", cmd_organism)
    org.add_argument("--kinds", nargs="+", default=["flux", "unet"], choices=["flux", "unet"])
    org.add_argument("--train-steps", type=COUNT, default=1400)
    org.add_argument("--batch-size", type=COUNT, default=128)
    org.add_argument("--lr", type=POSITIVE, default=1e-3)
    org.add_argument("--out", type=FOLDER, default=None, help="default: organism/weights (the committed organism)")
    org.add_argument("--work-dir", type=FOLDER, default="runs/organism-work", help="resumable checkpoints")
    org.add_argument("--skip-classifier", action="store_true")

    cap = add("capture", "generate from prompts and store site activations as shards", cmd_capture)
    _model_options(cap)
    cap.add_argument("--prompts", type=TEXT, help="text file, one prompt per line")
    cap.add_argument("--images", type=TEXT,
                     help="a folder of real images instead of prompts (Revelio's route; organism pipelines)")
    cap.add_argument("--image-levels", type=FRACTION, nargs="+", default=[0.5],
                     help="noise levels for --images, as sampling progress of a 20-step schedule (0 = pure noise)")
    cap.add_argument("--image-prompt", type=Text(empty=True), default="",
                     help="the prompt real images are denoised with (default: none)")
    cap.add_argument("--sites", type=TEXT, nargs="+", help="site names, e.g. double_blocks.1:image (see --list-sites)")
    cap.add_argument("--list-sites", action="store_true", help="print the model's sites and exit")
    cap.add_argument("--window", nargs=2, type=FRACTION, metavar=("START", "END"),
                     help="capture only steps in this sampling-progress window (0 = first step, 1 = last)")
    cap.add_argument("--tokens-per-image", type=COUNT, default=None, help="random subset of tokens kept per image and step")
    cap.add_argument("--images-per-prompt", type=COUNT, default=1)
    cap.add_argument("--with-uncond", action="store_true", help="also keep the unconditional rows of CFG")
    cap.add_argument("--batch-size", type=COUNT, default=8, help="images generated together")
    cap.add_argument("--shard-tokens", type=COUNT, default=65536)
    cap.add_argument("--dtype", default="float16", choices=list(DTYPES))
    cap.add_argument("--out", type=FOLDER, default="runs/activations")

    tr = add("train", "train a TopK / BatchTopK SAE or an ITDA dictionary (resumable; torchrun for several GPUs)", cmd_train)
    tr.add_argument("--shards", type=TEXT, help="a site's shard directory from capture")
    _model_options(tr)
    tr.add_argument("--prompts", type=TEXT, help="stream from the pipeline (with --model and --site) instead of shards")
    tr.add_argument("--site", type=TEXT)
    tr.add_argument("--window", nargs=2, type=FRACTION, metavar=("START", "END"))
    tr.add_argument("--tokens-per-image", type=COUNT, default=None)
    add_train_config_flags(tr)
    tr.add_argument("--checkpoint-dir", type=FOLDER, default=None, help="default: OUT's name + .checkpoint beside it")
    tr.add_argument("--out", type=DICTIONARY_FILE, default="runs/dictionary.safetensors")

    ev = add("eval", "score a dictionary on held-out shards and by reconstruction-substituted generation", cmd_eval)
    ev.add_argument("--dictionary", type=TEXT, required=True)
    ev.add_argument("--shards", type=TEXT, help="held-out shard directory")
    _model_options(ev)
    ev.set_defaults(model=None)
    ev.add_argument("--prompts", type=TEXT)
    ev.add_argument("--site", type=TEXT, help="default: the dictionary's own site")
    ev.add_argument("--samples", type=COUNT, default=32, help="prompts used for substituted generation")
    ev.add_argument("--out", type=FOLDER, default="runs/eval")

    at = add("atlas", "write the feature atlas: top images with heatmaps, frequencies, associated words", cmd_atlas)
    at.add_argument("--dictionary", type=TEXT, required=True)
    _model_options(at)
    at.add_argument("--prompts", type=TEXT, required=True)
    at.add_argument("--site", type=TEXT, help="default: the dictionary's own site")
    at.add_argument("--images-per-prompt", type=COUNT, default=1)
    at.add_argument("--at", type=FRACTION, default=0.5,
                    help="sampling progress at which features are read: 0 = the first step, 1 = the last")
    at.add_argument("--top-m", type=COUNT, default=8, help="top images per feature")
    at.add_argument("--features", type=COUNT, default=None, help="features shown (default: all that fire)")
    at.add_argument("--out", type=FOLDER, default="runs/atlas")
    at.add_argument("--beside", action="store_true",
                    help="build the feature index beside the dictionary file (<name>.features/, where ComfyUI's "
                         "feature browser finds it, with prompt-word labels) instead of <out>/index/")
    at.add_argument("--overwrite", action="store_true",
                    help="replace an index built with other settings or another dictionary (default: resume or "
                         "reuse one built with the same)")

    st = add("steer", "a grid of steered images: features x windows down, strengths across", cmd_steer)
    st.add_argument("--dictionary", type=TEXT, required=True)
    _model_options(st)
    st.add_argument("--prompt", type=TEXT, required=True)
    st.add_argument("--site", type=TEXT, help="default: the dictionary's own site")
    st.add_argument("--features", type=FEATURE, nargs="+", required=True)
    st.add_argument("--strengths", type=FINITE, nargs="+", default=[0, 0.1, 0.25, 0.5],
                    help="token_norm 0.1 changes the organisms' pictures cleanly, 0.5 breaks them (BENCHMARKS.md)")
    st.add_argument("--windows", type=Span(), nargs="+", default=[None], help="START-END progress windows or 'all'")
    st.add_argument("--mode", default="add", choices=["add", "clamp", "ablate"])
    st.add_argument("--units", default="token_norm", choices=["token_norm", "mean_activation", "raw"])
    st.add_argument("--out", type=grid_file(), default="runs/steer.png",
                    help="the grid picture: " + ", ".join(grid_file().suffixes))

    demo = add("demo", "the whole loop on the model organism: capture, train TopK + ITDA, eval, atlas, steer, flip rates",
               cmd_demo)
    demo.add_argument("--model", default="organism-flux", choices=["organism-flux", "organism-unet"])
    demo.add_argument("--site", type=TEXT, default=None,
                      help="default: double_blocks.1:image (Flux) / up_blocks.1:residual (U-Net)")
    demo.add_argument("--quick", action="store_true", help="a smaller run (for tests and a first look)")
    demo.add_argument("--out", type=FOLDER, default="runs/demo")

    pr = add("probe", "Diff-C (Revelio): how well a linear probe reads the class of the organism's held-out real "
             "images off each site's mean-pooled activations, at each noise level (organism pipelines only)", cmd_probe)
    pr.add_argument("--model", type=TEXT, default="organism-flux",
                    help="organism-flux, organism-unet or a folder holding an organism pipeline; other pipelines are "
                         "not supported yet (their real-image route is the ComfyUI capture node)")
    pr.add_argument("--device", type=Device(), default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda, cuda:N or mps (default: cuda where there is one)")
    pr.add_argument("--sites", type=TEXT, nargs="+", default=["all"],
                    help="'all' (default: every block's site; not context:text, the prompt's tokens, which an "
                         "empty prompt holds constant) or site names, e.g. double_blocks.1:image (capture "
                         "--list-sites shows them)")
    pr.add_argument("--levels", type=FRACTION, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                    help="noise levels as sampling progress of a 20-step schedule (0 = pure noise, 1 = the last step)")
    pr.add_argument("--per-class", type=Number(int, min=2), default=20,
                    help="held-out images per class (20 classes; fewer where the split has fewer)")
    pr.add_argument("--test-fraction", type=Number(float, min=0.0, max=1.0, min_open=True, max_open=True), default=0.5,
                    help="share of each class's images the probe is scored on (the rest train it)")
    pr.add_argument("--dictionary", type=TEXT, default=None,
                    help="also probe this dictionary's codes (mean-pooled over tokens) at its site, as one more row")
    pr.add_argument("--batch-size", type=COUNT, default=64, help="images per denoiser pass")
    pr.add_argument("--out", type=FOLDER, default="runs/probe", help="writes " + ", ".join(DIFFC_FILES))

    lab = add("steer-lab", "measure steering on a model organism: flip rates to each target class, clean pictures, "
              "random-feature and random-direction controls, over methods x sites x strengths x windows", cmd_steer_lab)
    lab.add_argument("--model", default="organism-flux", choices=["organism-flux", "organism-unet"])
    lab.add_argument("--sites", type=TEXT, nargs="+", default=None, help="default: the lab's sites for the model")
    lab.add_argument("--methods", nargs="+", default=list(LAB_METHODS), choices=list(LAB_METHODS))
    lab.add_argument("--kinds", nargs="+", default=["topk"], choices=["topk", "batchtopk", "matryoshka_batchtopk", "itda"],
                     help="dictionary kinds: topk (always) steers every method; each other kind repeats the best "
                          "concept method (concept, concept:spatial or concept:clamp) at its setting")
    lab.add_argument("--targets", default="half", choices=["half", "all"],
                     help="all 20 classes, or a fixed random half drawn by --seed (never hand-picked)")
    lab.add_argument("--strengths", type=FINITE, nargs="+", default=None, help="override every method's sweep")
    lab.add_argument("--windows", type=Span(), nargs="+", default=None, help="START-END progress windows or 'all'")
    lab.add_argument("--groups", type=TEXT, nargs="+", default=[],
                     help="sets of sites steered at once, e.g. output_blocks.0:residual+output_blocks.1:residual "
                          "(each site must be in --sites); swept beside the single sites")
    lab.add_argument("--top-n", type=Number(int, min=1, max=4096), default=None,
                     help="features a concept keeps (default: 8, and 32 per step and position for concept:clamp)")
    lab.add_argument("--controls", type=Number(int, min=1, max=100), default=2,
                     help="random controls per final row (each kind)")
    lab.add_argument("--eval-seeds", type=Number(int, min=1, max=1000), default=2,
                     help="evaluation seeds per source class")
    lab.add_argument("--dictionary-steps", type=COUNT, default=1000, help="training steps of each lab dictionary")
    lab.add_argument("--quick", action="store_true", help="a tiny run (tests, a first look)")
    lab.add_argument("--out", type=FOLDER, default="runs/steer-lab")

    ship = add("organism-dictionaries", "rebuild the dictionaries (and feature indexes) the plugin ships for its "
               "model organisms", cmd_organism_dictionaries)
    ship.add_argument("--out", type=FOLDER, default="models/sae", help="where to write them (the plugin's own)")
    return parser, subs


# ----------------------------------------------------------------------------- checks before any work


def _check_model(args: argparse.Namespace) -> None:
    from .runner import check_model

    check_model(args.model)


def _check_capture(args: argparse.Namespace) -> None:
    _check_model(args)
    if args.list_sites:
        return
    if not args.sites:
        raise ConfigError("capture: name at least one site with --sites (see --list-sites)")
    if bool(args.prompts) == bool(args.images):
        raise ConfigError("capture needs either --prompts FILE (generate) or --images FOLDER (real images), "
                          f"not {'both' if args.prompts else 'neither'}")
    validate_window(args.window)


def _check_train(args: argparse.Namespace) -> None:
    streaming = bool(args.prompts or args.site)
    if bool(args.shards) == streaming:
        raise ConfigError("train needs --shards DIR, or --model, --prompts and --site to stream from a pipeline"
                          + (", not both" if args.shards else ""))
    if streaming:
        if not (args.prompts and args.site):
            raise ConfigError("streaming from a pipeline needs both --prompts FILE and --site NAME")
        _check_model(args)
    validate_window(args.window)
    _train_config(args, args.device)


def _check_eval(args: argparse.Namespace) -> None:
    if not args.shards and not args.model:
        raise ConfigError("eval needs --shards (held-out activations) and/or --model with --prompts")
    if args.model:
        if not args.prompts:
            raise ConfigError("eval --model needs --prompts FILE: the prompts of the substituted generations")
        _check_model(args)


def _check_probe(args: argparse.Namespace) -> None:
    from sae_core import InputError

    from .runner import ORGANISMS, check_model, pipeline_class

    folder = check_model(args.model)
    if folder is None or not pipeline_class(folder).startswith("Organism"):
        raise InputError(f"probe runs on the organism pipelines ({', '.join(ORGANISMS)} or a folder holding one), "
                         f"not {args.model}: other pipelines are not supported yet")
    if "all" in args.sites and len(args.sites) > 1:
        raise ConfigError("--sites: give 'all' alone, or site names without 'all'")
    for flag, values in (("--sites", args.sites), ("--levels", args.levels)):
        if len(set(values)) < len(values):
            raise ConfigError(f"{flag}: each value once, please (got {' '.join(map(str, values))})")


def _check_synthetic(args: argparse.Namespace) -> None:
    _synthetic_config(args)


CHECKS = {"synthetic": _check_synthetic, "capture": _check_capture, "train": _check_train, "eval": _check_eval,
          "atlas": _check_model, "steer": _check_model, "probe": _check_probe}
"""Per subcommand, what its options must satisfy together (each value alone was checked while parsing)."""


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, before any work, options that cannot go together and outputs that cannot be written."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action.type, OutputPath) and value is not None:
            check_writable(value, action.type.folder)
    CHECKS.get(args.command, lambda _: None)(args)


# ----------------------------------------------------------------------------- main


def error_line(err: BaseException) -> str:
    """A user's mistake as the one line the command prints."""
    return "error: " + " ".join(str(err).split())


def main(argv: Optional[list[str]] = None) -> int:
    parser, subs = build_parser()
    try:
        args = parse_with_config(parser, subs, argv)
        check_args(args, subs[args.command])
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        start = time.perf_counter()
        code = args.func(args)
        log.info("%s finished in %.1f s", args.command, time.perf_counter() - start)
        return code
    except (SAEError, OrganismError, OSError) as err:  # a user's mistake or the disk's: one line, exit code 2
        print(error_line(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
