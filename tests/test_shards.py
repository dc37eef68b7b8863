"""Activation capture: the bounded buffer, shards on disk, and the shuffling reader."""
import contextlib
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch

import sae_core.atomic
from sae_core.config import DictionaryConfig, TrainConfig
from sae_core.errors import ConfigError, ShardError, WriteError
from sae_core.shards import ActivationBuffer, ShardReader, ShardWriter
from sae_core.sites import Site
from sae_core.synthetic import superposition_data
from sae_core.train import train_dictionary
from test_training import Killed, killed_at

SITE = Site(family="flux", block="double_blocks.9", stream="image")
D = 8


def samples(n_samples, tokens=50, d=D, seed=0):
    """(n_samples, tokens, d) activations, distinct per vector."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, tokens, d, generator=gen)


def write(directory, acts, shard_tokens=100, dtype=torch.float32, first_sample=0, **kwargs):
    with ShardWriter(directory, SITE, shard_tokens=shard_tokens, dtype=dtype, **kwargs) as writer:
        for i, sample in enumerate(acts):
            writer.add(sample, sample_id=first_sample + i, token=None, timestep=0.5 + i)
    return writer


def read_all(directory, **kwargs):
    reader = ShardReader(directory, batch_size=kwargs.pop("batch_size", 64), drop_last=False, **kwargs)
    batches = list(reader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def shard_names(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("shard_"))


# ----------------------------------------------------------------------------- writer and reader


def test_round_trip_keeps_vectors_and_provenance_in_order(tmp_path):
    acts = samples(5)
    write(tmp_path, acts, extra={"prompts": ["a red car"] * 5})
    assert shard_names(tmp_path) == [f"shard_{i:05d}.safetensors" for i in range(3)]
    got = read_all(tmp_path, shuffle=False)
    assert torch.equal(got["activations"], acts.reshape(-1, D))
    assert torch.equal(got["sample_id"], torch.arange(5).repeat_interleave(50))
    assert torch.equal(got["token"], torch.arange(50).repeat(5))
    assert torch.equal(got["timestep"], (0.5 + torch.arange(5.0)).repeat_interleave(50))
    assert got["sample_id"].dtype == torch.int64 and got["timestep"].dtype == torch.float32


def test_manifest_describes_the_capture(tmp_path):
    write(tmp_path, samples(5), extra={"prompts": ["a red car"]})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"] == [{"file": f"shard_{i:05d}.safetensors", "tokens": t} for i, t in enumerate([100, 100, 50])]
    assert (manifest["d"], manifest["n_tokens"], manifest["dtype"]) == (D, 250, "float32")
    assert Site.from_dict(manifest["site"]) == SITE
    assert manifest["extra"] == {"prompts": ["a red car"]}
    reader = ShardReader(tmp_path, batch_size=32)
    assert (reader.d, reader.n_tokens, reader.site, reader.dtype) == (D, 250, SITE, torch.float32)


def test_float16_is_the_default_and_out_of_range_values_are_refused(tmp_path):
    acts = samples(2)
    write(tmp_path / "half", acts, dtype=torch.float16)
    got = read_all(tmp_path / "half", shuffle=False)
    assert got["activations"].dtype == torch.float16
    assert torch.allclose(got["activations"].float(), acts.reshape(-1, D), atol=1e-2)
    with pytest.raises(ShardError, match="beyond float16's range.*bfloat16 or torch.float32"):
        ShardWriter(tmp_path / "big", SITE).add(torch.full((4, D), 1e5), 0, None, 1.0)


def test_a_failed_shard_write_leaves_no_partial_file_and_keeps_the_vectors(tmp_path, monkeypatch):
    real_save = sae_core.atomic.save_file

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a shard")
        raise OSError(28, "No space left on device")

    writer = ShardWriter(tmp_path, SITE, shard_tokens=100, dtype=torch.float32)
    monkeypatch.setattr(sae_core.atomic, "save_file", failing_save)
    with pytest.raises(WriteError, match="disk full"):
        writer.add(samples(1, tokens=120)[0], 0, None, 1.0)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(sae_core.atomic, "save_file", real_save)
    writer.close()
    assert ShardReader(tmp_path, batch_size=10).n_tokens == 120


def test_a_full_disk_during_a_manifest_update_keeps_the_previous_manifest(tmp_path, monkeypatch):
    write(tmp_path, samples(2))
    before = (tmp_path / "manifest.json").read_bytes()
    real_write_text = Path.write_text

    def disk_full(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real_write_text(self, '{"format": "diffusion-sae')  # half a manifest
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(WriteError, match="disk full while writing .*manifest.json: free some space"):
        write(tmp_path, samples(1), first_sample=2)
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))
    assert ShardReader(tmp_path, batch_size=10).n_tokens == 100


@contextlib.contextmanager
def file_size_limit(n_bytes):
    """Writes that would make any file larger than ``n_bytes`` fail for real (EFBIG), as a full disk does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_write_that_really_fails_in_safetensors_is_a_write_error_and_keeps_the_finished_shards(tmp_path):
    writer = ShardWriter(tmp_path, SITE, shard_tokens=100, dtype=torch.float32)
    writer.add(samples(1, tokens=100)[0], 0, None, 1.0)
    finished = shard_states(tmp_path)
    with file_size_limit(2048), pytest.raises(WriteError, match="could not write .*shard_00001.safetensors: File too large"):
        writer.add(samples(1, tokens=100)[0], 1, None, 1.0)  # safetensors raises its own error, not an OSError
    assert shard_states(tmp_path) == finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard_00000.safetensors"]


def test_reopening_appends_after_the_last_shard(tmp_path):
    first, second = samples(5, seed=1), samples(3, seed=2)
    write(tmp_path, first)
    writer = write(tmp_path, second, first_sample=5, extra={"run": 2})
    assert writer.n_tokens == 400
    assert shard_names(tmp_path) == [f"shard_{i:05d}.safetensors" for i in range(5)]
    got = read_all(tmp_path, shuffle=False)
    assert torch.equal(got["activations"], torch.cat([first, second]).reshape(-1, D))
    assert torch.equal(got["sample_id"], torch.arange(8).repeat_interleave(50))


def shard_states(directory):
    """Inode, modification time and content hash of each shard: unchanged only if the file was left alone."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in directory.glob("shard_*")}


def test_a_killed_capture_resumes_losing_only_its_unflushed_remainder(tmp_path):
    acts = samples(5)
    writer = ShardWriter(tmp_path, SITE, shard_tokens=100, dtype=torch.float32)
    for i in range(5):
        writer.add(acts[i], i, None, 1.0)
    del writer  # killed: the last 50 vectors were never flushed
    (tmp_path / ".shard_00002.safetensors.x1y2.tmp").write_bytes(b"partial")
    (tmp_path / ".tmpA1b2C3").write_bytes(b"partial, as safetensors names it")
    (tmp_path / "manifest.json").unlink()  # killed between a shard and its manifest update
    finished = shard_states(tmp_path)
    assert sorted(finished) == ["shard_00000.safetensors", "shard_00001.safetensors"]

    resumed = ShardWriter(tmp_path, SITE, shard_tokens=100, dtype=torch.float32)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".tmp*"))
    assert resumed.n_tokens == 200
    assert resumed.next_sample_id == 4  # sample 3 straddled the flush; its first half is on disk
    resumed.add(acts[4], resumed.next_sample_id, None, 1.0)
    resumed.close()
    after = shard_states(tmp_path)
    assert {name: after.get(name) for name in finished} == finished  # appended after them, never rewritten
    got = read_all(tmp_path, shuffle=False)
    assert torch.equal(got["activations"], torch.cat([acts[:4].reshape(-1, D), acts[4]]))


def test_reopening_with_another_width_site_or_dtype_is_refused(tmp_path):
    write(tmp_path, samples(2))
    with pytest.raises(ShardError, match="width 4 but shard directory .* holds width 8"):
        ShardWriter(tmp_path, SITE, dtype=torch.float32).add(torch.zeros(3, 4), 0, None, 1.0)
    with pytest.raises(ShardError, match="capture each site into its own directory"):
        ShardWriter(tmp_path, Site(family="flux", block="single_blocks.9"), dtype=torch.float32)
    with pytest.raises(ShardError, match="stored as float32, not float16"):
        ShardWriter(tmp_path, SITE)


def test_reopening_with_other_capture_settings_is_refused_and_the_same_ones_resume(tmp_path):
    write(tmp_path, samples(2), extra={"capture": {"token_fraction": 0.5, "seed": 0}})
    with pytest.raises(ConfigError, match="other settings \\(token_fraction differ\\)"):
        ShardWriter(tmp_path, SITE, dtype=torch.float32, extra={"capture": {"token_fraction": 1.0, "seed": 0}})
    same = write(tmp_path, samples(1), first_sample=2, extra={"capture": {"token_fraction": 0.5, "seed": 0}})
    assert same.n_tokens == 3 * 50 and same.extra["capture"]["token_fraction"] == 0.5


def test_a_truncated_shard_is_named_with_the_fix_when_the_folder_is_opened(tmp_path):
    write(tmp_path, samples(5))
    shard = tmp_path / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(ShardError, match="shard_00001.safetensors: activation shard is truncated or damaged.*delete it and run capture again"):
        ShardReader(tmp_path, batch_size=10, shuffle=False)
    with pytest.raises(ShardError, match="shard_00001.safetensors.*delete it"):
        ShardWriter(tmp_path, SITE, dtype=torch.float32)


def edit_manifest(directory, change):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_manifest_may_only_list_files_directly_inside_its_own_folder(tmp_path):
    write(tmp_path / "other", samples(2, seed=9), first_sample=100)
    outside = tmp_path / "other" / "shard_00000.safetensors"
    acts = tmp_path / "acts"
    for name in ["../other/shard_00000.safetensors", str(outside), "sub/shard_00000.safetensors", "..", ""]:
        write(acts, samples(2))
        edit_manifest(acts, lambda m: m["shards"][0].update(file=name))
        with pytest.raises(ShardError, match=r"manifest.json: shard entry 0 names .* not a file directly inside .*"
                                             r"rebuild the manifest"):
            ShardReader(acts, batch_size=10)
        shutil.rmtree(acts)
    write(acts, samples(2))
    (acts / "link.safetensors").symlink_to(outside)  # a link that leads out is refused like a path
    edit_manifest(acts, lambda m: m["shards"][0].update(file="link.safetensors"))
    with pytest.raises(ShardError, match="shard entry 0 names 'link.safetensors', which is not a file directly inside"):
        ShardReader(acts, batch_size=10)


def test_a_manifest_may_list_each_shard_once(tmp_path):
    write(tmp_path, samples(4))

    def twice(m):
        m["shards"][1] = dict(m["shards"][0])
        m["n_tokens"] = sum(s["tokens"] for s in m["shards"])
    edit_manifest(tmp_path, twice)
    with pytest.raises(ShardError, match="shard entry 1 .* is the file of entry 0 again: each shard may be listed once"):
        ShardReader(tmp_path, batch_size=10)


@pytest.mark.parametrize("change, message", [
    (lambda m: (m["shards"][1].update(tokens=99), m.update(n_tokens=249)),
     "it lists shard_00001.safetensors with 99 vectors, but the shard holds 100"),
    (lambda m: m.update(d=D + 1), "it states float32 vectors of width 9, but shard_00000.safetensors holds float32 vectors of width 8"),
    (lambda m: m.update(dtype="float16"), "it states float16 vectors .* holds float32 vectors"),
    (lambda m: m.update(n_tokens=251), "'n_tokens' is 251 but its shards list 250 vectors"),
    (lambda m: m.update(n_tokens="250"), "'n_tokens' is '250', not a count of vectors"),
    (lambda m: m["shards"][0].update(tokens=-100), "shard entry 0 has 'tokens' -100, not a count of vectors"),
    (lambda m: m.update(shards={"file": "shard_00000.safetensors"}), "'shards' is .*, not a list of shard entries"),
    (lambda m: m.update(site=["flux"]), "the site is list, not a JSON object"),
    (lambda m: m["site"].update(block="double_blocks.1"), "it states site .*double_blocks.1.* holds site .*double_blocks.9"),
])
def test_a_manifest_that_lies_about_its_shards_is_refused_when_the_folder_is_opened(tmp_path, change, message):
    write(tmp_path, samples(5))
    edit_manifest(tmp_path, change)
    with pytest.raises(ShardError, match=f"manifest.json: {message}.*rebuild the manifest from its shards"):
        ShardReader(tmp_path, batch_size=10)


def test_a_manifest_nested_too_deeply_is_a_shard_error(tmp_path):
    write(tmp_path, samples(2))
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ShardError, match="manifest.json is damaged .*rebuild the manifest"):
        ShardReader(tmp_path, batch_size=10)


def test_a_flipped_byte_in_a_shards_data_is_found_when_it_is_read(tmp_path):
    write(tmp_path, samples(2))
    shard = tmp_path / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # in the data, after the header
    shard.write_bytes(bytes(data))
    reader = ShardReader(tmp_path, batch_size=10, shuffle=False)  # the header is intact
    with pytest.raises(ShardError, match="shard_00000.safetensors: .*does not match the checksum in its header\\); delete it"):
        list(reader)


def test_a_pipe_in_place_of_a_shard_is_refused_without_waiting_on_it(tmp_path):
    write(tmp_path, samples(2))
    shard = tmp_path / "shard_00000.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(ShardError, match="shard_00000.safetensors: activation shard is truncated or damaged \\(not a regular file\\)"):
        ShardReader(tmp_path, batch_size=10)
    with pytest.raises(ShardError, match="not a regular file"):
        ShardWriter(tmp_path, SITE, dtype=torch.float32)


def test_missing_or_empty_directories_are_clear_errors(tmp_path):
    with pytest.raises(ShardError, match="does not exist: run capture first"):
        ShardReader(tmp_path / "nowhere", batch_size=8)
    with pytest.raises(ShardError, match="no activation shards in .*: run capture first"):
        ShardReader(tmp_path, batch_size=8)
    ShardWriter(tmp_path / "nothing", SITE).close()
    with pytest.raises(ShardError, match="holds no activation vectors"):
        ShardReader(tmp_path / "nothing", batch_size=8)


# ----------------------------------------------------------------------------- shuffling


def _sequence(reader, passes):
    it = [list(reader) for _ in range(passes)]
    return [torch.stack([b["sample_id"] * 1000 + b["token"] for b in p]) for p in it]


def test_shuffled_passes_are_reproducible_per_seed_and_differ_between_passes(tmp_path):
    write(tmp_path, samples(8))
    a = _sequence(ShardReader(tmp_path, batch_size=25, seed=3, buffer_tokens=120), passes=2)
    b = _sequence(ShardReader(tmp_path, batch_size=25, seed=3, buffer_tokens=120), passes=2)
    c = _sequence(ShardReader(tmp_path, batch_size=25, seed=4, buffer_tokens=120), passes=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], c[0])
    everything = torch.arange(8).repeat_interleave(50) * 1000 + torch.arange(50).repeat(8)
    for p in a:  # each pass is a permutation of every vector (400 = 16 full batches)
        assert torch.equal(p.flatten().sort().values, everything.sort().values)
    first_batch = a[0][0] // 1000
    assert len(first_batch.unique()) > 2  # tokens of several samples are mixed in a batch


def test_a_pass_can_be_replayed_by_index(tmp_path):
    write(tmp_path, samples(4))
    reader = ShardReader(tmp_path, batch_size=20, seed=1, buffer_tokens=64)
    passes = [list(reader) for _ in range(3)]
    replay = list(reader.iter_pass(2))
    assert all(torch.equal(x["activations"], y["activations"]) for x, y in zip(passes[2], replay))


def test_drop_last_skips_only_the_final_partial_batch(tmp_path):
    write(tmp_path, samples(5))  # 250 vectors
    sizes = [len(b["token"]) for b in ShardReader(tmp_path, batch_size=64, buffer_tokens=100)]
    assert sizes == [64, 64, 64]
    with pytest.raises(ShardError, match="fewer than one batch of 500"):
        ShardReader(tmp_path, batch_size=500)


# ----------------------------------------------------------------------------- in memory


def test_buffer_refuses_a_whole_append_when_full_and_keeps_what_it_had():
    buffer = ActivationBuffer(max_tokens=120)
    buffer.append(torch.ones(2, 50, D), sample_id=torch.tensor([[0], [1]]), token=None, timestep=1.0)
    with pytest.raises(ShardError, match="capture buffer is full at 100 vectors: raise max_tokens, "
                                              "subsample tokens, or write shards to disk"):
        buffer.append(torch.ones(50, D), sample_id=2, token=None, timestep=1.0)
    tensors = buffer.tensors()
    assert len(buffer) == 100 and tensors["activations"].shape == (100, D)
    assert torch.equal(tensors["sample_id"], torch.arange(2).repeat_interleave(50))
    assert torch.equal(tensors["token"], torch.arange(50).repeat(2))


def test_buffer_refuses_another_width():
    buffer = ActivationBuffer(max_tokens=100, d=D)
    with pytest.raises(ShardError, match="width 4 but capture buffer holds width 8"):
        buffer.append(torch.ones(3, 4), 0, None, 1.0)


# ----------------------------------------------------------------------------- training


def test_training_from_shards_resumes_exactly(tmp_path):
    data = superposition_data(n_samples=6000, d=16, n_features=64, mean_l0=3, seed=0).x
    with ShardWriter(tmp_path / "acts", SITE, shard_tokens=1000, dtype=torch.float32) as writer:
        for i in range(0, 6000, 500):
            writer.add(data[i:i + 500], sample_id=i // 500, token=None, timestep=1.0)
    config = TrainConfig(DictionaryConfig(k=4, n_latents=64), total_steps=40, warmup_steps=5, lr=3e-3, dead_tokens=2000,
                         checkpoint_every=20)

    def reader():
        return ShardReader(tmp_path / "acts", batch_size=256, seed=7, buffer_tokens=2048)

    full = train_dictionary(reader(), config).dictionary

    with pytest.raises(Killed):
        train_dictionary(reader(), config, checkpoint_dir=tmp_path / "ckpt", progress=killed_at(25))
    resumed = train_dictionary(reader(), config, checkpoint_dir=tmp_path / "ckpt")
    assert resumed.resumed_from_step == 20
    for (name, a), b in zip(full.state_dict().items(), resumed.dictionary.state_dict().values()):
        assert torch.equal(a, b), name


def test_whole_adds_end_shards_only_between_adds(tmp_path):
    """A capture adds one whole sample per call: no shard may hold part of one."""
    with ShardWriter(tmp_path, SITE, shard_tokens=100, dtype=torch.float32, whole_adds=True) as writer:
        for sample in range(5):
            writer.add(torch.randn(70, D), sample, None, 0.5)
    reader = ShardReader(tmp_path, batch_size=10**6, shuffle=False, drop_last=False)
    sizes = [entry["tokens"] for entry in reader._manifest["shards"]]
    assert sizes == [140, 140, 70] and sum(sizes) == reader.n_tokens
