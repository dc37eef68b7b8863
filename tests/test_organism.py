"""The model organism: real data from PyPI packages, a real sentence encoder, and committed Flux and U-Net
denoisers that draw the class they are asked for, as judged by a classifier trained on the real images."""
from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from training.compat import apply_torchvision_workaround

apply_torchvision_workaround()
from organism import WEIGHTS  # noqa: E402
from organism.classifier import accuracy, classify_outputs, load_classifier  # noqa: E402
from organism.data import CLASSES, _load_numpy_pickle, class_prompt, load_dataset, organism_data, stroke_and_slant  # noqa: E402
from organism.text import shared_encoder  # noqa: E402
from training.organism_fit import FitConfig, fit  # noqa: E402
from training.runner import load_runner  # noqa: E402


@pytest.fixture(scope="module")
def dataset():
    return load_dataset()


def test_the_data_is_real_digits_and_silhouettes_with_captions_naming_the_class(dataset):
    assert len(dataset) == 15_000
    assert dataset.images.shape == (15_000, 1, 32, 32)
    assert dataset.images.min() == -1 and dataset.images.max() == 1
    counts = torch.bincount(dataset.labels, minlength=len(CLASSES))
    assert counts[:10].tolist() == [500] * 10 and counts[10:].tolist() == [1000] * 10
    for i in (0, 4_999, 5_000, 14_999):
        assert CLASSES[int(dataset.labels[i])] in dataset.captions[i]
    assert any("thick" in c for c in dataset.captions) and any("slanted left" in c for c in dataset.captions)


def test_slant_and_stroke_weight_read_what_a_person_sees():
    image = np.zeros((28, 28), np.uint8)
    for row in range(4, 24):  # a stroke leaning right: higher rows sit further right
        image[row, 20 - row // 2: 22 - row // 2] = 255
    ink, slant = stroke_and_slant(image)
    assert slant > 0.25 and 0 < ink < 0.1
    assert stroke_and_slant(image[:, ::-1].copy())[1] < -0.25


def test_the_data_pickle_reader_builds_arrays_and_nothing_else(tmp_path: Path):
    safe = tmp_path / "safe.gz"
    safe.write_bytes(gzip.compress(pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3))))
    assert _load_numpy_pickle(safe).tolist() == [[0, 1, 2], [3, 4, 5]]

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(Exploit())))
    with pytest.raises(pickle.UnpicklingError, match="refusing builtins.print"):
        _load_numpy_pickle(evil)


def test_the_sentence_encoder_is_deterministic_and_batch_independent():
    encoder = shared_encoder()
    alone = encoder(["a handwritten seven"])
    batch = encoder(["a silhouette of a giraffe", "a handwritten seven", ""])
    assert torch.equal(alone.tokens[0], batch.tokens[1]) and torch.equal(alone.pooled[0], batch.pooled[1])
    assert batch.tokens.shape == (3, 16, 384)
    assert batch.tokens[0, 10:].abs().sum() == 0  # padding is zero
    seven, giraffe = encoder(["the digit seven"]).pooled[0], batch.pooled[0]
    assert float(seven @ alone.pooled[0]) > float(giraffe @ alone.pooled[0])  # it reads meaning


def test_the_committed_classifier_recognises_held_out_real_images():
    _, held_out = organism_data()
    assert accuracy(load_classifier(), held_out) >= 0.93


@pytest.mark.parametrize("model", ["organism-flux", "organism-unet"])
def test_each_organism_draws_the_class_it_is_prompted_for(model: str):
    runner = load_runner(model)
    classifier = load_classifier()
    classes = list(range(len(CLASSES)))
    images = runner.generate([class_prompt(c) for c in classes for _ in range(2)], seeds=list(range(40)))
    predicted = classify_outputs(classifier, images)
    agreement = float((predicted == torch.tensor([c for c in classes for _ in range(2)])).float().mean())
    assert agreement >= 0.5, f"{model}: only {agreement:.2f} of samples show the prompted class (chance 0.05)"


def test_a_sample_depends_only_on_its_prompt_and_seed():
    runner = load_runner("organism-flux")
    alone = runner.generate(["a handwritten three"], seeds=[7])
    batch = runner.generate(["a silhouette of a cow", "a handwritten three"], seeds=[1, 7])
    assert torch.allclose(alone[0], batch[1], atol=1e-4)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)


def test_organism_weights_are_small_enough_to_commit():
    total = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert total < 10 * 2**20


def test_organism_training_resumes_after_a_stop_exactly(dataset, tmp_path: Path):
    small = dataset.subset(torch.arange(0, 15_000, 500))
    config = FitConfig(kind="unet", steps=4, batch_size=4, warmup=2, checkpoint_every=2)
    straight = fit(small, config, tmp_path / "straight")
    fit(small, FitConfig(**{**config.__dict__, "steps": 2}), tmp_path / "stopped")
    # the stop happened at a checkpoint; the second run picks up from it with the full schedule
    state = torch.load(tmp_path / "stopped" / "unet_checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    resumed = fit(small, config, tmp_path / "stopped")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_organism_command_rebuilds_a_loadable_pipeline_folder(tmp_path: Path):
    from training.__main__ import main

    out = tmp_path / "weights"
    assert main(["organism", "--kinds", "flux", "--train-steps", "2", "--batch-size", "4", "--skip-classifier",
                 "--out", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    record = json.loads((out / "flux_training.json").read_text())
    assert record["config"]["steps"] == 2 and record["history"][-1]["step"] == 2
    assert (out / "flux_samples.png").exists()
    runner = load_runner(str(out / "flux"))
    assert runner.kind == "OrganismFluxPipeline"
    assert runner.generate(["a handwritten one"], seeds=[0]).shape == (1, 1, 32, 32)


def test_a_rebuilt_classifier_is_saved_where_the_loader_finds_it(dataset, tmp_path: Path):
    from training.organism_build import fit_and_report

    small = dataset.subset(torch.arange(0, 15_000, 50))
    report = fit_and_report(small, small, tmp_path)
    assert 0 <= report["held_out_accuracy"] <= 1
    assert round(accuracy(load_classifier(tmp_path), small), 4) == report["held_out_accuracy"]
