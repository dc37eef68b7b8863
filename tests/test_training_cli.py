"""`python -m training`: the headless loop on the committed model organism, its config files and its
answers to bad input."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sae_core import ShardReader, load_dictionary
from training.compat import apply_torchvision_workaround

apply_torchvision_workaround()
from training.__main__ import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SITE = "double_blocks.1:image"
SITE_DIR = "double_blocks.1-image"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command as a user types it, in a fresh process (so crashes and tracebacks are visible)."""
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def all_rows(directory: Path) -> dict[str, torch.Tensor]:
    """Every vector of a shard directory, in sample/step/token order (independent of shard boundaries)."""
    batches = list(ShardReader(directory, batch_size=10**9, shuffle=False, drop_last=False))
    rows = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    key = rows["sample_id"] * 10**9 + (rows["timestep"] * 10**6).round().long() * 1000 + rows["token"]
    order = torch.sort(key, stable=True).indices
    return {k: v[order] for k, v in rows.items()}


def samples_on_disk(directory: Path) -> list[int]:
    """The sample ids in a capture's finished shard files (read from the files, not the manifest, which a
    kill may leave one shard behind)."""
    ids: set[int] = set()
    for shard in directory.glob("shard_*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            ids.update(f.get_tensor("sample_id").tolist())
    return sorted(ids)


def shard_files(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Each finished shard's inode, modification time and content hash: all three stay equal only if
    nobody deleted, rewrote or replaced the file."""
    states = {}
    for shard in sorted(directory.glob("shard_*.safetensors")):
        stat = shard.stat()
        states[shard.name] = (stat.st_ino, stat.st_mtime_ns, hashlib.sha256(shard.read_bytes()).hexdigest())
    return states


LOGGED_GENERATE = """\
import sys
import training.runner
generate = training.runner.Runner.generate
def logged(self, prompts, seeds, **kwargs):
    print("generating seeds", *seeds, file=sys.stderr, flush=True)
    return generate(self, prompts, seeds, **kwargs)
training.runner.Runner.generate = logged
from training.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli_logging_generation(*args: str) -> tuple[subprocess.CompletedProcess, list[int]]:
    """``python -m training ARGS`` in a fresh process that reports each image it generates; returns the
    result and the seeds generated (with the default --seed 0, sample s is drawn from seed s)."""
    result = subprocess.run([sys.executable, "-c", LOGGED_GENERATE, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seeds = [int(s) for found in re.findall(r"generating seeds((?: \d+)+)", result.stderr) for s in found.split()]
    return result, seeds


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a handwritten seven\n\n# a comment line\na silhouette of a cat\nthe digit two, thin handwritten\n")
    return path


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> Path:
    """One capture shared by the tests that only read it: 3 prompts x 2 images x 20 steps x 64 tokens."""
    out = tmp_path_factory.mktemp("capture")
    (out / "p.txt").write_text("a handwritten seven\na silhouette of a cat\nthe digit two, thin handwritten\n")
    assert main(["capture", "--prompts", str(out / "p.txt"), "--sites", SITE, "single_blocks.0:image",
                 "--images-per-prompt", "2", "--shard-tokens", "2560", "--out", str(out / "acts")]) == 0
    return out


def test_capture_writes_one_shard_directory_per_site_with_every_step_and_token(captured: Path):
    for site in (SITE_DIR, "single_blocks.0-image"):
        reader = ShardReader(captured / "acts" / site, batch_size=64)
        assert reader.n_tokens == 6 * 20 * 64
        assert reader.d == 128
        manifest = json.loads((captured / "acts" / site / "manifest.json").read_text())
        assert manifest["extra"]["capture"]["prompts"][1] == "a silhouette of a cat"
    rows = all_rows(captured / "acts" / SITE_DIR)
    assert sorted(rows["sample_id"].unique().tolist()) == list(range(6))
    assert len(rows["timestep"].unique()) == 20


def test_capture_window_and_token_subsampling_shrink_the_capture(prompts: Path, tmp_path: Path):
    assert main(["capture", "--prompts", str(prompts), "--sites", SITE, "--window", "0", "0.5",
                 "--tokens-per-image", "16", "--out", str(tmp_path / "acts")]) == 0
    rows = all_rows(tmp_path / "acts" / SITE_DIR)
    steps = len(rows["timestep"].unique())
    assert 8 <= steps <= 12  # the first half of 20 steps
    assert rows["sample_id"].shape[0] == 3 * steps * 16
    assert float(rows["timestep"].min()) > 0.45  # early steps are the noisy ones


def test_train_eval_steer_and_atlas_run_on_the_capture(captured: Path, tmp_path: Path, capsys):
    shards = captured / "acts" / SITE_DIR
    dictionary = tmp_path / "topk.safetensors"
    assert main(["train", "--shards", str(shards), "--k", "8", "--latents", "256", "--train-steps", "60",
                 "--batch-size", "512", "--out", str(dictionary)]) == 0
    sae = load_dictionary(dictionary)
    assert (sae.d_in, sae.n_latents, sae.site.name) == (128, 256, SITE)
    assert dictionary.with_suffix(".curve.png").exists()

    assert main(["eval", "--dictionary", str(dictionary), "--shards", str(shards), "--model", "organism-flux",
                 "--prompts", str(captured / "p.txt"), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["held_out"]["fvu"] < 0.6 and report["held_out"]["l0"] <= 8
    assert report["substitution"]["substituted"]["pixel_mse"] < report["substitution"]["mean_ablated"]["pixel_mse"]
    assert Image.open(tmp_path / "eval" / "substitution.png").size[0] > 200

    grid = tmp_path / "steer.png"
    assert main(["steer", "--dictionary", str(dictionary), "--prompt", "a handwritten two", "--features", "3", "17",
                 "--strengths", "0", "0.5", "--windows", "all", "0-0.3", "--out", str(grid)]) == 0
    assert "4 rows x 2 strengths" in capsys.readouterr().out

    assert main(["atlas", "--dictionary", str(dictionary), "--prompts", str(captured / "p.txt"),
                 "--out", str(tmp_path / "atlas"), "--top-m", "3"]) == 0
    html = (tmp_path / "atlas" / "index.html").read_text()
    assert "a silhouette of a cat" in html and "http://" not in html


def test_itda_trains_from_the_same_shards(captured: Path, tmp_path: Path):
    out = tmp_path / "itda.safetensors"
    assert main(["train", "--shards", str(captured / "acts" / SITE_DIR), "--kind", "itda", "--k", "8",
                 "--train-steps", "10", "--batch-size", "512", "--out", str(out)]) == 0
    itda = load_dictionary(out)
    assert itda.n_latents > 0 and itda.site.name == SITE


def test_train_streams_from_the_pipeline_without_shards(prompts: Path, tmp_path: Path):
    out = tmp_path / "streamed.safetensors"
    assert main(["train", "--model", "organism-flux", "--prompts", str(prompts), "--site", SITE, "--k", "4",
                 "--latents", "64", "--train-steps", "5", "--batch-size", "256", "--out", str(out)]) == 0
    assert load_dictionary(out).n_latents == 64
    assert not list(tmp_path.glob("**/shard_*.safetensors"))


def test_config_file_sets_options_and_flags_override_it(captured: Path, tmp_path: Path):
    config = tmp_path / "train.toml"
    config.write_text(f'seed = 3\n[train]\nshards = "{captured / "acts" / SITE_DIR}"\nk = 4\nlatents = 96\n'
                      f'train-steps = 5\nbatch_size = 256\nout = "{tmp_path / "from_file.safetensors"}"\n')
    assert main(["train", "--config", str(config), "--latents", "80"]) == 0
    sae = load_dictionary(tmp_path / "from_file.safetensors")
    assert (sae.k, sae.n_latents) == (4, 80)

    json_config = tmp_path / "train.json"
    json_config.write_text(json.dumps({"train": {"shards": str(captured / "acts" / SITE_DIR), "kk": 4}}))
    assert main(["train", "--config", str(json_config)]) == 2


def test_config_errors_name_the_option(tmp_path: Path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nkind = \"pca\"\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "'pca' is not one of topk, batchtopk, itda" in capsys.readouterr().err
    bad.write_text("[train]\nk = \"many\"\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "option 'k'" in capsys.readouterr().err
    bad.write_text("[train\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("model, message", [
    ("no-such-owner/no-such-model", "could not load the model 'no-such-owner/no-such-model'"),
    ("./models/missing-folder", "no such folder: ./models/missing-folder"),
])
def test_unknown_model_or_missing_folder_is_one_clear_line(model: str, message: str, prompts: Path, tmp_path: Path):
    result = run_cli("capture", "--model", model, "--prompts", str(prompts), "--sites", SITE, "--out", str(tmp_path / "a"),
                     timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()


def test_a_folder_that_is_not_a_pipeline_is_refused(tmp_path: Path, prompts: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["capture", "--model", str(tmp_path / "empty"), "--prompts", str(prompts), "--sites", SITE]) == 2
    assert "has no model_index.json" in capsys.readouterr().err


def test_a_site_the_model_lacks_lists_the_ones_it_has(prompts: Path, tmp_path: Path, capsys):
    assert main(["capture", "--prompts", str(prompts), "--sites", "double_blocks.7:image", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown site double_blocks.7:image for this flux model; available sites: " in err
    assert "double_blocks.1:image" in err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
    (b"a handwritten seven\n\xff\xfe broken\n", "is not UTF-8 text (line 2)"),
    (b"a handwritten seven\nthe digit\x07 two\n", "control characters in line(s) 2"),
    (b"\n\n   \n# only comments\n", "holds no prompts"),
    (b"!!!\n...\n", "holds no prompts"),
])
def test_garbage_prompt_files_are_refused_before_any_work(content: bytes, message: str, tmp_path: Path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    assert main(["capture", "--prompts", str(path), "--sites", SITE, "--out", str(tmp_path / "a")]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path).glob("a/**/shard_*"))


@pytest.mark.parametrize("subsample", [[], ["--tokens-per-image", "16"]], ids=["all tokens", "token subsets"])
def test_a_full_disk_keeps_the_whole_shards_and_the_rerun_generates_only_the_missing_samples(
        subsample: list[str], prompts: Path, tmp_path: Path, monkeypatch, capsys):
    import sae_core.atomic as atomic
    from training.runner import Runner

    shard_tokens = "320" if subsample else "1280"  # one sample (20 steps) per shard either way
    args = ["capture", "--prompts", str(prompts), "--sites", SITE, "--shard-tokens", shard_tokens, "--batch-size", "1",
            *subsample]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0

    real_generate, generated = Runner.generate, []

    def counting_generate(self, prompts, seeds, **kwargs):
        generated.extend(seeds)
        return real_generate(self, prompts, seeds, **kwargs)

    real_save, calls = atomic.save_file, []

    def save_until_full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 2:  # the third shard meets a full disk half-way through
            Path(path).write_bytes(b"\x00" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(Runner, "generate", counting_generate)
    monkeypatch.setattr(atomic, "save_file", save_until_full)
    assert main([*args, "--out", str(tmp_path / "full")]) == 2
    assert "disk full" in capsys.readouterr().err
    assert generated == [0, 1, 2]  # the run stopped at the third (last) sample's shard
    directory = tmp_path / "full" / SITE_DIR
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "shard_00000.safetensors", "shard_00001.safetensors"]
    assert samples_on_disk(directory) == [0, 1]
    finished = shard_files(directory)

    monkeypatch.setattr(atomic, "save_file", real_save)
    generated.clear()
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    assert generated == [2]  # the rerun made only the sample the disk had no room for
    after = shard_files(directory)
    assert {name: after.get(name) for name in finished} == finished  # the finished shards were left alone
    assert sorted(after) == ["shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    clean, resumed = all_rows(tmp_path / "clean" / SITE_DIR), all_rows(directory)
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key


def _kill_when(process: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_capture_killed_midway_keeps_its_shards_and_the_rerun_generates_only_the_rest(prompts: Path, tmp_path: Path):
    args = ["capture", "--prompts", str(prompts), "--sites", SITE, "--images-per-prompt", "3",
            "--shard-tokens", "1280", "--batch-size", "1"]  # 9 samples, one per shard
    # The reference runs in its own process too: this test process may hold ComfyUI, whose import
    # changes torch's numerics settings, so only process-to-process results compare bit for bit.
    assert run_cli(*args, "--out", str(tmp_path / "clean")).returncode == 0
    killed = tmp_path / "killed" / SITE_DIR
    process = subprocess.Popen([sys.executable, "-m", "training", *args, "--out", str(tmp_path / "killed")], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(process, lambda: len(list(killed.glob("shard_*.safetensors"))) >= 3)
    stored = samples_on_disk(killed)
    assert 3 <= len(stored) < 9 and stored == list(range(len(stored))), stored  # killed midway, samples in order
    finished = shard_files(killed)

    result, generated = run_cli_logging_generation(*args, "--out", str(tmp_path / "killed"))
    assert result.returncode == 0, result.stderr
    assert generated == list(range(len(stored), 9))  # it continued at the first sample not on disk
    after = shard_files(killed)
    assert {name: after.get(name) for name in finished} == finished  # the killed run's shards were left alone
    assert len(after) == 9
    clean, resumed = all_rows(tmp_path / "clean" / SITE_DIR), all_rows(killed)
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key


def test_a_capture_with_other_settings_is_not_mixed_into_an_old_one(prompts: Path, tmp_path: Path, capsys):
    out = tmp_path / "acts"
    assert main(["capture", "--prompts", str(prompts), "--sites", SITE, "--tokens-per-image", "8", "--out", str(out)]) == 0
    assert main(["capture", "--prompts", str(prompts), "--sites", SITE, "--tokens-per-image", "4", "--out", str(out)]) == 2
    assert "tokens_per_image differ" in capsys.readouterr().err


def test_training_killed_midway_resumes_and_ends_where_an_unbroken_run_ends(captured: Path, tmp_path: Path):
    args = ["train", "--shards", str(captured / "acts" / SITE_DIR), "--k", "8", "--latents", "256",
            "--train-steps", "400", "--batch-size", "256", "--checkpoint-every", "20"]
    # A reference from its own process, as in the capture test: this process may hold ComfyUI.
    assert run_cli(*args, "--out", str(tmp_path / "clean.safetensors")).returncode == 0
    out = tmp_path / "killed.safetensors"
    checkpoint = tmp_path / "killed.checkpoint" / "checkpoint.safetensors"
    process = subprocess.Popen([sys.executable, "-m", "training", *args, "--out", str(out)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(process, checkpoint.exists)
    assert not out.exists()
    result = run_cli(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "resumed from step" in result.stdout
    clean, resumed = load_dictionary(tmp_path / "clean.safetensors"), load_dictionary(out)
    for (name, a), (_, b) in zip(clean.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_torchrun_trains_on_two_processes_with_gloo(captured: Path, tmp_path: Path):
    out = tmp_path / "ddp.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "training", "train", "--shards", str(captured / "acts" / SITE_DIR), "--k", "8", "--latents", "128",
         "--train-steps", "30", "--batch-size", "256", "--device", "cpu", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2" in result.stdout
    assert result.stdout.count("dictionary written to") == 1
    assert load_dictionary(out).n_latents == 128


def test_a_dictionary_used_at_a_site_of_another_width_is_refused(captured: Path, tmp_path: Path, capsys):
    dictionary = tmp_path / "topk.safetensors"
    assert main(["train", "--shards", str(captured / "acts" / SITE_DIR), "--k", "4", "--latents", "64",
                 "--train-steps", "3", "--batch-size", "256", "--out", str(dictionary)]) == 0
    assert main(["steer", "--dictionary", str(dictionary), "--prompt", "a handwritten two", "--features", "1",
                 "--site", "double_blocks.1:text", "--out", str(tmp_path / "s.png")]) == 0  # same width: fine
    wide = tmp_path / "wide.safetensors"
    from sae_core import SparseAutoencoder, Site, save_dictionary

    save_dictionary(SparseAutoencoder(256, 64, 4, site=Site("flux", "double_blocks.1", "image")), wide)
    assert main(["steer", "--dictionary", str(wide), "--prompt", "a handwritten two", "--features", "1",
                 "--out", str(tmp_path / "w.png")]) == 2
    assert "256" in capsys.readouterr().err


def test_real_images_are_captured_once_per_noise_level_and_resume(tmp_path: Path, capsys):
    from organism.data import mnist_digits

    digits, _ = mnist_digits()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(digits[i]).save(folder / f"digit_{i}.png")
    (folder / "notes.txt").write_text("not an image, skipped")
    args = ["capture", "--images", str(folder), "--sites", SITE, "--image-levels", "0.3", "0.7", "--out", str(tmp_path / "a")]
    assert main(args) == 0
    rows = all_rows(tmp_path / "a" / SITE_DIR)
    assert rows["sample_id"].tolist() == [0] * 128 + [1] * 128 + [2] * 128
    assert len(rows["timestep"].unique()) == 2
    assert main(args) == 0  # a rerun finds everything captured and adds nothing
    assert all_rows(tmp_path / "a" / SITE_DIR)["sample_id"].shape[0] == 3 * 2 * 64

    (folder / "digit_3.png").write_bytes(b"garbage, not a png")
    assert main([*args[:-1], str(tmp_path / "b")]) == 2
    assert "digit_3.png is not a readable image" in capsys.readouterr().err
    assert main(["capture", "--images", str(tmp_path / "nowhere"), "--sites", SITE]) == 2
    assert "image folder" in capsys.readouterr().err


def test_a_local_stable_diffusion_folder_is_captured_trained_on_and_steered(tmp_path: Path, prompts: Path):
    from tiny_diffusers_pipelines import tiny_sd_pipeline_folder

    folder = tiny_sd_pipeline_folder(tmp_path / "models")
    common = ["--model", str(folder), "--sample-steps", "3"]
    assert main(["capture", *common, "--prompts", str(prompts), "--sites", "up_blocks.1:residual", "mid_block:residual",
                 "--out", str(tmp_path / "acts")]) == 0
    from diffusers import UNet2DConditionModel

    from training.adapters import resolve_site

    # shards are stored under the site's canonical (ComfyUI) name, whichever runtime's name was asked for
    canonical = resolve_site(UNet2DConditionModel.from_pretrained(folder / "unet"), "up_blocks.1:residual").name
    assert canonical.startswith("output_blocks.")
    shards = tmp_path / "acts" / canonical.replace(":", "-")
    rows = all_rows(shards)
    assert rows["activations"].shape == (3 * 3 * 64, 32)  # 3 prompts x 3 steps x an 8x8 map of 32 channels
    assert len(rows["timestep"].unique()) == 3 and float(rows["timestep"].max()) > 1  # DDPM sigmas
    dictionary = tmp_path / "sd.safetensors"
    assert main(["train", "--shards", str(shards), "--k", "4", "--latents", "64",
                 "--train-steps", "5", "--batch-size", "64", "--out", str(dictionary)]) == 0
    assert main(["steer", *common, "--dictionary", str(dictionary), "--prompt", "a cat", "--features", "1",
                 "--strengths", "0", "1", "--out", str(tmp_path / "steer.png")]) == 0
    assert Image.open(tmp_path / "steer.png").size[0] > 2 * 96
