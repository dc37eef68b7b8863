"""Every damaged dictionary is refused with one line, or loads exactly as its file says.

A seeded mutator damages valid dictionaries of every layout we read (native topk, batchtopk, jumprelu,
ITDA and Matryoshka BatchTopK files; SAELens, sparsify, SDLens and seed-A ITDA folders): header and config fields deleted,
retyped or nested deeply; tensors dropped, renamed, reshaped, retyped or given NaN/inf; files truncated,
emptied, replaced by garbage, flipped bit by bit, or claiming huge sizes. Each case must end within
CASE_LIMIT_S in one of two ways:

* a SAEError (DictionaryError, SiteError, ...) whose message is one line, or
* a dictionary whose config and tensors are those of the file: for a native file every config field
  and tensor as written (equal to the original unless the mutation wrote another valid value), for a
  foreign folder equal to the original, or, where the mutation removed a setting the layout documents
  a default for, loaded with that default.

Anything else (another exception, a multi-line message, a silently changed value, a slow case) fails
the layout's test, which prints its counts per outcome. ``DIFFUSION_SAE_FUZZ=long`` runs ten times as
many cases.

Byte flips go where a file can detect them: anywhere in a native file (its content hash covers the
config and the tensors), and in the header or pickle of a foreign file (the other formats carry no
checksum over tensor data, so a flipped weight there is indistinguishable from a real one).
"""
from __future__ import annotations

import collections
import io
import json
import os
import random
import shutil
import struct
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_foreign_formats import write_saelens, write_sdlens, write_seed_itda, write_sparsify

from sae_core.errors import SAEError
from sae_core.fileformat import FORMAT, FORMAT_VERSION, HASH_KEY, content_hash, save_dictionary
from sae_core.itda import ITDA
from sae_core.loading import load_dictionary
from sae_core.normalize import Standardizer
from sae_core.sae import SparseAutoencoder
from sae_core.sites import Site

SCALE = 10 if os.environ.get("DIFFUSION_SAE_FUZZ") == "long" else 1
NATIVE_CASES = 120 * SCALE
FOREIGN_CASES = 100 * SCALE
CASE_LIMIT_S = 5.0
DEEP = 100_000
"""Nesting depth of the deeply nested JSON: far past Python's recursion limit."""

REFUSED = "refused with one line"
EQUAL = "loaded, equal to the original"
AS_WRITTEN = "loaded, another valid value as written"
DEFAULT = "loaded, a removed setting's documented default"


class Unfaithful(AssertionError):
    """A load that does not match its file: a silently changed value."""


# --- the case runner -------------------------------------------------------------------------


class Fuzz:
    """Runs the cases of one layout, counts their outcomes and collects failures."""

    def __init__(self, layout: str, seed: int):
        self.layout = layout
        self.rng = random.Random(seed)
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []

    def case(self, description: str, load: Callable[[], Any], judge: Callable[[Any], str]) -> None:
        start = time.perf_counter()
        try:
            loaded = load()
        except SAEError as err:
            outcome = REFUSED if "\n" not in str(err) else self._fail("multi-line message", description, err)
        except Exception as err:  # noqa: BLE001 - any other type is what this test looks for
            outcome = self._fail(f"other exception {type(err).__name__}", description, err)
        else:
            try:
                outcome = judge(loaded)
            except Unfaithful as err:
                outcome = self._fail("silent change", description, err)
        elapsed = time.perf_counter() - start
        if elapsed > CASE_LIMIT_S:
            outcome = self._fail("hang", description, f"took {elapsed:.1f} s")
        self.counts[outcome] += 1

    def _fail(self, kind: str, description: str, detail: Any) -> str:
        self.failures.append(f"{kind}: {description}: {str(detail)[:300]!r}")
        return kind

    def report(self, capsys, expected: int) -> None:
        """Print the counts (also when capturing output) and fail on any failure."""
        total = sum(self.counts.values())
        summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.counts.items()))
        with capsys.disabled():
            print(f"\nfuzz {self.layout}: {total} cases: {summary}")
        assert not self.failures, f"{len(self.failures)} failures, first ones:\n" + "\n".join(self.failures[:10])
        assert total == expected and self.counts[REFUSED], self.counts


# --- mutations shared by every layout --------------------------------------------------------

TENSOR_MUTATIONS = ("drop tensor", "rename tensor", "reshape tensor", "retype tensor", "poison tensor")


def replacement(rng: random.Random, original: Any) -> Any:
    """A value of another JSON type than ``original``, or a huge, negative or non-finite number."""
    numbers = [10**30, 2**63, -1, -7, float("nan"), float("inf")]
    pools = {
        bool: ["true", "false", 1, 0, 1.0, [], {}, "NaN"],
        int: ["3", 3.7, 5.0, 0.5, True, False, [], [1], {}, "inf", *numbers],
        float: ["0.4", True, [], {}, "NaN", 10**30, -1, float("nan"), float("inf")],
        str: [5, True, 3.7, [], {}, ["topk"], "NaN", "unknown-value"],
        dict: ["x", 5, [1], True, 3.7],
        list: ["x", 5, {}, True, [1, 2, 3], [0.5], [0.9, 0.1], ["a", "b"], [float("nan"), 1.0]],
        type(None): ["x", 5, True, [], {}, 3.7],
    }
    return rng.choice(pools[type(original)])


def deeply_nested() -> str:
    return "[" * DEEP + "]" * DEEP


def with_raw_field(config: dict[str, Any], name: str, raw: str) -> str:
    """``config`` as JSON text with field ``name`` set to the raw JSON ``raw`` (which json.dumps could not write)."""
    rest = json.dumps({k: v for k, v in config.items() if k != name})
    return rest[:-1] + (", " if len(rest) > 2 else "") + f"{json.dumps(name)}: {raw}}}"


def mutate_tensors(rng: random.Random, kind: str, tensors: dict[str, torch.Tensor], dtypes: list[torch.dtype]) -> str:
    """Apply one of TENSOR_MUTATIONS to ``tensors`` in place; returns what was done."""
    name = rng.choice(sorted(n for n, t in tensors.items() if kind != "poison tensor" or t.is_floating_point()))
    tensor = tensors.pop(name)
    if kind == "drop tensor":
        return name
    if kind == "rename tensor":
        suffix = rng.choice(["_x", ".0", "\n"])
        tensors[name + suffix] = tensor
        return f"{name} -> {name + suffix!r}"
    if kind == "reshape tensor":
        shapes = {
            "rank + 1": lambda t: t.unsqueeze(0),
            "rank - 1": lambda t: t.reshape(-1) if t.dim() > 1 else t.reshape(-1)[:1].reshape(()),
            "(1,)": lambda t: t.reshape(-1)[:1],
            "one row fewer": lambda t: t[:-1] if t.dim() else t.reshape(1),
        }
        how = rng.choice(sorted(shapes))
        tensors[name] = shapes[how](tensor).clone().contiguous()
        return f"{name} {how}"
    if kind == "retype tensor":
        dtype = rng.choice([d for d in dtypes if d != tensor.dtype])
        tensors[name] = tensor.to(dtype)
        return f"{name} {dtype}"
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    tensors[name] = tensor.clone()
    tensors[name].view(-1)[rng.randrange(tensor.numel())] = value
    return f"{name} {value}"


def flip_bytes(rng: random.Random, data: bytes, start: int, end: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
    return bytes(out)


def safetensors_header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def huge_safetensors(name: str) -> bytes:
    """A small file whose header claims a 3.2 GB tensor."""
    header = json.dumps({name: {"dtype": "F32", "shape": [100_000_000, 8], "data_offsets": [0, 3_200_000_000]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 64


def raw_damage(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    choice = rng.choice(["truncated", "empty", "garbage", "huge header length"])
    if choice == "truncated":
        return choice, data[: rng.randrange(len(data))]
    if choice == "empty":
        return choice, b""
    if choice == "garbage":
        return choice, bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 64, 4096])))
    return choice, struct.pack("<Q", 10**15) + data[8:]


# --- native files ----------------------------------------------------------------------------

NATIVE_KINDS = ["topk", "batchtopk", "jumprelu", "itda", "matryoshka_batchtopk"]
NATIVE_DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.float32]
CONFIG_MUTATIONS = ("delete field", "retype field", "site field", "huge size")
BYTE_MUTATIONS = ("flip bytes", "flip data bytes", "raw damage", "huge tensor")
NATIVE_MUTATIONS = (*CONFIG_MUTATIONS, "nested", "metadata", *TENSOR_MUTATIONS, "bad statistics", *BYTE_MUTATIONS)


def native_original(kind: str) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(7)
    std = Standardizer(8, mean=torch.randn(8, generator=gen), std=torch.rand(8, generator=gen) + 0.5)
    site = Site("flux", "double_blocks.18", "image", (0.0, 0.5))
    if kind == "itda":
        dictionary = ITDA(8, 2, loss_threshold=0.2, max_atoms=100, site=site, standardizer=std)
        dictionary.grow(torch.randn(30, 8, generator=gen) * 3, {"sample_id": torch.arange(30)})
    else:
        prefixes = (8, 16, 32) if kind == "matryoshka_batchtopk" else None
        dictionary = SparseAutoencoder(8, 32, 3, kind, site=site, standardizer=std, seed=4, prefixes=prefixes)
        with torch.no_grad():
            dictionary.b_enc.normal_(generator=gen)
            dictionary.b_dec.normal_(generator=gen)
            dictionary.threshold.uniform_(0.1, 0.5, generator=gen)
            dictionary.firing_frequency.uniform_(generator=gen)
    dictionary.metadata = {"training": {"steps": 7, "fvu": 0.25}}
    return dictionary


def read_native(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {name: f.get_tensor(name) for name in f.keys()}


def write_native(path: Path, config_text: str, tensors: dict[str, torch.Tensor], signing: str, original_meta: dict[str, str],
                 meta_changes: dict[str, str | None]) -> None:
    """Our header around ``config_text`` and ``tensors``: content hash recomputed ("resign", so that the
    checks behind it are reached), absent ("none") or the original's ("stale")."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_text}
    if signing == "resign":
        meta[HASH_KEY] = content_hash(config_text, tensors)
    elif signing == "stale":
        meta[HASH_KEY] = original_meta[HASH_KEY]
    meta.update(meta_changes)
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v is not None})


def mutate_config(rng: random.Random, kind: str, config: dict[str, Any]) -> str:
    """Apply one of CONFIG_MUTATIONS to ``config`` in place; returns what was done."""
    if kind == "huge size":
        name = rng.choice(["n_latents", "d_in"])
        config[name] = rng.choice([10**8, 10**6, 2**31 - 1])
        return f"{name}={config[name]}"
    record, prefix = (config["site"], "site.") if kind == "site field" else (config, "")
    name = rng.choice(sorted(record))
    if kind == "delete field" or (kind == "site field" and rng.random() < 0.5):
        del record[name]
        return f"{prefix}{name} deleted"
    record[name] = replacement(rng, record[name])
    return f"{prefix}{name}={record[name]!r}"


def metadata_change(rng: random.Random, original_meta: dict[str, str]) -> dict[str, str | None]:
    return rng.choice([{"format": None}, {"format": "other"}, {"format_version": "2"}, {"format_version": None},
                       {"config": None}, {"config": "{not json"}, {"config": "[1, 2]"}, {"config": "1" * 5000},
                       {HASH_KEY: "zz"}, {HASH_KEY: "0" * 64}, {"content_sha257": original_meta[HASH_KEY]}])


def damaged_bytes(rng: random.Random, kind: str, data: bytes) -> tuple[str, bytes]:
    """Apply one of BYTE_MUTATIONS to a native file's bytes."""
    if kind == "flip bytes":
        return "anywhere", flip_bytes(rng, data, 0, len(data))
    if kind == "flip data bytes":
        return "in the tensor data", flip_bytes(rng, data, safetensors_header_end(data), len(data))
    if kind == "raw damage":
        return raw_damage(rng, data)
    return "claims 3.2 GB", huge_safetensors("W_dec")


def json_view(value: Any) -> Any:
    return json.loads(json.dumps(value))


def native_judge(original: torch.nn.Module, file_config: dict[str, Any], file_tensors: dict[str, torch.Tensor]):
    """A load must carry exactly the file's config fields and tensors."""
    original_config = json_view(original.config())
    original_tensors = original.state_dict()

    def judge(loaded) -> str:
        got = json_view(loaded.config())
        aliases = {"k", "target_l0"} if got.get("kind") == "itda" else set()  # either stands for both
        absent = set(got) - set(file_config)
        if absent - aliases or (absent and absent == aliases) or any(got[key] != file_config[key] for key in set(got) & set(file_config)):
            raise Unfaithful(f"config {got} but the file says {file_config}")
        state = loaded.state_dict()
        if set(state) != set(file_tensors) or any(state[n].dtype != t.dtype or not torch.equal(state[n], t) for n, t in file_tensors.items()):
            raise Unfaithful("tensors differ from the file's")
        same = got == original_config and all(torch.equal(state[n], t) for n, t in original_tensors.items())
        return EQUAL if same else AS_WRITTEN

    return judge


def native_case(fuzz: Fuzz, original, path: Path, original_meta: dict[str, str], original_tensors: dict[str, torch.Tensor]) -> None:
    rng = fuzz.rng
    kind = rng.choice(NATIVE_MUTATIONS)
    config, tensors = json.loads(original_meta["config"]), dict(original_tensors)
    judge = native_judge(original, config, tensors)  # what the file says, once mutated below
    if kind in BYTE_MUTATIONS:  # of a saved file: the content hash covers every byte that matters
        detail, data = damaged_bytes(rng, kind, (path.parent / "original.safetensors").read_bytes())
        path.write_bytes(data)
        fuzz.case(f"{kind} {detail}", lambda: load_dictionary(path), native_judge(original, json_view(original.config()), original_tensors))
        return
    signing = rng.choices(["resign", "none", "stale"], weights=[6, 3, 1])[0]
    text, meta_changes = None, {}
    if kind in CONFIG_MUTATIONS:
        detail = mutate_config(rng, kind, config)
    elif kind == "nested":
        name = rng.choice([*sorted(config), "config"])
        text = deeply_nested() if name == "config" else with_raw_field(config, name, deeply_nested())
        detail = name
    elif kind == "metadata":
        meta_changes = metadata_change(rng, original_meta)
        detail = str(meta_changes)[:80]
    elif kind == "bad statistics":
        name = rng.choice(["standardizer.std", "standardizer.mean"])
        value = rng.choice([0.0, -1.0, float("nan"), float("inf")] if name.endswith("std") else [float("nan"), float("-inf")])
        tensors[name] = tensors[name].clone()
        tensors[name][rng.randrange(8)] = value
        detail = f"{name}={value}"
    else:
        detail = mutate_tensors(rng, kind, tensors, NATIVE_DTYPES)
    write_native(path, text or json.dumps(config), tensors, signing, original_meta, meta_changes)
    fuzz.case(f"{kind} ({signing}) {detail}", lambda: load_dictionary(path), judge)


@pytest.mark.parametrize("kind", NATIVE_KINDS)
def test_damaged_native_files_are_refused_or_load_as_written(tmp_path, capsys, kind):
    original = native_original(kind)
    save_dictionary(original, tmp_path / "original.safetensors")
    original_meta, original_tensors = read_native(tmp_path / "original.safetensors")
    fuzz = Fuzz(f"native {kind}", seed=NATIVE_KINDS.index(kind))
    for i in range(NATIVE_CASES):
        native_case(fuzz, original, tmp_path / f"case{i}.safetensors", original_meta, original_tensors)
    fuzz.report(capsys, NATIVE_CASES)


# --- foreign folders -------------------------------------------------------------------------

FOREIGN_DTYPES = [torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8]
"""Lossless (float64) or not weights at all: float16 would be a valid, different file."""
SETTING_MUTATIONS = ("delete setting", "null setting", "retype setting", "nested setting", "cfg raw damage")
WEIGHT_BYTE_MUTATIONS = ("weights raw damage", "flip header bytes", "huge tensor")


class Layout:
    """A foreign layout: how to write a valid folder, its files, and the settings it documents defaults for."""

    def __init__(self, name: str, write: Callable[[Path], Any], cfg: str, weights: str, optional: tuple[str, ...] = (),
                 statistics: tuple[str, ...] = ()):
        self.name, self.write, self.cfg, self.weights = name, write, cfg, weights
        self.optional, self.statistics = optional, statistics

    def mutations(self) -> tuple[str, ...]:
        return (*SETTING_MUTATIONS, *TENSOR_MUTATIONS, *WEIGHT_BYTE_MUTATIONS) + (("bad statistics",) if self.statistics else ())


def sdlens_with_statistics(folder: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    write_sdlens(folder, mean=torch.randn(12, generator=gen), std=torch.rand(12, generator=gen) + 0.5)


LAYOUTS = [
    Layout("saelens topk", lambda f: write_saelens(f, "topk"), "cfg.json", "sae_weights.safetensors", ("architecture", "metadata")),
    Layout("saelens jumprelu", lambda f: write_saelens(f, "jumprelu"), "cfg.json", "sae_weights.safetensors", ("architecture", "metadata")),
    Layout("sparsify", write_sparsify, "cfg.json", "sae.safetensors"),
    Layout("sdlens", sdlens_with_statistics, "config.json", "state_dict.pth", statistics=("mean.pt", "std.pt")),
    Layout("seed-A itda", write_seed_itda, "cfg.json", "sae.safetensors", ("loss_threshold", "fvu_loss", "subtract_mean")),
]


def comparable(dictionary) -> tuple[str, dict[str, torch.Tensor]]:
    config = dict(dictionary.config())
    config["metadata"] = {k: v for k, v in config["metadata"].items() if k != "seed_itda_cfg"}
    return json.dumps(config, sort_keys=True), dictionary.state_dict()


def foreign_judge(original, default_allowed: bool, cfg: dict[str, Any] | None):
    """Equal to the original (seed-A ITDA also records the file's cfg, as written); or, when the mutation
    removed a setting the layout documents a default for, any load."""
    want_config, want_tensors = comparable(original)

    def judge(loaded) -> str:
        got_config, got_tensors = comparable(loaded)
        recorded = loaded.metadata.get("seed_itda_cfg")
        if recorded is not None and cfg is not None and json.dumps(recorded, sort_keys=True) != json.dumps(cfg, sort_keys=True):
            raise Unfaithful("seed_itda_cfg is not the file's cfg")
        same = got_config == want_config and set(got_tensors) == set(want_tensors) and all(
            got_tensors[n].dtype == t.dtype and torch.equal(got_tensors[n], t) for n, t in want_tensors.items())
        if same:
            return EQUAL
        if default_allowed:
            return DEFAULT
        raise Unfaithful(f"loaded {got_config} differs from the original {want_config}")

    return judge


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], Callable[[dict[str, torch.Tensor]], None]]:
    """A weights file's tensors and a function that writes tensors back in the same format."""
    if path.suffix == ".safetensors":
        return load_file(str(path)), lambda t: save_file({k: v.contiguous() for k, v in t.items()}, str(path))
    state = torch.load(path, weights_only=True)
    return state["state_dict"], lambda t: torch.save({"state_dict": t}, path)


def pickle_region(data: bytes) -> tuple[int, int]:
    """Byte range of the pickle inside a torch zip file."""
    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.filename.endswith("data.pkl"))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def mutate_setting(rng: random.Random, kind: str, layout: Layout, cfg_path: Path) -> tuple[str, dict[str, Any] | None, bool]:
    """Apply one of SETTING_MUTATIONS to the config file: (what was done, the cfg as now written if it
    is JSON, whether the layout documents a default for what was removed)."""
    if kind == "cfg raw damage":
        detail, data = raw_damage(rng, cfg_path.read_bytes())
        cfg_path.write_bytes(data)
        return detail, None, False
    cfg = json.loads(cfg_path.read_text())
    name = rng.choice(sorted(cfg))
    if kind == "nested setting":
        cfg_path.write_text(with_raw_field(cfg, name, deeply_nested()))
        return name, None, False
    if kind == "delete setting":
        del cfg[name]
    else:
        cfg[name] = None if kind == "null setting" else replacement(rng, cfg[name])
    cfg_path.write_text(json.dumps(cfg))
    return f"{name}={cfg.get(name, 'deleted')!r}", cfg, kind != "retype setting" and name in layout.optional


def damage_statistics(rng: random.Random, path: Path) -> str:
    """Input statistics no input can be standardised by (std), or that are not numbers or not flat."""
    stat = torch.load(path, weights_only=True)
    change = rng.choice(["zero", "negative", "nan", "reshape"] if path.name == "std.pt" else ["nan", "reshape"])
    if change == "reshape":
        stat = stat[None]
    else:
        stat[rng.randrange(stat.numel())] = {"zero": 0.0, "negative": -1.0, "nan": float("nan")}[change]
    torch.save(stat, path)
    return f"{path.name} {change}"


def damage_weight_bytes(rng: random.Random, kind: str, path: Path) -> str:
    """Apply one of WEIGHT_BYTE_MUTATIONS, flipping only where the format can notice."""
    data = path.read_bytes()
    if kind == "weights raw damage":
        detail, data = raw_damage(rng, data)
    elif kind == "flip header bytes":
        detail = "in the pickle" if path.suffix == ".pth" else "in the header"
        data = flip_bytes(rng, data, *(pickle_region(data) if path.suffix == ".pth" else (0, safetensors_header_end(data))))
    else:
        detail = "claims 3.2 GB"
        data = huge_safetensors("W_dec") if path.suffix == ".safetensors" else b"PK\x03\x04" + b"\xff" * 60
    path.write_bytes(data)
    return detail


def foreign_case(fuzz: Fuzz, layout: Layout, base: Path, folder: Path, original) -> None:
    rng = fuzz.rng
    shutil.copytree(base, folder)
    kind = rng.choice(layout.mutations())
    cfg, default_allowed = json.loads((folder / layout.cfg).read_text()), False
    if kind in SETTING_MUTATIONS:
        detail, cfg, default_allowed = mutate_setting(rng, kind, layout, folder / layout.cfg)
    elif kind in TENSOR_MUTATIONS:
        tensors, save = read_weights(folder / layout.weights)
        detail = mutate_tensors(rng, kind, tensors, FOREIGN_DTYPES)
        save(tensors)
    elif kind == "bad statistics":
        detail = damage_statistics(rng, folder / rng.choice(layout.statistics))
    else:
        detail = damage_weight_bytes(rng, kind, folder / layout.weights)
    fuzz.case(f"{kind} {detail}", lambda: load_dictionary(folder), foreign_judge(original, default_allowed, cfg))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on a flipped protocol byte
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_damaged_foreign_folders_are_refused_or_load_as_the_original(tmp_path, capsys, layout):
    base = tmp_path / "original"
    layout.write(base)
    original = load_dictionary(base)
    fuzz = Fuzz(f"foreign {layout.name}", seed=100 + LAYOUTS.index(layout))
    for i in range(FOREIGN_CASES):
        foreign_case(fuzz, layout, base, tmp_path / f"case{i}" / base.name, original)  # sparsify names its hookpoint after its folder
    fuzz.report(capsys, FOREIGN_CASES)
