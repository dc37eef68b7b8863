"""Where does an organism's class enter, and how much of it can a site still change?

    OMP_NUM_THREADS=1 python -m bench.class_route --model organism-flux
    OMP_NUM_THREADS=1 python -m bench.class_route --model organism-unet

    OMP_NUM_THREADS=1 python -m bench.class_route --model organism-unet --domain animals --held same other mean

Measurements on digit (or animal) prompts (each class -> the class three places on in its domain, 4 seeds each,
40 samples):

* **input swap** (Flux): generate prompt A with B's sentence-encoder *token states* (A's pooled vector kept), then
  with B's *pooled vector* (A's tokens kept): which input the class follows (the U-Net reads only the tokens);
* **oracle at a site**: generate A while the site's tokens are overwritten, step by step, with what that site
  held when B was generated from the same seed: the most any steer confined to that site's tokens could do (a
  steer adds a vector; this replaces the whole state). Once on the prompt's rows of guidance only (as Steer's
  default ``cond_only``), once on both rows. ``--held`` chooses what B's state is: ``same`` (B generated from the
  same seed: the most a site can carry), ``other`` (B generated from another seed: a real target state that
  does not know this sample's noise), ``mean`` (B's mean state at each step and position over four other
  seeds: what a steer built from class statistics aims at), ``nearest`` (at each step, the state of whichever of
  16 other-seed B samples is closest to the sample's own state there: a target that follows the sample);
* the judge is the steering lab's (class, and whether the picture is clean).
"""
from __future__ import annotations

import argparse
import torch

from organism.classifier import load_classifier
from organism.data import class_prompt
from sae_core import prompt_rows
from training.compat import apply_torchvision_workaround

apply_torchvision_workaround()
from training.runner import load_runner  # noqa: E402
from training.steer_lab import OrganismJudge  # noqa: E402

SITES = {"organism-flux": ("double_blocks.0:text", "double_blocks.1:text", "double_blocks.0:image",
                           "double_blocks.1:image"),
         "organism-unet": ("input_blocks.4:residual", "middle_block:residual", "output_blocks.1:residual",
                           "output_blocks.3:residual")}


HELD = ("same", "other", "mean", "nearest")
OTHER_SEED = 500
"""``other``: B is generated from seed + this."""
MEAN_SEEDS = (100, 101, 102, 103)
"""``mean``: B's state averaged over these seeds (never the evaluated 1000+)."""
NEAREST_SEEDS = tuple(range(100, 116))
"""``nearest``: at each step, the one of B's samples from these seeds whose state there is closest to the
sample's own (a target that follows the sample, chosen without its seed)."""


def _pairs(seeds: int, domain: str) -> tuple[list[str], list[str], list[int], torch.Tensor, torch.Tensor]:
    first = 0 if domain == "digits" else 10
    a = [first + c for c in range(10) for _ in range(seeds)]
    b = [first + (c - first + 3) % 10 for c in a]
    seed_list = [1000 + s for _ in range(10) for s in range(seeds)]
    return [class_prompt(c) for c in a], [class_prompt(c) for c in b], seed_list, torch.tensor(a), torch.tensor(b)


def _report(name: str, judge: OrganismJudge, images: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    predicted, clean = judge(images)
    print(f"{name:<52} class A {float((predicted == a).float().mean()):.2f}   class B "
          f"{float((predicted == b).float().mean()):.2f}   clean {float(clean.float().mean()):.2f}", flush=True)


def input_swap(runner, judge, prompts_a, prompts_b, seeds, a, b) -> None:
    from organism.text import shared_encoder

    encoder = shared_encoder()
    original = type(encoder).__call__
    for part in ("tokens", "pooled"):
        def swapped(self, prompts, part=part):
            out = original(self, prompts)
            other = original(self, [prompts_b[prompts_a.index(p)] if p in prompts_a else p for p in prompts])
            setattr(out, part, getattr(other, part))
            return out

        type(encoder).__call__ = swapped
        try:
            images = runner.generate(prompts_a, seeds)
        finally:
            type(encoder).__call__ = original
        _report(f"input swap: B's {part}", judge, images, a, b)


def oracle(runner, judge, site_name: str, prompts_a, prompts_b, seeds, a, b, cond_only: bool,
           held_from: str = "same") -> None:
    site = runner.site(site_name)

    def rows_of(h, ctx) -> torch.Tensor:
        return (prompt_rows(ctx, h.shape[0]) if cond_only else torch.arange(h.shape[0])).to(h.device)

    held = _held_states(runner, site, prompts_b, seeds, b, held_from, rows_of)
    if held_from == "nearest":
        held = _nearest(held, b)

    calls = [0]

    def replace(h, ctx):
        out = h.clone()
        state = held[calls[0]]
        out[rows_of(h, ctx)] = (state(h[rows_of(h, ctx)]) if callable(state) else state).to(h.dtype)
        calls[0] += 1
        return out

    images = runner.generate(prompts_a, seeds, site_functions={site: replace})
    rows = "cond rows" if cond_only else "both rows"
    _report(f"oracle ({held_from}): B's state at {site_name}, {rows}", judge, images, a, b)


def _held_states(runner, site, prompts_b, seeds, b, held_from: str, rows_of) -> list[torch.Tensor]:
    """B's states at the site on ``rows_of`` rows, one tensor per model call (step); ``mean`` on the prompt rows."""
    held: list[torch.Tensor] = []

    def record(h, ctx):
        held.append(h[rows_of(h, ctx) if held_from != "mean" else prompt_rows(ctx, h.shape[0]).to(h.device)].clone())
        return h

    if held_from == "same":
        runner.generate(prompts_b, seeds, site_functions={site: record})
        return held
    if held_from == "other":
        runner.generate(prompts_b, [s + OTHER_SEED for s in seeds], site_functions={site: record})
        return held
    classes = sorted(set(b.tolist()))
    if held_from == "nearest":
        runner.generate([class_prompt(c) for c in classes for _ in NEAREST_SEEDS],
                        list(NEAREST_SEEDS) * len(classes), site_functions={site: record})
        return held
    runner.generate([class_prompt(c) for c in classes for _ in MEAN_SEEDS], list(MEAN_SEEDS) * len(classes),
                    site_functions={site: record})
    owner = torch.tensor([c for c in classes for _ in MEAN_SEEDS])
    means = [{c: state[owner == c].mean(0) for c in classes} for state in held]
    return [torch.stack([step[int(c)] for c in b]) for step in means]


def _nearest(held: list[torch.Tensor], b: torch.Tensor) -> list:
    """Per step, a function choosing for each sample row the closest of its target class's recorded states."""
    classes = sorted(set(b.tolist()))
    owner = torch.tensor([c for c in classes for _ in NEAREST_SEEDS])

    def chooser(states: torch.Tensor):
        def choose(rows: torch.Tensor) -> torch.Tensor:
            picked = []
            for row, target in zip(rows, b.tolist()):
                candidates = states[owner == target]
                picked.append(candidates[((candidates - row) ** 2).flatten(1).sum(1).argmin()])
            return torch.stack(picked)

        return choose

    return [chooser(states) for states in held]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism-flux", choices=sorted(SITES))
    parser.add_argument("--seeds", type=int, default=4, help="seeds per class")
    parser.add_argument("--domain", default="digits", choices=["digits", "animals"])
    parser.add_argument("--held", nargs="+", default=["same"], choices=HELD, help="what B's state is (see above)")
    parser.add_argument("--sites", nargs="+", default=None, help="default: the model's four sites above")
    parser.add_argument("--prompt-rows-only", action="store_true", help="skip the both-rows oracles")
    args = parser.parse_args()
    runner = load_runner(args.model)
    judge = OrganismJudge.fit(load_classifier())
    prompts_a, prompts_b, seeds, a, b = _pairs(args.seeds, args.domain)
    _report("unsteered A", judge, runner.generate(prompts_a, seeds), a, b)
    if args.model == "organism-flux" and args.held == ["same"]:
        input_swap(runner, judge, prompts_a, prompts_b, seeds, a, b)
    for held_from in args.held:
        for site in args.sites or SITES[args.model]:
            for cond_only in (True,) if args.prompt_rows_only or held_from in ("mean", "nearest") else (True, False):
                oracle(runner, judge, site, prompts_a, prompts_b, seeds, a, b, cond_only, held_from)


if __name__ == "__main__":
    main()
