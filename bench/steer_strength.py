"""Which Steer strength (units ``token_norm``, mode ``add``) changes a model organism's pictures without
breaking them: the measurement behind the Steer node's default.

    python -m bench.steer_strength [--features 4] [--seeds 1] [--strengths 0 0.1 0.25 0.5 1]

For each organism's shipped dictionary (``models/sae``), its ``--features`` most frequent features (from its
feature index) are added at its site over all of sampling, to every class prompt x ``--seeds``. Per strength,
over all features: ``kept`` (the committed classifier still sees the prompted class: a clean picture of what
was asked), ``confident`` (the classifier's top probability >= 0.5: a clean picture of something), and
``changed`` (mean absolute pixel change from the unsteered picture, pixels in [0, 1]). One JSON line per
organism and strength.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from organism.classifier import classify, load_classifier
from organism.data import CLASSES, class_prompt
from sae_core import load_dictionary
from sae_core.feature_index import index_folder_for, open_index
from training.flip import direction_function
from training.runner import load_runner
from training.shipped import SHIPPED

REPO = Path(__file__).resolve().parents[1]


def measure(item, n_features: int, seeds: int, strengths: list[float]) -> list[dict]:
    path = REPO / "models" / "sae" / f"{item.name}.safetensors"
    dictionary = load_dictionary(path)
    features = [row["id"] for row in open_index(index_folder_for(path)).page(limit=n_features)["features"]]
    runner = load_runner(item.model)
    site = runner.site(item.site)
    classifier = load_classifier()
    prompts = [class_prompt(c) for c in range(len(CLASSES)) for _ in range(seeds)]
    asked = torch.tensor([c for c in range(len(CLASSES)) for _ in range(seeds)])
    seed_list = [1000 + i for i in range(len(prompts))]
    plain = runner.generate(prompts, seed_list)
    rows = []
    for strength in strengths:
        kept, confident, changed = [], [], []
        for feature in features:
            fn = direction_function(dictionary.direction(feature), strength)
            images = runner.generate(prompts, seed_list, site_functions={site: fn})
            predicted, probs = classify(classifier, images[:, :1] * 2 - 1)
            kept.append((predicted == asked).float().mean())
            confident.append((probs.max(-1).values >= 0.5).float().mean())
            changed.append((images - plain).abs().mean())
        rows.append({"model": item.model, "site": site.name, "strength": strength, "features": features,
                     "samples": len(prompts) * len(features), "kept": round(float(torch.stack(kept).mean()), 3),
                     "confident": round(float(torch.stack(confident).mean()), 3),
                     "changed": round(float(torch.stack(changed).mean()), 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0])
    args = parser.parse_args()
    for item in SHIPPED:
        for row in measure(item, args.features, args.seeds, args.strengths):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
