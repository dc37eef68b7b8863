"""``python -m training capture`` / streaming ``train`` on a video pipeline: a tiny random-weight WanPipeline
folder (see ``tiny_diffusers_pipelines``), loaded by diffusers' own ``from_pretrained`` as a user's would be.

The tiny pipeline generates 5 frames of 32 x 48 pixels (Wan's VAE: 2 latent frames of 4 x 6, patch 2: a
2 frames x 2 rows x 3 cols token grid, not square, so a transposed grid or a lost frame changes the counts).
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sae_core import ShardReader, load_dictionary
from training.compat import apply_torchvision_workaround

apply_torchvision_workaround()  # diffusers -> transformers -> torchvision

import training.runner  # noqa: E402
from training.__main__ import main  # noqa: E402
from training.runner import VideoSize  # noqa: E402

FRAMES, ROWS, COLS, WIDTH, STEPS = 2, 2, 3, 32, 3
PROMPTS = ["a red fox in the snow", "waves on a beach", "a city street at night"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_diffusers_pipelines import tiny_wan_pipeline_folder

    return tiny_wan_pipeline_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture
def tiny_wan_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny clip (5 frames, 32 x 48) in 3 steps instead of Wan's 17 frames at 480 x 832 in 50.

    Without the ``accelerate`` package (this venv), diffusers 0.42 refuses to load any model that lists
    ``_keep_in_fp32_modules``, as Wan's transformer does; at float32 that list changes nothing, so it is
    cleared here. With accelerate installed the folder loads as it is."""
    spec = training.runner.DEFAULTS["WanPipeline"]
    monkeypatch.setitem(training.runner.DEFAULTS, "WanPipeline", replace(spec, steps=STEPS, video=VideoSize(5, 32, 48)))
    if importlib.util.find_spec("accelerate") is None:
        from diffusers import WanTransformer3DModel

        monkeypatch.setattr(WanTransformer3DModel, "_keep_in_fp32_modules", None)


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_capture_on_a_wan_folder_stores_every_frame_token_of_every_step(wan_folder: Path, prompts: Path,
                                                                        tmp_path: Path, tiny_wan_runs: None):
    from diffusers import UniPCMultistepScheduler

    assert main(["capture", "--model", str(wan_folder), "--prompts", str(prompts), "--sites", "blocks.0:image",
                 "--out", str(tmp_path / "acts")]) == 0
    batches = list(ShardReader(tmp_path / "acts" / "blocks.0-image", batch_size=10**9, shuffle=False, drop_last=False))
    rows = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
    tokens = FRAMES * ROWS * COLS
    assert rows["activations"].shape == (len(PROMPTS) * STEPS * tokens, WIDTH)  # cond rows only: CFG's uncond call dropped
    assert torch.isfinite(rows["activations"].float()).all()
    assert sorted(rows["sample_id"].tolist()) == sorted(list(range(len(PROMPTS))) * STEPS * tokens)
    assert sorted(set(rows["token"].tolist())) == list(range(tokens))
    scheduler = UniPCMultistepScheduler.from_pretrained(wan_folder / "scheduler")
    scheduler.set_timesteps(STEPS)
    sigmas = torch.sort(rows["timestep"].float().unique(), descending=True).values
    assert torch.allclose(sigmas, scheduler.sigmas[:STEPS].float(), atol=2e-3)  # the timestep / 1000 of each step


def test_train_streams_from_a_wan_folder(wan_folder: Path, prompts: Path, tmp_path: Path, tiny_wan_runs: None):
    out = tmp_path / "wan.safetensors"
    assert main(["train", "--model", str(wan_folder), "--prompts", str(prompts), "--site", "blocks.1:image", "--k", "2",
                 "--latents", "16", "--train-steps", "2", "--batch-size", "16", "--init-tokens", "32", "--out", str(out)]) == 0
    dictionary = load_dictionary(out)
    assert (dictionary.n_latents, dictionary.site.name, dictionary.site.extra["d"]) == (16, "blocks.1:image", WIDTH)


def test_list_sites_names_the_wan_blocks(wan_folder: Path, tiny_wan_runs: None, capsys: pytest.CaptureFixture):
    assert main(["capture", "--model", str(wan_folder), "--list-sites"]) == 0
    listed = capsys.readouterr().out.split("\n")[:-1]
    assert listed[0].startswith("context:text  (d=")  # the prompt's tokens, as wide as the text encoder's
    assert listed[1:] == [f"blocks.{i}:{stream}  (d={WIDTH})" for i in range(2) for stream in ("image", "update")]


def test_commands_that_read_pictures_refuse_a_video_pipeline_before_any_work(wan_folder: Path, prompts: Path,
                                                                              tmp_path: Path, tiny_wan_runs: None,
                                                                              capsys: pytest.CaptureFixture):
    dictionary = tmp_path / "wan.safetensors"
    assert main(["train", "--model", str(wan_folder), "--prompts", str(prompts), "--site", "blocks.0:image", "--k", "2",
                 "--latents", "16", "--train-steps", "1", "--batch-size", "16", "--init-tokens", "16",
                 "--out", str(dictionary)]) == 0
    capsys.readouterr()
    assert main(["atlas", "--dictionary", str(dictionary), "--model", str(wan_folder), "--prompts", str(prompts),
                 "--out", str(tmp_path / "atlas")]) == 2
    assert "atlas needs an image pipeline" in capsys.readouterr().err
    assert not (tmp_path / "atlas").exists()
