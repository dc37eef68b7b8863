"""How often a feature's label names the class its images show, on a shipped organism feature index.

    python -m bench.label_quality [--source words] [--specific 0.75]

A feature is *specific to a class* when at least ``--specific`` of its top images were generated from prompts
of one organism class (read from the prompts: each names its class). For those features, the fraction whose
label (from ``--source`` in the index's labels.json) contains that class's word. Prints one JSON line per
shipped dictionary.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from organism.data import CLASSES
from sae_core.feature_index import index_folder_for, open_index
from sae_core.labels import LabelStore
from training.shipped import SHIPPED

REPO = Path(__file__).resolve().parents[1]


def prompt_class(prompt: str) -> str | None:
    words = set(prompt.lower().replace(",", " ").split())
    named = [c for c in CLASSES if c in words]
    return named[0] if len(named) == 1 else None


def quality(name: str, source: str, specific: float) -> dict:
    folder = index_folder_for(REPO / "models" / "sae" / f"{name}.safetensors")
    index, store = open_index(folder), LabelStore(folder)
    counted = named = 0
    for f in range(index.n_latents):
        top = index.feature(f)["top"]
        if len(top) < 4:
            continue
        (cls, n), = Counter(prompt_class(t["prompt"]) for t in top).most_common(1)
        if cls is None or n / len(top) < specific:
            continue
        label = store.get(f, source)
        counted += 1
        named += bool(label and label.ok and cls in label.text.lower().split(", ") + label.text.lower().split())
    return {"dictionary": name, "source": source, "specific_features": counted,
            "label_names_the_class": round(named / counted, 3) if counted else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="words")
    parser.add_argument("--specific", type=float, default=0.75)
    args = parser.parse_args()
    for item in SHIPPED:
        print(json.dumps(quality(item.name, args.source, args.specific)), flush=True)


if __name__ == "__main__":
    main()
