"""The steering lab: controls of the same size as what they control, seeds that never meet, a judge that tells
pictures from noise, and `python -m training steer-lab` end to end on the Flux organism."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_core import InputError, SiteContext, SparseAutoencoder, Steer
from sae_core.concepts import Concept, ScheduledConcept, SpatialConcept, clamp_steer_function, replace_steers
from training.compat import apply_torchvision_workaround

apply_torchvision_workaround()
from training.__main__ import main  # noqa: E402
from training.steer_lab import (Outcome, Part, Recipe, Seeds, added_vector, domain_of, fixed_half,  # noqa: E402
                                random_direction_control, random_features_control)

D, M = 12, 24


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def sae() -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(D, M, 3).requires_grad_(False)


def _site():
    from sae_core import Site

    return Site(family="toy", block="blocks.0", stream="image", extra={"d": D})


def _cond_ctx(batch: int, progress: float = 0.5) -> SiteContext:
    return SiteContext(sigma=1 - progress, progress=progress, cond=torch.ones(batch, dtype=torch.bool), grid=None)


def test_the_evaluation_seeds_never_meet_the_choosing_seeds():
    with pytest.raises(InputError, match="overlap"):
        Seeds(profile=(1, 2), trial=(3,), evaluate=(3, 4))
    Seeds(profile=(1, 2), trial=(3,), evaluate=(4, 5))


def test_the_half_of_the_classes_is_fixed_by_the_seed_and_not_the_first_ten():
    half = fixed_half(0)
    assert half == fixed_half(0) and len(set(half)) == 10 and half != list(range(10))
    assert fixed_half(1) != half
    assert domain_of(7) == [0, 1, 2, 3, 4, 5, 6, 8, 9] and domain_of(12) == [10, 11, 13, 14, 15, 16, 17, 18, 19]


def test_outcomes_add_up_over_targets_and_give_rates():
    total = Outcome(10, 5, 8, 4, 2).add(Outcome(10, 1, 10, 1, 6))
    assert total.counts() == (20, 6, 18, 5, 8)
    assert total.rates() == {"flip": 0.3, "clean": 0.9, "clean_flip": 0.25, "kept": 0.4, "samples": 20}


def test_a_random_direction_control_adds_a_vector_of_the_same_norm_elsewhere(sae):
    site = _site()
    concept = Concept((1, 5, 9), (0.7, -0.4, 1.2))
    recipe = Recipe({site: Part(sae, [concept.steer(3.0)])})
    control = random_direction_control(recipe, torch.Generator().manual_seed(0))
    wanted, turned = added_vector(recipe.parts[site]), control.parts[site].vector
    assert torch.allclose(wanted, 3.0 * concept.direction(sae), atol=1e-5)
    assert torch.isclose(turned.norm(), wanted.norm(), rtol=1e-5)
    assert torch.nn.functional.cosine_similarity(turned, wanted, dim=0).abs() < 0.9
    h = torch.randn(2, 6, D)
    edited = control.functions(None)[site](h, _cond_ctx(2))
    assert torch.allclose(edited - h, turned.expand_as(h), atol=1e-5)  # every token of the cond rows, raw units


def test_a_random_features_control_keeps_weights_removals_and_detection(sae):
    site = _site()
    source, target = Concept((2, 3), (1.0, 0.5)), Concept((7, 8, 11), (0.9, 0.6, 0.3))
    recipe = Recipe({site: Part(sae, replace_steers(source, target, 2.0))})
    alive = {site: torch.arange(M)}
    control = random_features_control(recipe, torch.Generator().manual_seed(1), alive)
    (ablate, add), (c_ablate, c_add) = recipe.parts[site].steers, control.parts[site].steers
    assert c_ablate is ablate
    assert c_add.strengths == add.strengths and c_add.detect == add.detect and c_add.units == "raw"
    assert c_add.features != add.features and len(set(c_add.features)) == 3


def test_a_token_norm_feature_control_is_the_same_strength_along_a_random_unit_direction(sae):
    site = _site()
    recipe = Recipe({site: Part(sae, [Steer((4,), (0.5,), units="token_norm")])})
    part = random_direction_control(recipe, torch.Generator().manual_seed(2)).parts[site]
    assert (part.vector_units, part.vector_strength, part.steers) == ("token_norm", 0.5, [])
    h = torch.randn(1, 5, D)
    delta = recipe.functions(None)[site](h, _cond_ctx(1)) - h
    control_delta = Recipe({site: part}).functions(None)[site](h, _cond_ctx(1)) - h
    assert torch.allclose(delta.norm(dim=-1), control_delta.norm(dim=-1), rtol=1e-4)


def test_a_recipe_acts_only_inside_its_window(sae):
    site = _site()
    recipe = Recipe({site: Part(sae, [Concept((1,), (1.0,)).steer(2.0)])})
    h = torch.randn(2, 4, D)
    function = recipe.functions((0.0, 0.3))[site]
    assert function(h, _cond_ctx(2)) is h
    assert torch.allclose(function(h, _cond_ctx(2, progress=0.1)) - h, 2.0 * sae.direction(1).expand_as(h), atol=1e-5)


def test_the_judge_passes_real_pictures_and_refuses_noise():
    from organism.classifier import load_classifier
    from organism.data import organism_data
    from training.steer_lab import OrganismJudge

    judge = OrganismJudge.fit(load_classifier())
    held = organism_data()[1].images[:400]
    _, clean = judge((held + 1) / 2)
    assert clean.float().mean() >= 0.95
    _, noisy = judge(torch.rand(100, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert noisy.float().mean() == 0.0


def test_the_lab_command_writes_its_table_json_and_pictures(tmp_path: Path, capsys):
    out = tmp_path / "lab"
    code = main(["steer-lab", "--quick", "--sites", "double_blocks.0:text", "--methods", "concept", "diff_of_means",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "lab.json").read_text())
    assert [row["method"] for row in summary["final"]] == ["concept", "diff_of_means"]
    concept, diff = summary["final"]
    assert set(concept["controls"]) == {"random features", "random direction"}
    assert set(diff["controls"]) == {"random direction"}  # a plain direction has no features to draw at random
    assert all(0.0 <= concept["outcome"][k] <= 1.0 for k in ("flip", "clean", "clean_flip", "kept"))
    assert concept["chosen"] and all(text.startswith("features ") for text in concept["chosen"].values())
    assert summary["seeds"]["evaluate"] == [1000] and 1000 not in summary["seeds"]["trial"]
    table = (out / "lab.md").read_text()
    assert "| concept | topk | double_blocks.0:text |" in table and "| diff_of_means |" in table
    assert (out / "lab.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "[sweep] concept" in printed and "[final] diff_of_means" in printed


def test_the_lab_steers_groups_of_sites_with_the_per_step_methods_and_reports_each_domain(tmp_path: Path):
    out = tmp_path / "lab"
    code = main(["steer-lab", "--quick", "--sites", "double_blocks.0:text", "double_blocks.1:text", "--groups",
                 "double_blocks.0:text+double_blocks.1:text", "--methods", "concept:clamp", "diff_of_means:spatial",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "lab.json").read_text())
    swept = {(row["method"], "+".join(row["sites"])) for row in summary["sweep"]}
    assert ("concept:clamp", "double_blocks.0:text+double_blocks.1:text") in swept and len(swept) == 6
    clamp, spatial = summary["final"]
    assert clamp["top_n"] == 32 and clamp["chosen"]
    assert all(text.startswith("top 32 features clamped at each of") for text in clamp["chosen"].values())
    assert set(spatial["controls"]) == {"random direction"}
    assert set(clamp["domains"]) == {"digits"}  # --quick steers toward the first two targets: zero and two
    assert sum(d["samples"] for d in clamp["domains"].values()) == clamp["outcome"]["samples"]


def test_every_other_dictionary_kind_repeats_the_best_concept_method(tmp_path: Path):
    out = tmp_path / "lab"
    code = main(["steer-lab", "--quick", "--sites", "double_blocks.0:text", "--methods", "concept:clamp",
                 "--kinds", "topk", "batchtopk", "--out", str(out)])
    assert code == 0
    final = json.loads((out / "lab.json").read_text())["final"]
    assert [(row["method"], row["kind"]) for row in final] == [("concept:clamp", "topk"), ("concept:clamp", "batchtopk")]
    topk, batchtopk = final
    assert (batchtopk["strength"], batchtopk["window"], batchtopk["top_n"]) == (topk["strength"], topk["window"],
                                                                                topk["top_n"])
    assert set(batchtopk["controls"]) == {"random features", "random direction"}


@pytest.mark.parametrize("flags, message", [
    (["--groups", "double_blocks.0:text+nowhere"], "--groups: each group is two or more of the lab's sites"),
    (["--methods", "telepathy"], "argument --methods: invalid choice"),
    (["--eval-seeds", "0"], "--eval-seeds"),
    (["--sites", "no_block.7:image"], "no_block.7:image"),
])
def test_a_bad_lab_setting_is_one_line_and_exit_code_2(flags, message, tmp_path: Path, capsys):
    assert main(["steer-lab", "--quick", "--out", str(tmp_path / "lab"), *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], errors  # (a site is known once the model has loaded and
    assert not (tmp_path / "lab").exists()                    #  diffusers may have warned about accelerate)


def test_a_spatial_concept_adds_each_positions_own_features_and_its_controls_match_it(sae):
    site = _site()
    gen = torch.Generator().manual_seed(3)
    features, weights = torch.randint(M, (5, 3), generator=gen), torch.randn(5, 3, generator=gen)
    part = Part(sae, positional=SpatialConcept(features, weights))
    expected = torch.stack([sum(weights[p, j] * sae.direction(int(features[p, j])) for j in range(3))
                            for p in range(5)])
    assert torch.allclose(part.by_position(), expected, atol=1e-5)
    h = torch.randn(2, 5, D)
    ctx = SiteContext(sigma=0.5, progress=0.5, cond=torch.tensor([False, True]), grid=None)
    out = Recipe({site: part}).functions(None)[site](h, ctx)
    assert torch.equal(out[0], h[0]) and torch.allclose(out[1] - h[1], expected, atol=1e-5)  # the prompt's row only
    turned = random_direction_control(Recipe({site: part}), torch.Generator().manual_seed(0)).parts[site]
    assert torch.allclose(turned.by_position().norm(dim=-1), expected.norm(dim=-1), atol=1e-5)
    drawn = random_features_control(Recipe({site: part}), torch.Generator().manual_seed(1), {site: torch.arange(M)})
    picked, same_weights = drawn.parts[site].positional.features, drawn.parts[site].positional.weights
    assert torch.equal(same_weights, weights) and not torch.equal(picked, features)
    assert all(len(set(row.tolist())) == 3 for row in picked)


def test_a_clamp_part_is_the_library_clamp_and_its_controls_have_its_size(sae):
    site = _site()
    gen = torch.Generator().manual_seed(4)
    features, targets = torch.randint(M, (2, 5, 3), generator=gen), 2 * torch.rand(2, 5, 3, generator=gen)
    concept = ScheduledConcept(features, targets, torch.tensor([0.0, 1.0]))
    part = Part(sae, clamp=concept, clamp_strength=0.5)
    h = torch.randn(2, 5, D)
    ctx = SiteContext(sigma=0.5, progress=0.8, cond=torch.tensor([False, True]), grid=None)
    out = Recipe({site: part}).functions(None)[site](h, ctx)
    assert torch.equal(out, clamp_steer_function(sae, concept, 0.5)(h, ctx))
    assert torch.equal(out[0], h[0]) and not torch.allclose(out[1], h[1])
    turned = random_direction_control(Recipe({site: part}), torch.Generator().manual_seed(0))
    moved = turned.functions(None)[site](h, ctx)
    edit, turned_edit = out - h, moved - h
    assert torch.allclose(turned_edit.norm(dim=-1), edit.norm(dim=-1), atol=1e-4)  # same size, token by token
    cosine = torch.nn.functional.cosine_similarity(turned_edit[1], edit[1], dim=-1)
    assert bool((cosine.abs() < 0.9).all())  # another direction
    drawn = random_features_control(Recipe({site: part}), torch.Generator().manual_seed(1), {site: torch.arange(M)})
    clamp = drawn.parts[site].clamp
    assert torch.equal(clamp.targets, targets) and not torch.equal(clamp.features, features)
    assert drawn.parts[site].clamp_strength == 0.5


def test_a_spatial_difference_of_means_adds_the_nearest_steps_vector_and_its_control_keeps_each_norm(sae):
    site = _site()
    vectors = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(5))
    part = Part(sae, step_vectors=vectors)
    h = torch.randn(2, 5, D)
    ctx = SiteContext(sigma=0.5, progress=0.5, cond=torch.tensor([False, True]), grid=None)
    out = Recipe({site: part}).functions(None)[site](h, ctx)
    assert torch.equal(out[0], h[0]) and torch.allclose(out[1] - h[1], vectors[1], atol=1e-6)
    turned = random_direction_control(Recipe({site: part}), torch.Generator().manual_seed(0)).parts[site]
    assert torch.allclose(turned.step_vectors.norm(dim=-1), vectors.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(turned.step_vectors, vectors)
