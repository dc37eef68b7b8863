"""Fuzzing shard folders: whatever is wrong with one, a reader refuses it or reads exactly its valid data.

A seeded mutator damages copies of a valid folder written by ShardWriter: its manifest (fields deleted,
retyped, huge, negative, nested too deeply; counts, width, dtype or site that lie; files that escape the
folder by ``..``, absolute paths or links, files listed twice or missing) and its shard files (truncated,
empty, garbage, a pipe, flipped bytes, tensors renamed, reshaped or of another dtype, headers that lie),
and writes folders whose data holds NaN or inf. Every case must end in one of:

* a ShardError (or another SAEError) with a one-line message;
* a read that yields exactly the folder's valid data (never a vector from outside the folder);
* for NaN/inf data: the data read as written, then training that ends with a TrainingError or rejects
  exactly the non-finite batches it drew;

never another exception and never a hang (each case has a time limit). Shard-file cases also reopen the
folder with ShardWriter (as a resumed capture does), which must refuse it with an SAEError or accept it.
``DIFFUSION_SAE_FUZZ=long`` runs ten times as many cases; ``DIFFUSION_SAE_FUZZ_SEED`` draws other ones.
"""
import collections
import faulthandler
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_core.config import TrainConfig
from sae_core.errors import SAEError, TrainingError
from sae_core.shards import ShardReader, ShardWriter
from sae_core.sites import Site
from sae_core.train import train_dictionary

N_CASES = 300 * (10 if os.environ.get("DIFFUSION_SAE_FUZZ") == "long" else 1)
SEED = int(os.environ.get("DIFFUSION_SAE_FUZZ_SEED", 20_250_611))
CASE_SECONDS = 10
SITE = Site(family="flux", block="double_blocks.3", stream="image")
D, ROWS, N_SHARDS = 6, 40, 3
OUTSIDE_IDS = 10**6  # sample ids of the shard outside the folder: seeing one means a read escaped


def _write_folder(directory, acts, first_sample=0):
    with ShardWriter(directory, SITE, shard_tokens=ROWS, dtype=torch.float32, extra={"prompts": ["a red car"]}) as w:
        for i in range(0, acts.shape[0], ROWS // 2):  # two samples per shard
            w.add(acts[i:i + ROWS // 2], sample_id=first_sample + i // (ROWS // 2), token=None, timestep=0.25)


def _read(directory):
    batches = list(ShardReader(directory, batch_size=7, shuffle=False, drop_last=False))
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _bitwise_equal(a, b):
    """Equal in dtype, shape and every bit (NaN included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _same_rows(got, want):
    return got.keys() == want.keys() and all(_bitwise_equal(got[k], want[k]) for k in want)


class Fuzz:
    """The valid folder, a valid shard outside it, and the tally of outcomes."""

    def __init__(self, root: Path):
        self.root = root
        gen = torch.Generator().manual_seed(0)
        self.acts = torch.randn(N_SHARDS * ROWS, D, generator=gen)
        self.base, self.outside = root / "base", root / "outside"
        _write_folder(self.base, self.acts)
        _write_folder(self.outside, torch.randn(ROWS, D, generator=gen), first_sample=OUTSIDE_IDS)
        self.expected = _read(self.base)
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self.seconds = 0.0

    def shard(self, case: Path, rng: random.Random) -> Path:
        return case / f"shard_{rng.randrange(N_SHARDS):05d}.safetensors"


# ----------------------------------------------------------------------------- manifest mutations


def _edit(case: Path, change: Callable[[dict], None]) -> None:
    path = case / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _odd_value(rng: random.Random):
    return rng.choice([None, "12", "40", 12.0, 40.5, True, False, [], {}, [40], {"n": 40}, -1, -40, 0, 2**63,
                       10**30, "x" * 5000, "float32 ", "..", ["float32"]])


MANIFEST_FIELDS = ("format", "version", "d", "dtype", "n_tokens", "shards", "site", "extra")


def m_delete_field(rng, case, fz):
    field = rng.choice(MANIFEST_FIELDS)
    _edit(case, lambda m: m.pop(field))
    return f"delete '{field}'"


def m_retype_field(rng, case, fz):
    field, value = rng.choice(MANIFEST_FIELDS), _odd_value(rng)
    _edit(case, lambda m: m.__setitem__(field, value))
    return f"'{field}' = {value!r:.40}"


def m_retype_entry(rng, case, fz):
    i, key, value = rng.randrange(N_SHARDS), rng.choice(["file", "tokens"]), _odd_value(rng)
    _edit(case, lambda m: m["shards"][i].__setitem__(key, value))
    return f"shards[{i}].{key} = {value!r:.40}"


def m_delete_entry_key(rng, case, fz):
    i, key = rng.randrange(N_SHARDS), rng.choice(["file", "tokens"])
    _edit(case, lambda m: m["shards"][i].pop(key))
    return f"delete shards[{i}].{key}"


def m_entry_not_an_object(rng, case, fz):
    i, value = rng.randrange(N_SHARDS), rng.choice(["shard_00000.safetensors", 40, None, ["shard_00000.safetensors", 40]])
    _edit(case, lambda m: m["shards"].__setitem__(i, value))
    return f"shards[{i}] = {value!r}"


def m_counts_lie(rng, case, fz):
    i, delta = rng.randrange(N_SHARDS), rng.choice([-40, -1, 1, 7, 10**12])
    fix_total = rng.random() < 0.5  # a careful liar also fixes the total

    def change(m):
        m["shards"][i]["tokens"] += delta
        if fix_total:
            m["n_tokens"] += delta
    _edit(case, change)
    return f"shards[{i}].tokens {delta:+d} (total {'fixed' if fix_total else 'kept'})"


def m_total_lies(rng, case, fz):
    delta = rng.choice([-1, 1, -120, 10**9])
    _edit(case, lambda m: m.__setitem__("n_tokens", m["n_tokens"] + delta))
    return f"n_tokens {delta:+d}"


def m_width_dtype_site_lie(rng, case, fz):
    key, value = rng.choice([("d", D + 1), ("d", D - 1), ("d", 4096), ("dtype", "float16"), ("dtype", "bfloat16"),
                             ("site", {**SITE.to_dict(), "block": "double_blocks.4"}), ("site", {"family": "sdxl"})])
    _edit(case, lambda m: m.__setitem__(key, value))
    return f"'{key}' lies: {value!r:.40}"


def m_huge_digits(rng, case, fz):
    path = case / "manifest.json"
    field = rng.choice(["n_tokens", "d", "tokens"])
    text = path.read_text().replace(f'"{field}": ', f'"{field}": 1{"0" * 5000}', 1)
    path.write_text(text)
    return f"'{field}' with 5001 digits"


def m_deep_nesting(rng, case, fz):
    depth = rng.choice([2_000, 100_000])
    path = case / "manifest.json"
    if rng.random() < 0.5:
        path.write_text("[" * depth + "]" * depth)
        return f"manifest nested {depth} deep"
    manifest = json.loads(path.read_text())
    manifest["site"]["extra"] = "@NEST@"
    path.write_text(json.dumps(manifest).replace('"@NEST@"', "[" * depth + "]" * depth))
    return f"site.extra nested {depth} deep"


def m_whole_manifest(rng, case, fz):
    content = rng.choice([b"[]", b'"manifest"', b"42", b"null", b"", b"{", b'{"format": "diffusion-sae-shard"',
                          b"\x00\xff not utf-8", json.dumps([{"format": "diffusion-sae-shard"}]).encode()])
    (case / "manifest.json").write_bytes(content)
    return f"manifest content {content!r:.30}"


def m_no_manifest(rng, case, fz):
    (case / "manifest.json").unlink()
    return "manifest deleted"


def m_valid_edits(rng, case, fz):
    """Edits that keep the manifest true: the read must give exactly the valid data."""
    choice = rng.choice(["extra", "no extra", "whitespace"])
    path = case / "manifest.json"
    if choice == "extra":
        _edit(case, lambda m: m.__setitem__("extra", {"note": "edited", "n": [1, 2, 3]}))
    elif choice == "no extra":
        _edit(case, lambda m: m.pop("extra"))
    else:
        path.write_text(json.dumps(json.loads(path.read_text()), indent=rng.choice([None, 0, 4])))
    return f"true edit: {choice}"


# ----------------------------------------------------------------------------- files that escape


def _set_file(case: Path, i: int, name: str) -> None:
    _edit(case, lambda m: m["shards"][i].__setitem__("file", name))


def e_dotdot(rng, case, fz):
    i = rng.randrange(N_SHARDS)
    name = rng.choice(["../outside/shard_00000.safetensors", "../base/shard_00000.safetensors",
                       "./../outside/shard_00000.safetensors", "..\\outside\\shard_00000.safetensors"])
    _set_file(case, i, name)
    return f"shards[{i}].file = {name!r}"


def e_absolute(rng, case, fz):
    i = rng.randrange(N_SHARDS)
    name = rng.choice([str(fz.outside / "shard_00000.safetensors"), str(case / f"shard_{i:05d}.safetensors"),
                       "/etc/passwd", "/dev/zero"])
    _set_file(case, i, name)
    return f"shards[{i}].file = absolute {name!r}"


def e_subfolder(rng, case, fz):
    i = rng.randrange(N_SHARDS)
    sub = case / "sub"
    if rng.random() < 0.5:
        sub.symlink_to(fz.outside, target_is_directory=True)
        name = "sub/shard_00000.safetensors"
    else:
        sub.mkdir()
        shutil.copy(case / f"shard_{i:05d}.safetensors", sub / "shard.safetensors")
        name = "sub/shard.safetensors"
    _set_file(case, i, name)
    return f"shards[{i}].file = {name!r}"


def e_odd_names(rng, case, fz):
    i = rng.randrange(N_SHARDS)
    name = rng.choice(["", ".", "..", "manifest.json", f"shard_{i:05d}.safetensors/", f"shard_{i:05d}.safetensors\x00",
                       "shard_00099.safetensors", "x" * 300])
    _set_file(case, i, name)
    return f"shards[{i}].file = {name!r:.40}"


def e_link_outside(rng, case, fz):
    i = rng.randrange(N_SHARDS)
    link = case / "link.safetensors"
    link.symlink_to(rng.choice([fz.outside / "shard_00000.safetensors", Path("../outside/shard_00000.safetensors")]))
    if rng.random() < 0.5:  # the link takes the shard's own name
        (case / f"shard_{i:05d}.safetensors").unlink()
        link.rename(case / f"shard_{i:05d}.safetensors")
        return f"shard {i} replaced by a link outside"
    _set_file(case, i, link.name)
    return f"shards[{i}].file = link outside"


def e_link_inside(rng, case, fz):
    """A link to the same shard within the folder is the same file: reading through it is valid."""
    i = rng.randrange(N_SHARDS)
    (case / "alias.safetensors").symlink_to(f"shard_{i:05d}.safetensors")
    _set_file(case, i, "alias.safetensors")
    return f"shards[{i}].file = link to itself inside"


def e_loop_link(rng, case, fz):
    i = rng.randrange(N_SHARDS)
    (case / "a.safetensors").symlink_to("b.safetensors")
    (case / "b.safetensors").symlink_to("a.safetensors")
    _set_file(case, i, "a.safetensors")
    return f"shards[{i}].file = a link loop"


def e_listed_twice(rng, case, fz):
    i, j = rng.sample(range(N_SHARDS), 2)
    alias = rng.random() < 0.5

    def change(m):
        if alias:  # the second listing goes through a link, under another name
            (case / "again.safetensors").symlink_to(m["shards"][i]["file"])
            m["shards"][j] = {"file": "again.safetensors", "tokens": m["shards"][i]["tokens"]}
        else:
            m["shards"][j] = dict(m["shards"][i])
    _edit(case, change)
    return f"shard {i} listed again as entry {j}{' through a link' if alias else ''}"


def e_listed_twice_appended(rng, case, fz):
    i = rng.randrange(N_SHARDS)

    def change(m):
        m["shards"].append(dict(m["shards"][i]))
        m["n_tokens"] += m["shards"][i]["tokens"]  # the total adds up: only the repetition is wrong
    _edit(case, change)
    return f"shard {i} listed twice, total adjusted"


def e_missing_file(rng, case, fz):
    shard = fz.shard(case, rng)
    shard.unlink()
    return f"{shard.name} deleted"


# ----------------------------------------------------------------------------- shard file mutations


def s_truncate(rng, case, fz):
    shard = fz.shard(case, rng)
    data = shard.read_bytes()
    n = rng.randrange(len(data))
    shard.write_bytes(data[:n])
    return f"{shard.name} truncated to {n} of {len(data)} bytes"


def s_empty_or_garbage(rng, case, fz):
    shard = fz.shard(case, rng)
    size = shard.stat().st_size
    kind = rng.choice(["empty", "garbage", "garbage same size", "zeros", "json"])
    content = {"empty": b"", "garbage": rng.randbytes(rng.randrange(1, 4000)), "garbage same size": rng.randbytes(size),
               "zeros": bytes(size), "json": b'{"activations": 1}'}[kind]
    shard.write_bytes(content)
    return f"{shard.name} {kind}"


def s_not_a_file(rng, case, fz):
    shard = fz.shard(case, rng)
    shard.unlink()
    if rng.random() < 0.5:
        os.mkfifo(shard)  # opening a pipe to read waits for a writer: it must not be opened
        return f"{shard.name} is a pipe"
    shard.mkdir()
    return f"{shard.name} is a folder"


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def s_flip_bytes(rng, case, fz):
    shard = fz.shard(case, rng)
    data = bytearray(shard.read_bytes())
    start = _data_start(shard)
    where = rng.choice(["data", "header", "anywhere"])
    lo, hi = {"data": (start, len(data)), "header": (0, start), "anywhere": (0, len(data))}[where]
    flips = rng.randrange(1, 4)
    for _ in range(flips):
        data[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
    shard.write_bytes(bytes(data))
    return f"{shard.name}: {flips} byte(s) flipped in {where}"


def _rewrite(shard: Path, change: Callable[[dict, dict], None], rng: random.Random) -> str:
    """Rewrite a shard after ``change(tensors, metadata)``; half the time without its checksum, as older shards."""
    with safe_open(str(shard), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    legacy = rng.random() < 0.5  # shards written before checksums: the structure alone must tell
    if legacy:
        meta.pop("crc32", None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(shard), metadata=meta)
    return " (no checksum)" if legacy else ""


def s_tensor_renamed(rng, case, fz):
    shard = fz.shard(case, rng)
    name = rng.choice(["activations", "sample_id", "token", "timestep"])
    new = rng.choice([name + "s", name.upper(), "other"])
    suffix = _rewrite(shard, lambda t, m: t.__setitem__(new, t.pop(name)), rng)
    return f"{shard.name}: tensor {name} renamed {new}{suffix}"


def s_tensor_removed(rng, case, fz):
    shard = fz.shard(case, rng)
    name = rng.choice(["activations", "sample_id", "token", "timestep"])
    suffix = _rewrite(shard, lambda t, m: t.pop(name), rng)
    return f"{shard.name}: tensor {name} removed{suffix}"


def s_tensor_reshaped(rng, case, fz):
    shard = fz.shard(case, rng)
    name, shape = rng.choice([("activations", (ROWS // 2, 2 * D)), ("activations", (ROWS * D,)),
                              ("activations", (ROWS, D, 1)), ("activations", (ROWS * D // 4, 4)),
                              ("sample_id", (ROWS, 1)), ("token", (ROWS // 2, 2)), ("timestep", ())])
    if shape == ():
        suffix = _rewrite(shard, lambda t, m: t.__setitem__(name, t[name][:1].reshape(())), rng)
    else:
        suffix = _rewrite(shard, lambda t, m: t.__setitem__(name, t[name].reshape(shape)), rng)
    return f"{shard.name}: {name} reshaped {shape}{suffix}"


def s_tensor_dtype(rng, case, fz):
    shard = fz.shard(case, rng)
    name, dtype = rng.choice([("activations", torch.float16), ("activations", torch.bfloat16),
                              ("activations", torch.float64), ("activations", torch.int32),
                              ("sample_id", torch.int32), ("token", torch.float32), ("timestep", torch.float64)])
    also_meta = name == "activations" and dtype in (torch.float16, torch.bfloat16) and rng.random() < 0.5

    def change(t, m):
        t[name] = t[name].to(dtype)
        if also_meta:  # a self-consistent shard of another dtype: now the manifest lies
            m["dtype"] = str(dtype).removeprefix("torch.")
    suffix = _rewrite(shard, change, rng)
    return f"{shard.name}: {name} as {dtype}{' (header too)' if also_meta else ''}{suffix}"


def s_rows_changed(rng, case, fz):
    shard = fz.shard(case, rng)
    n = rng.choice([0, 1, ROWS - 1, ROWS + 5])

    def change(t, m):
        for k in t:
            t[k] = t[k][:n] if n <= ROWS else torch.cat([t[k], t[k][:n - ROWS]])
    suffix = _rewrite(shard, change, rng)
    return f"{shard.name} holds {n} rows instead of {ROWS}{suffix}"


def s_header_metadata(rng, case, fz):
    shard = fz.shard(case, rng)
    key, value = rng.choice([("format", None), ("format", "safetensors"), ("dtype", None), ("dtype", "float16"),
                             ("dtype", "int8"), ("site", None), ("site", "{not json"), ("site", "[1, 2]"),
                             ("site", json.dumps({**SITE.to_dict(), "block": "double_blocks.4"})),
                             ("site", "[" * 5000 + "]" * 5000), ("site", json.dumps({"timestep_window": "ab"})),
                             ("max_sample_id", None), ("max_sample_id", "many"), ("crc32", "00000000"),
                             ("crc32", None), ("version", "9")])

    def change(t, m):
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    suffix = _rewrite(shard, change, rng)
    return f"{shard.name}: header {key} = {value!r:.30}{suffix}"


# ----------------------------------------------------------------------------- the cases

AREAS = {
    "manifest": [m_delete_field, m_retype_field, m_retype_entry, m_delete_entry_key, m_entry_not_an_object,
                 m_counts_lie, m_total_lies, m_width_dtype_site_lie, m_huge_digits, m_deep_nesting,
                 m_whole_manifest, m_no_manifest, m_valid_edits],
    "escape": [e_dotdot, e_absolute, e_subfolder, e_odd_names, e_link_outside, e_link_inside, e_loop_link,
               e_listed_twice, e_listed_twice_appended, e_missing_file],
    "shard": [s_truncate, s_empty_or_garbage, s_not_a_file, s_flip_bytes, s_tensor_renamed, s_tensor_removed,
              s_tensor_reshaped, s_tensor_dtype, s_rows_changed, s_header_metadata],
    "nan": [],  # see _nan_case
}
WEIGHTS = {"manifest": 0.34, "escape": 0.24, "shard": 0.32, "nan": 0.10}


HANG = "FAIL hang"


def _classify(attempt: Callable[[], str]) -> str:
    """``attempt``'s own outcome, 'error' for an SAEError with a one-line message, or a failure."""
    try:
        return attempt()
    except SAEError as err:
        message = str(err)
        return "error" if message and "\n" not in message else f"FAIL message not one line: {message!r:.200}"
    except Exception as err:  # noqa: BLE001 - any other exception is what the fuzzing looks for
        return f"FAIL {type(err).__name__}: {err!s:.200}"


def _outcome(attempt: Callable[[], str], seconds: float = CASE_SECONDS) -> str:
    """:func:`_classify` under a time limit. The attempt runs in a thread that this one waits for (a signal
    would not interrupt a wait inside native code, which retries an interrupted call). A wait that also holds
    the interpreter's lock would stop this thread too: then faulthandler ends the whole run at twice the limit,
    writing every thread's traceback to the process's stderr (``pytest -s`` shows it). Either way a hang fails
    the run instead of stalling it."""
    box: dict[str, str] = {}
    worker = threading.Thread(target=lambda: box.setdefault("outcome", _classify(attempt)), daemon=True)
    faulthandler.dump_traceback_later(2 * seconds, exit=True, file=sys.__stderr__)
    try:
        worker.start()
        worker.join(seconds)
    finally:
        faulthandler.cancel_dump_traceback_later()
    if worker.is_alive():
        return HANG
    return box.get("outcome", "FAIL ended without an outcome")


def _read_outcome(case: Path, expected) -> str:
    got = _read(case)
    if (got["sample_id"] >= OUTSIDE_IDS).any():
        return "FAIL read data from outside the folder"
    return "valid" if _same_rows(got, expected) else "FAIL read other data than the folder's"


def _reopen_outcome(case: Path) -> str:
    ShardWriter(case, SITE, shard_tokens=ROWS, dtype=torch.float32).close()
    return "valid"


class _Counting:
    """A re-iterable over a reader that counts the non-finite batches it hands out."""

    def __init__(self, reader):
        self.reader, self.bad = reader, 0

    def __iter__(self):
        for batch in self.reader:
            self.bad += int(not torch.isfinite(batch["activations"]).all())
            yield batch


def _nan_case(rng: random.Random, case: Path, fz: Fuzz) -> tuple[str, list[tuple[str, str]]]:
    acts = fz.acts.clone()
    variant = rng.choice(["nan shard", "nan rows", "inf rows", "all nan", "nan and inf"])
    if variant == "nan shard":
        i = rng.randrange(N_SHARDS)
        acts[i * ROWS:(i + 1) * ROWS] = float("nan")
    elif variant == "all nan":
        acts[:] = float("nan")
    else:
        for _ in range(rng.randrange(1, 6)):
            acts[rng.randrange(len(acts)), rng.randrange(D)] = rng.choice(
                {"nan rows": [float("nan")], "inf rows": [float("inf"), -float("inf")],
                 "nan and inf": [float("nan"), float("inf")]}[variant])
    _write_folder(case, acts)
    expected = {**fz.expected, "activations": acts}
    kind = rng.choice(["topk", "batchtopk", "itda"])
    config = TrainConfig.from_dict(dict(kind=kind, k=2, n_latents=16, total_steps=12, batch_size=16, warmup_steps=2,
                                        lr=3e-3, dead_tokens=200, log_every=4, init_tokens=16, loss_threshold=0.2,
                                        max_atoms=64))

    def train() -> str:
        data = _Counting(ShardReader(case, batch_size=16, seed=rng.randrange(1000), buffer_tokens=48))
        try:
            result = train_dictionary(data, config)
        except TrainingError:
            return "training error"
        steps = result.dictionary.metadata["training"]["steps"]
        if result.rejected_batches != data.bad or steps != config.total_steps:
            return f"FAIL rejected {result.rejected_batches} of {data.bad} bad batches drawn, {steps} steps"
        return "rejected exactly the bad batches"

    outcomes = [("read", _outcome(lambda: _read_outcome(case, expected))), ("train", _outcome(train))]
    return f"{variant}, {kind}", outcomes


def _case(index: int, rng: random.Random, fz: Fuzz) -> bool:
    """Run case ``index``; False if it hung (its thread may still hold the folder: the run stops there)."""
    area = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    case = fz.root / f"case_{index:05d}"
    if area == "nan":
        what, outcomes = _nan_case(rng, case, fz)
    else:
        shutil.copytree(fz.base, case, symlinks=True)
        mutate = rng.choice(AREAS[area])
        what = f"{mutate.__name__}: {mutate(rng, case, fz)}"
        outcomes = [("read", _outcome(lambda: _read_outcome(case, fz.expected)))]
        if area == "shard":  # a resumed capture opens the folder by its shard files, not by its manifest
            outcomes.append(("reopen", _outcome(lambda: _reopen_outcome(case))))
    for stage, outcome in outcomes:
        fz.counts[area, f"{stage}: {outcome}" if not outcome.startswith("FAIL") else f"{stage}: FAIL"] += 1
        if outcome.startswith("FAIL"):
            fz.failures.append(f"case {index} ({area}, {what}), {stage}: {outcome}")
    if any(outcome == HANG for _, outcome in outcomes):
        return False
    shutil.rmtree(case, ignore_errors=True)
    return True


def _summary(fz: Fuzz) -> str:
    lines = [f"shard fuzzing: {N_CASES} cases (seed {SEED}) in {fz.seconds:.1f} s"]
    for area in WEIGHTS:
        cases = sum(n for (a, o), n in fz.counts.items() if a == area and not o.startswith(("reopen", "train")))
        detail = ", ".join(f"{o} {n}" for (a, o), n in sorted(fz.counts.items()) if a == area)
        lines.append(f"  {area:8s} {cases:4d} cases: {detail}")
    return "\n".join(lines)


def test_damaged_or_lying_shard_folders_are_refused_or_read_exactly(tmp_path, capsys, one_thread):
    fz = Fuzz(tmp_path)
    rng = random.Random(SEED)
    start = time.perf_counter()
    for index in range(N_CASES):
        if not _case(index, rng, fz):
            break
    fz.seconds = time.perf_counter() - start
    with capsys.disabled():
        print("\n" + _summary(fz))
    assert not fz.failures, "\n".join(fz.failures[:20])
    outcomes = {o for (_, o) in fz.counts}
    assert {"read: error", "read: valid", "reopen: error", "reopen: valid", "train: training error",
            "train: rejected exactly the bad batches"} <= outcomes  # every kind of end was reached


def test_a_case_that_hangs_is_caught_by_the_time_limit(tmp_path):
    """The time limit itself works: reading a pipe that nobody writes (what the reader must never open) is cut off."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    assert _outcome(lambda: pipe.read_bytes() and "valid", seconds=0.2) == HANG
    os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # let the waiting reader finish


@pytest.mark.parametrize("make, expected", [
    (lambda: 1 // 0, "FAIL ZeroDivisionError"),
    (lambda: {}["missing"], "FAIL KeyError"),
])
def test_an_exception_other_than_an_sae_error_counts_as_a_failure(make, expected):
    assert _outcome(make).startswith(expected)
