"""Training: learns, survives bad batches and kills, and resumes to the same result."""
import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sae_core import atomic
from sae_core.config import DictionaryConfig, TrainConfig
from sae_core.errors import ConfigError, TrainingError, WriteError
from sae_core.metrics import evaluate
from sae_core.synthetic import superposition_data
from sae_core.train import CHECKPOINT_NAME, train_dictionary

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    return superposition_data(n_samples=6000, d=16, n_features=64, mean_l0=3, seed=0).x


def small_config(**overrides):
    base = dict(k=4, n_latents=64, total_steps=60, batch_size=256, warmup_steps=5, lr=3e-3,
                dead_tokens=2000, log_every=10, checkpoint_every=20)
    base.update(overrides)
    return TrainConfig.from_dict(base)  # the flat form: the dictionary's options by name among the others


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_training_reduces_reconstruction_error(data, kind):
    result = train_dictionary(data, small_config(kind=kind, total_steps=150))
    first, last = result.history[0]["fvu"], result.history[-1]["fvu"]
    assert last < 0.5 * first
    assert evaluate(result.dictionary, data[:1000])["fvu"] < 0.35


def test_batchtopk_learns_a_threshold_that_gives_about_k_at_inference(data):
    result = train_dictionary(data, small_config(kind="batchtopk", total_steps=150))
    assert float(result.dictionary.threshold[0]) > 0
    assert 2 <= evaluate(result.dictionary, data[:1000])["l0"] <= 8


def test_itda_grows_a_dictionary_through_the_same_loop(data):
    result = train_dictionary(data, small_config(kind="itda", k=4, total_steps=20, loss_threshold=0.2))
    assert result.dictionary.n_latents > 0
    assert evaluate(result.dictionary, data[:500])["fvu"] < 0.5


def test_nan_and_inf_batches_are_rejected_counted_and_logged(data, caplog):
    batches = [data[i:i + 200] for i in range(0, 2000, 200)]
    batches[3] = batches[3].clone()
    batches[3][5, 2] = float("nan")
    batches[6] = batches[6].clone()
    batches[6][0, 0] = float("inf")
    with caplog.at_level(logging.WARNING, logger="sae_core.train"):
        result = train_dictionary(batches, small_config(total_steps=8, log_every=1))  # one pass
    assert result.rejected_batches == 2
    assert sum("rejected batch" in r.message for r in caplog.records) == 2
    assert result.history[-1]["rejected_batches"] == 2
    assert all(torch.isfinite(p).all() for p in result.dictionary.parameters())


def test_a_nan_row_in_every_batch_ends_training_with_an_error_instead_of_looping(data):
    poisoned = data.clone()
    poisoned[::50, 0] = float("nan")  # a damaged shard's rows, shuffled into every batch of 256
    with pytest.raises(TrainingError, match=r"100 of the 10\d batches drawn contained NaN or inf"):
        train_dictionary(poisoned, small_config(total_steps=10_000, checkpoint_every=10_000))


def test_all_nan_data_from_a_stream_is_an_error_not_an_endless_init(data):
    def batches():  # re-iterable: the trainer may pass over it again and again
        return iter([torch.full((200, 16), float("nan"))] * 3)

    with pytest.raises(TrainingError, match="no finite activations"):
        train_dictionary(batches, small_config(total_steps=10))


def test_a_few_rejected_batches_among_good_ones_do_not_stop_training(data):
    batches = [data[i:i + 100] for i in range(0, 6000, 100)]
    for i in range(0, 60, 2):  # every other batch is damaged: half are rejected, and training goes on
        batches[i] = torch.full_like(batches[i], float("nan"))
    result = train_dictionary(lambda: iter(batches), small_config(total_steps=200, log_every=50))
    assert result.history[-1]["step"] == 200 and result.rejected_batches >= 100


def test_training_from_a_callable_stream_passes_over_the_data_again(data):
    calls = []

    def batches():
        calls.append(1)
        return (data[i:i + 500] for i in range(0, 1500, 500))

    result = train_dictionary(batches, small_config(total_steps=7))
    assert result.history[-1]["step"] == 7
    assert len(calls) >= 3


def test_one_shot_iterator_stops_when_exhausted(data):
    it = iter([data[:300], data[300:600]])
    result = train_dictionary(it, small_config(total_steps=50, log_every=1))
    assert result.history[-1]["step"] == 2


def test_progress_callback_sees_every_step(data):
    seen = []
    train_dictionary(data, small_config(total_steps=12), progress=lambda s, t, m: seen.append((s, t)))
    assert seen == [(s, 12) for s in range(1, 13)]


def test_divergence_is_a_clear_error_and_writes_no_checkpoint(tmp_path):
    x = torch.randn(512, 8) * 1e25  # squares overflow float32
    with pytest.raises(TrainingError, match="diverged at step 0"):
        config = TrainConfig(DictionaryConfig(k=2, n_latents=16, normalization="none"), total_steps=5, batch_size=64)
        train_dictionary(x, config, checkpoint_dir=tmp_path)
    assert not list(tmp_path.iterdir())



class Killed(Exception):
    """Stands for a kill mid-run: raised from the progress callback."""


def killed_at(step: int):
    """A progress callback that kills the run when it reports ``step``."""
    def progress(current, total, metrics):
        if current == step:
            raise Killed
    return progress

def test_resume_gives_identical_results_to_an_uninterrupted_run(data, tmp_path):
    config = small_config(total_steps=40)
    full = train_dictionary(data, config).dictionary

    with pytest.raises(Killed):
        train_dictionary(data, config, checkpoint_dir=tmp_path, progress=killed_at(25))
    resumed = train_dictionary(data, config, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 20
    for (name, a), b in zip(full.state_dict().items(), resumed.dictionary.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_after_sigkill_continues_from_the_last_checkpoint(data, tmp_path):
    torch.save(data, tmp_path / "data.pt")
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from sae_core.config import TrainConfig
        from sae_core.train import train_dictionary
        data = torch.load({str(tmp_path / 'data.pt')!r}, weights_only=True)
        def kill(step, total, metrics):
            if step == 30:
                os.kill(os.getpid(), signal.SIGKILL)
        train_dictionary(data, TrainConfig.from_dict({small_config(total_steps=40).to_dict()!r}),
                         checkpoint_dir={str(tmp_path / 'ckpt')!r}, progress=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["checkpoint.safetensors"]  # no temp files left

    resumed = train_dictionary(data, small_config(total_steps=40), checkpoint_dir=tmp_path / "ckpt")
    full = train_dictionary(data, small_config(total_steps=40)).dictionary
    assert resumed.resumed_from_step == 20
    assert torch.equal(resumed.dictionary.W_dec, full.W_dec)


def test_a_full_disk_at_a_checkpoint_is_a_write_error_and_the_previous_checkpoint_still_resumes(data, tmp_path,
                                                                                                 monkeypatch):
    config = small_config(total_steps=20, checkpoint_every=10)  # checkpoints at steps 10 and 20
    real_save, before = atomic.save_file, []

    def disk_full_at_step_20(tensors, path, metadata=None):
        if (tmp_path / CHECKPOINT_NAME).exists():
            before.append((tmp_path / CHECKPOINT_NAME).read_bytes())
            Path(path).write_bytes(b"half a checkpoint")  # as safetensors reports a failed write: its own error
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(atomic, "save_file", disk_full_at_step_20)
    with pytest.raises(WriteError, match="disk full while writing .*checkpoint.safetensors: free some space"):
        train_dictionary(data, config, checkpoint_dir=tmp_path)
    monkeypatch.setattr(atomic, "save_file", real_save)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temp file left
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before[0]
    resumed = train_dictionary(data, config, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 10
    assert torch.equal(resumed.dictionary.W_dec, train_dictionary(data, config).dictionary.W_dec)


LEGACY_CHECKPOINT_CONFIG = {
    "kind": "topk", "k": 4, "n_latents": 64, "expansion_factor": 16, "normalization": "scale",
    "b_dec_init": "geometric_median", "total_steps": 40, "batch_size": 256, "lr": 0.003, "betas": [0.9, 0.999],
    "warmup_steps": 5, "decay_fraction": 0.2, "grad_clip": 1.0, "auxk": None, "auxk_coef": 0.03125,
    "dead_tokens": 2000, "threshold_momentum": 0.99, "loss_threshold": 0.3, "max_atoms": 50000, "init_tokens": 16384,
    "seed": 0, "log_every": 10, "checkpoint_every": 20, "device": "cpu", "compute_dtype": "float32",
}
"""small_config(total_steps=40) as checkpoints stored it before the dictionary's options moved into DictionaryConfig."""


def _rewrite_checkpoint_config(path: Path, config: dict) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta["state"])
    state["config"] = config
    save_file(tensors, str(path), {**meta, "state": json.dumps(state)})


def test_a_checkpoint_with_the_flat_config_of_earlier_versions_resumes_to_the_same_result(data, tmp_path):
    config = small_config(total_steps=40)
    assert TrainConfig.from_dict(LEGACY_CHECKPOINT_CONFIG) == config
    full = train_dictionary(data, config).dictionary

    with pytest.raises(Killed):
        train_dictionary(data, config, checkpoint_dir=tmp_path, progress=killed_at(25))
    _rewrite_checkpoint_config(tmp_path / CHECKPOINT_NAME, LEGACY_CHECKPOINT_CONFIG)
    resumed = train_dictionary(data, config, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 20
    for (name, a), b in zip(full.state_dict().items(), resumed.dictionary.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_may_lengthen_the_run_but_not_change_the_dictionary(data, tmp_path):
    train_dictionary(data, small_config(total_steps=20), checkpoint_dir=tmp_path)
    longer = train_dictionary(data, small_config(total_steps=30, warmup_steps=None, log_every=5), checkpoint_dir=tmp_path)
    assert longer.resumed_from_step == 20 and longer.history[-1]["step"] == 30
    with pytest.raises(ConfigError, match="different settings \\(normalization\\)"):
        train_dictionary(data, small_config(total_steps=40, normalization="none"), checkpoint_dir=tmp_path)


def test_checkpoint_with_other_settings_is_refused(data, tmp_path):
    train_dictionary(data, small_config(total_steps=20), checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="different settings \\(k\\)"):
        train_dictionary(data, small_config(total_steps=20, k=3), checkpoint_dir=tmp_path)


def test_batches_from_another_site_are_refused(data):
    batches = [data[:200], torch.randn(200, 9)]
    with pytest.raises(TrainingError, match="width 9 but the dictionary has d_in=16"):
        train_dictionary(batches, small_config(total_steps=5))


def test_trained_dictionary_carries_firing_statistics_and_a_summary(data):
    sae = train_dictionary(data, small_config(total_steps=30)).dictionary
    assert 0 < float(sae.firing_frequency.sum())
    assert float(sae.mean_activation.max()) > 0
    assert sae.metadata["training"]["steps"] == 30
    assert sae.metadata["training"]["config"]["dictionary"]["k"] == 4


def test_unknown_option_in_a_config_file_is_named():
    with pytest.raises(ConfigError, match="unknown training option\\(s\\) learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_itda_training_records_firing_statistics_for_its_atoms(data):
    itda = train_dictionary(data, small_config(kind="itda", k=4, total_steps=10, loss_threshold=0.2)).dictionary
    assert itda.firing_frequency.shape == (itda.n_latents,)
    assert float(itda.firing_frequency.sum()) > 0 and float(itda.mean_activation.max()) > 0
