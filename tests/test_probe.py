"""Diff-C (Revelio's probe): a fair split, a probe that reads separable classes and not noise, a table that survives
its file, and `python -m training probe` on the model organism."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_core import InputError
from sae_core.plots import heatmap_chart
from sae_core.probe import ProbeTable, pooled, probe_accuracy, stratified_split
from training.compat import apply_torchvision_workaround

apply_torchvision_workaround()
from training.__main__ import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SITES = ("double_blocks.1:image", "single_blocks.1:text")


@pytest.fixture(autouse=True)
def one_thread():
    """The organism's denoiser calls are tiny: on a shared 2-core CI machine, two threads waiting on each other
    make them ten times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_split_keeps_each_classes_proportion_and_is_seeded():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 7)
    train, test = stratified_split(labels, test_fraction=0.5, seed=3)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(len(labels)))  # every image once, on one side
    assert labels[test].bincount().tolist() == [5, 2, 4]  # round(0.5 x 7) = 4: each class split alike
    again = stratified_split(labels, test_fraction=0.5, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    assert not torch.equal(stratified_split(labels, test_fraction=0.5, seed=4)[1], test)
    pairs = torch.tensor([0, 0, 1, 1])
    assert pairs[stratified_split(pairs, test_fraction=0.9)[0]].tolist() == [0, 1]  # each class keeps one to train on


def test_a_class_with_one_example_cannot_be_split():
    with pytest.raises(InputError, match="class 2 has 1 example"):
        stratified_split(torch.tensor([0, 0, 1, 1, 2]))


def test_the_probe_reads_separable_classes_and_not_shuffled_labels():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(40)
    features = 4.0 * torch.randn(5, 32, generator=gen)[labels] + torch.randn(200, 32, generator=gen) + 100.0
    train, test = stratified_split(labels)
    assert probe_accuracy(features[train], labels[train], features[test], labels[test], 5) == 1.0
    shuffled = labels[torch.randperm(200, generator=gen)]
    chance_level = probe_accuracy(features[train], shuffled[train], features[test], shuffled[test], 5)
    assert 0.05 <= chance_level <= 0.35  # chance is 0.2
    assert chance_level == probe_accuracy(features[train], shuffled[train], features[test], shuffled[test], 5)


def test_the_probe_refuses_labels_outside_its_classes():
    with pytest.raises(InputError, match="labels must lie in 0..2"):
        probe_accuracy(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.randn(2, 3), torch.tensor([0, 1]), 3)


def test_pooling_is_the_mean_over_tokens():
    h = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]], dtype=torch.float16)
    assert pooled(h).tolist() == [[2.0, 4.0]] and pooled(h).dtype == torch.float32


def test_a_table_survives_its_json_and_names_its_best_cell():
    table = ProbeTable(["a:image", "b:text"], [0.1, 0.9], torch.tensor([[0.2, 0.8], [0.85, 0.3]]), 0.05, 200, 200)
    assert table.best() == ("b:text", 0.1, pytest.approx(0.85))
    again = ProbeTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again.to_json() == table.to_json() and again.best() == table.best()
    assert "| b:text | **0.850** | 0.300 |" in table.markdown()
    with pytest.raises(InputError, match="needs the fields"):
        ProbeTable.from_json({"sites": ["a"]})
    with pytest.raises(InputError, match="2 sites x 2 levels"):
        ProbeTable.from_json({**table.to_json(), "accuracy": [[0.1, 0.2]]})


def test_the_heatmap_is_a_picture_with_room_for_every_cell():
    table = ProbeTable([f"single_blocks.{i}:image" for i in range(12)], [0.1, 0.3, 0.5, 0.7, 0.9],
                       torch.rand(12, 5, generator=torch.Generator().manual_seed(0)), 0.05, 400, 400)
    picture = table.heatmap("Diff-C")
    assert picture.mode == "RGB" and picture.width >= 500 and picture.height >= 12 * 25
    blank = heatmap_chart([[float("nan"), 1.0]], ["row"], ["a", "b"], "with a gap", "x", "y")
    assert blank.width > 300


def test_batched_denoising_gives_each_image_what_it_gets_alone():
    from training.runner import load_runner

    runner = load_runner("organism-flux")
    site = runner.site(SITES[0])
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen: list[torch.Tensor] = []

    def keep(h, ctx):
        seen.append(pooled(h))
        return h

    runner.denoise_batch(images, "", 0.5, [7, 8, 9], {site: keep})
    for i, seed in enumerate((7, 8, 9)):
        runner.denoise_once(images[i:i + 1], "", 0.5, seed, {site: keep})
    assert torch.allclose(seen[0], torch.cat(seen[1:]), atol=1e-5)


def test_the_probe_command_writes_its_table_heatmap_and_json(tmp_path: Path, capsys):
    dictionary = REPO / "models" / "sae" / "organism_flux_db1_image.safetensors"
    out = tmp_path / "probe"
    code = main(["probe", "--model", "organism-flux", "--sites", *SITES, "--levels", "0.3", "0.9", "--per-class", "2",
                 "--dictionary", str(dictionary), "--device", "cpu", "--out", str(out)])
    assert code == 0
    table = ProbeTable.from_json(json.loads((out / "diffc.json").read_text()))
    assert table.sites == [*SITES, "double_blocks.1:image codes"] and table.levels == [0.3, 0.9]
    assert (table.n_train, table.n_test, table.chance) == (20, 20, 0.05)  # 1 + 1 of each of the 20 classes
    assert ((table.accuracy >= 0) & (table.accuracy <= 1)).all()
    assert (out / "diffc.md").read_text().startswith("| site | 0.3 | 0.9 |")
    assert (out / "diffc.png").stat().st_size > 1000
    assert "best: " in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--levels", "1.5"], "argument --levels: must be at most 1, not 1.5"),
    (["--levels", "0.5", "0.5"], "--levels: each value once"),
    (["--sites", "all", "double_blocks.1:image"], "give 'all' alone"),
    (["--per-class", "1"], "argument --per-class: must be at least 2"),
    (["--sites", "no_block.7:image"], "no_block.7:image"),
])
def test_a_bad_setting_is_one_line_and_exit_code_2(flags, message, tmp_path: Path, capsys):
    assert main(["probe", "--levels", "0.5", "--out", str(tmp_path / "probe"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "probe").exists()


def test_pipelines_other_than_the_organism_are_refused(tmp_path: Path, capsys):
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert main(["probe", "--model", str(folder), "--out", str(tmp_path / "probe")]) == 2
    assert "probe runs on the organism pipelines" in capsys.readouterr().err
