"""``python -m training demo``: the whole loop on the model organism, offline, with figures.

capture -> train a TopK SAE and an ITDA dictionary -> eval (held-out shards, substituted generation)
-> atlas -> steering grid -> class flip rates against a random direction and diff-of-means.
Every step is the same code the separate subcommands run; outputs go under ``--out`` and a
``summary.md`` there collects the figures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from organism.classifier import classify_outputs, load_classifier
from organism.data import ANIMALS, CLASSES, DIGITS, class_prompt, organism_data
from sae_core import DictionaryConfig, ShardReader, TrainConfig, evaluate, save_dictionary, train_dictionary
from sae_core.plots import line_chart

from .atlas_run import build_atlas
from .capture import CaptureSettings, capture, site_dir
from .flip import flip_rates, profile_classes, random_direction, specific_feature
from .grids import image_grid
from .runner import load_runner
from .steer_grid import steering_grid
from .substitution import substitution_scores

DEFAULT_SITES = {"organism-flux": "double_blocks.1:image", "organism-unet": "up_blocks.1:residual"}
TEXT_SITES = {"organism-flux": "double_blocks.1:text"}
"""Where class flips are measured besides the image site: on the Flux organism the class is carried by the
text stream; the image tokens' mean barely differs between classes (BENCHMARKS.md)."""
TARGETS = ("seven", "giraffe")


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(captions=12, held_out=4, sae_steps=200, itda_steps=40, atlas_seeds=1, flip_seeds=1,
                    profile_seeds=1, strengths=[0.0, 2.0], substitution=4, targets=TARGETS[:1], image_flips=False)
    return dict(captions=240, held_out=40, sae_steps=2000, itda_steps=300, atlas_seeds=3, flip_seeds=3,
                profile_seeds=4, strengths=[0.0, 0.5, 1.0, 1.5, 2.0], substitution=32, targets=TARGETS, image_flips=True)


def _say(message: str) -> None:
    print(message, flush=True)


def _flips(runner, judge, site, dictionaries, profiles, target_name: str, prompts, sizes, seed: int):
    """Flip rates to one target class from the other classes of its domain (digits or animals)."""
    target = CLASSES.index(target_name)
    domain = range(len(DIGITS)) if target < len(DIGITS) else range(len(DIGITS), len(DIGITS) + len(ANIMALS))
    features = {kind: specific_feature(p.feature_means, target, list(domain)) for kind, p in profiles.items()}
    acts = profiles["topk"].activation_means
    sources = [c for c in domain if c != target]
    directions = {f"topk feature {features['topk']}": dictionaries["topk"].direction(features["topk"]),
                  f"itda atom {features['itda']}": dictionaries["itda"].direction(features["itda"]),
                  "diff of means": acts[target] - acts[sources].mean(0),
                  "random": random_direction(int(site.extra["d"]), seed + target)}
    seeds = [seed + 4000 + i for i in range(sizes["flip_seeds"])]
    rows = flip_rates(runner, judge, site, directions, prompts, sources, target, sizes["strengths"], seeds)
    _say(f"[flip] at {site.name} to '{target_name}' ({len(sources) * len(seeds)} samples per setting; "
         "flip rate, then in brackets the share still showing the prompted class):")
    _say("  " + f"{'direction':<22}" + "".join(f"{s:>13g}" for s in sizes["strengths"]))
    for name in directions:
        cells = [f"{r['flip_rate']:.2f} ({r['kept_prompt_class']:.2f})" for r in rows if r["direction"] == name]
        _say("  " + f"{name:<22}" + "".join(f"{c:>13}" for c in cells))
    return rows, features


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    sizes = _sizes(args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runner = load_runner(args.model)
    site = runner.site(args.site or DEFAULT_SITES[args.model])
    sites = [site] + ([runner.site(TEXT_SITES[args.model])] if args.model in TEXT_SITES else [])
    summary: dict[str, Any] = {"model": args.model, "sites": [s.name for s in sites], "quick": bool(args.quick)}

    # 1. capture: training prompts are the organism's own captions; held-out prompts are others, other seeds
    train_data, _ = organism_data()
    captions = sorted(set(train_data.captions))
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(args.seed)).tolist()
    train_prompts = [captions[i] for i in order[: sizes["captions"]]]
    held_prompts = [captions[i] for i in order[sizes["captions"]: sizes["captions"] + sizes["held_out"]]]
    (out / "prompts.txt").write_text("\n".join(train_prompts) + "\n")
    for name, prompts, seed in (("train", train_prompts, args.seed), ("held_out", held_prompts, args.seed + 10_000)):
        settings = CaptureSettings(model=args.model, prompts=prompts, images_per_prompt=2, seed=seed)
        info = capture(runner, settings, sites, out / "activations" / name, shard_tokens=16384)
        for s in sites:
            _say(f"[capture] {name}: {info[s.name]['tokens']} vectors at {s.name} -> {info[s.name]['directory']}")

    # 2. train: a TopK SAE (8x wide, k=8) and an ITDA dictionary (target L0 8) per site
    trained: dict[str, dict[str, Any]] = {}
    for s in sites:
        trained[s.name] = {}
        for kind, steps in (("topk", sizes["sae_steps"]), ("itda", sizes["itda_steps"])):
            config = TrainConfig(DictionaryConfig(kind=kind, k=8, n_latents=8 * int(s.extra["d"])), total_steps=steps,
                                 batch_size=1024, warmup_steps=50, loss_threshold=0.35, seed=args.seed,
                                 checkpoint_every=250, dead_tokens=200_000)
            reader = ShardReader(site_dir(out / "activations" / "train", s), batch_size=1024, seed=args.seed)
            stem = f"{kind}_{s.name.replace(':', '-')}"
            result = train_dictionary(reader, config, site=s, checkpoint_dir=out / f"{stem}.checkpoint")
            save_dictionary(result.dictionary, out / f"{stem}.safetensors")
            trained[s.name][kind] = result.dictionary
            _say(f"[train] {kind} at {s.name}: {result.dictionary.n_latents} latents -> {out / f'{stem}.safetensors'}")
    dictionaries = trained[site.name]

    # 3. eval: held-out activations and reconstruction-substituted generation
    classifier = load_classifier()

    def judge(images: torch.Tensor) -> torch.Tensor:
        return classify_outputs(classifier, images)

    summary["eval"] = {}
    for s in sites[1:]:
        held = ShardReader(site_dir(out / "activations" / "held_out", s), batch_size=4096, shuffle=False, drop_last=False)
        x = torch.cat([b["activations"] for b in held]).float()
        summary["eval"][s.name] = {kind: {k: round(v, 4) for k, v in evaluate(d, x).items()} for kind, d in trained[s.name].items()}
    held = ShardReader(site_dir(out / "activations" / "held_out", site), batch_size=4096, shuffle=False, drop_last=False)
    x = torch.cat([b["activations"] for b in held]).float()
    sub_prompts = [class_prompt(c) for c in range(len(CLASSES))][: sizes["substitution"]]
    sub_prompts = (sub_prompts * 2)[: sizes["substitution"]]
    for kind, dictionary in dictionaries.items():
        metrics = {k: round(v, 4) for k, v in evaluate(dictionary, x).items()}
        scores, images = substitution_scores(runner, dictionary, site, sub_prompts,
                                             [args.seed + 500 + i for i in range(len(sub_prompts))], judge)
        summary["eval"].setdefault(site.name, {})[kind] = {"held_out": metrics, "substitution": scores,
                                                          "latents": dictionary.n_latents}
        shown = min(10, len(sub_prompts))
        image_grid(images[:, :shown], ["original", "substituted", "mean-ablated"], [str(i) for i in range(shown)],
                   f"{kind}: reconstruction substituted at {site.name}").save(out / f"{kind}_substitution.png")
        _say(f"[eval] {kind}: held-out FVU {metrics['fvu']}, L0 {metrics['l0']}; substituted generation keeps the class "
             f"{scores['substituted'].get('same_class')} (mean-ablation {scores['mean_ablated'].get('same_class')})")

    # 4. atlas of the TopK SAE over every class prompt
    atlas_prompts = [class_prompt(c) for c in range(len(CLASSES))]
    index = build_atlas(runner, dictionaries["topk"], site, atlas_prompts, out / "atlas", overwrite=True,
                        images_per_prompt=sizes["atlas_seeds"], seed=args.seed + 2000, top_m=6, n_features=64)
    _say(f"[atlas] {index}")

    # 5 + 6. class-specific features, a steering grid, and flip rates against the controls, per site
    prompts = [class_prompt(c) for c in range(len(CLASSES))]
    profile_seeds = [args.seed + 3000 + i for i in range(sizes["profile_seeds"])]
    flip_sites = sites[1:] + (sites[:1] if sizes["image_flips"] or len(sites) == 1 else [])
    targets = {s.name: sizes["targets"] if s is not site or len(sites) == 1 else sizes["targets"][:1] for s in flip_sites}
    summary["flip"] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for s in flip_sites:
        profiles = profile_classes(runner, trained[s.name], s, prompts, profile_seeds)
        for target_name in targets[s.name]:
            rows, features = _flips(runner, judge, s, trained[s.name], profiles, target_name, prompts, sizes, args.seed)
            summary["flip"][f"{s.name} -> {target_name}"] = {"features": features, "rows": rows}
            for row in rows:
                label = f"{target_name} @ {s.stream}: {row['direction'].split(' ')[0]}"
                curves.setdefault(label, []).append((row["strength"], row["flip_rate"]))
            if s is site:
                source = CLASSES.index(target_name) - 1
                grid = steering_grid(runner, dictionaries["topk"], site, prompts[source], args.seed, [features["topk"]],
                                     sizes["strengths"], [None, (0.0, 0.3), (0.3, 1.0)])
                grid.save(out / f"steer_{target_name}.png")
                _say(f"[steer] grid for '{target_name}' -> {out / f'steer_{target_name}.png'}")
    line_chart(curves, "class flip rate vs steering strength", x_label="strength (x mean token norm)",
               y_label="flip rate to the target").save(out / "flip_rates.png")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _say(f"[done] in {summary['seconds']} s; figures in {out}/ (summary.json, flip_rates.png, atlas/index.html)")
    return summary
