"""How faithfully each model organism draws the class it is prompted for, and how fast it samples.

    python -m bench.organism_fidelity --seeds 5 [--steps 20] [--guidance 4]

For every one of the 20 classes, ``--seeds`` samples of its plain prompt ("a handwritten seven",
"a silhouette of a giraffe"); the committed classifier judges each. Prints one JSON line per organism:
agreement overall, for digits and for animals, and seconds per image (batches of 20 on this device).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from organism.classifier import classify_outputs, load_classifier
from organism.data import CLASSES, DIGITS, class_prompt
from training.runner import load_runner


def fidelity(model: str, seeds: int, steps: int, guidance: float) -> dict:
    runner = load_runner(model)
    classifier = load_classifier()
    labels = torch.tensor([c for c in range(len(CLASSES)) for _ in range(seeds)])
    predicted, seconds = [], 0.0
    for start in range(0, len(labels), 20):
        chunk = labels[start:start + 20].tolist()
        began = time.perf_counter()
        images = runner.generate([class_prompt(c) for c in chunk], list(range(start, start + len(chunk))),
                                 steps=steps, guidance=guidance)
        seconds += time.perf_counter() - began
        predicted.append(classify_outputs(classifier, images))
    hits = torch.cat(predicted) == labels
    digits = labels < len(DIGITS)
    return {"model": model, "samples": len(labels), "steps": steps, "guidance": guidance,
            "agreement": round(float(hits.float().mean()), 3), "digits": round(float(hits[digits].float().mean()), 3),
            "animals": round(float(hits[~digits].float().mean()), 3),
            "seconds_per_image": round(seconds / len(labels), 4), "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["organism-flux", "organism-unet"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()
    for model in args.models:
        print(json.dumps(fidelity(model, args.seeds, args.steps, args.guidance)), flush=True)


if __name__ == "__main__":
    main()
