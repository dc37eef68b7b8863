"""The feature index: what the atlas, the ComfyUI node and the feature browser rely on. Statistics equal a brute-force
computation, memory holds only what top lists need, a killed build resumes to the very same files, pages come
sorted and searched without reading every page, and an index is never read with the wrong dictionary."""
import json
import math
import pathlib
import random
import time

import numpy as np
import pytest
import torch

from sae_core import SparseAutoencoder, save_dictionary
from sae_core.errors import ConfigError, DictionaryError, InputError, ScheduleError
from sae_core.feature_index import (HISTOGRAM_BINS, PAGE_SIZE, PROGRESS_BINS, DictionaryIdentity, FeatureIndexBuilder,
                                    IndexProbe, index_folder_for, label_texts, open_index, tally)
from sae_core.kernels import SparseCodes, codes_to_dense
from sae_core.sites import call_context

N_LATENTS, TOKENS, K, TOP_M = 12, 16, 3, 3
GRID = (4, 4)
WORDS = ["cat", "dog", "snow", "grass", "red", "blue"]


def identity(n_latents: int = N_LATENTS, fingerprint: str = "decoder-sha256:test") -> DictionaryIdentity:
    return DictionaryIdentity(file="toy.safetensors", kind="topk", site="toy:image", d_in=4, n_latents=n_latents,
                              fingerprint=fingerprint)


def random_codes(rng: random.Random, n_latents: int = N_LATENTS, tokens: int = TOKENS, k: int = K) -> SparseCodes:
    """Distinct latents per token; about a third of the slots unused (value 0), which must not count as firing."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    indices = torch.stack([torch.randperm(n_latents, generator=g)[:k] for _ in range(tokens)])
    values = torch.rand(tokens, k, generator=g) * 3
    values[torch.rand(tokens, k, generator=g) < 0.35] = 0.0
    return SparseCodes(values, indices)


def random_images(seed: int, n: int, calls: int = 4) -> list[dict]:
    """Images with a prompt, a chosen call's codes and several calls (progress, cond) for the profiles."""
    rng = random.Random(seed)
    images = []
    for i in range(n):
        profile = [(random_codes(rng), rng.random(), rng.random() < 0.5) for _ in range(calls)]
        images.append({"pixels": np.full((8, 8, 3), (37 * i) % 256, dtype=np.uint8),
                       "prompt": " ".join(rng.sample(WORDS, 2)), "codes": random_codes(rng), "calls": profile})
    return images


def feed(builder: FeatureIndexBuilder, images: list[dict], checkpoints: bool = True) -> None:
    for image in images:
        calls = [tally(codes, progress=p, sigma=1 - p, cond=c) for codes, p, c in image["calls"]]
        builder.add(image["pixels"], image["prompt"], image["codes"], GRID, progress=0.5, calls=calls, seed=7)
        if checkpoints:
            builder.maybe_checkpoint()


def build(folder, images: list[dict], **options) -> FeatureIndexBuilder:
    builder = FeatureIndexBuilder(folder, identity(), top_m=TOP_M, **options)
    feed(builder, images)
    return builder


# ----------------------------------------------------------------------------- statistics


def brute_force(images: list[dict]) -> dict:
    """Every statistic from dense activation matrices, written independently of the builder."""
    dense = [codes_to_dense(im["codes"], N_LATENTS) for im in images]
    fired = [d > 0 for d in dense]
    fire = sum(f.sum(0) for f in fired).double()
    total = sum((d * f).sum(0) for d, f in zip(dense, fired)).double()
    peaks = torch.stack([d.amax(0) for d in dense])
    histogram = torch.zeros(N_LATENTS, HISTOGRAM_BINS, dtype=torch.int64)
    steps = torch.zeros(2, PROGRESS_BINS, N_LATENTS, dtype=torch.float64)  # fires, sums
    step_tokens = torch.zeros(PROGRESS_BINS)
    groups = torch.zeros(2, 2, N_LATENTS, dtype=torch.float64)
    group_tokens = torch.zeros(2)
    for d in dense:
        for token, f in (d > 0).nonzero().tolist():
            histogram[f, min(max(math.floor(4 * math.log10(d[token, f])) + 12, 0), HISTOGRAM_BINS - 1)] += 1
    for im in images:
        for codes, progress, cond in im["calls"]:
            d = codes_to_dense(codes, N_LATENTS).double()
            b, g = min(int(progress * PROGRESS_BINS), PROGRESS_BINS - 1), 0 if cond else 1
            for where, tokens, at in ((steps, step_tokens, b), (groups, group_tokens, g)):
                where[0, at] += (d > 0).sum(0)
                where[1, at] += d.sum(0)
                tokens[at] += TOKENS
    return {"fire": fire, "total": total, "peaks": peaks, "histogram": histogram, "steps": steps,
            "step_tokens": step_tokens, "groups": groups, "group_tokens": group_tokens}


def expected_words(images: list[dict], peaks: torch.Tensor, feature: int) -> list[str]:
    words = {w for im in images for w in im["prompt"].split()}
    scores = []
    for word in sorted(words):
        has = torch.tensor([word in im["prompt"].split() for im in images])
        if 2 <= int(has.sum()) < len(images):
            score = float(peaks[has, feature].mean() - peaks[~has, feature].mean())
            if score > 1e-3 * float(peaks[:, feature].max()):
                scores.append((score, word))
    return [w for _, w in sorted(scores, reverse=True)[:5]]


@pytest.fixture(scope="module")
def random_index(tmp_path_factory):
    images = random_images(seed=1, n=30)
    index = build(tmp_path_factory.mktemp("random") / "idx", images, checkpoint_every=7).finish()
    return index, images, brute_force(images)


def test_statistics_equal_a_brute_force_computation(random_index):
    index, images, truth = random_index
    for f in range(N_LATENTS):
        record = index.feature(f)
        fire = float(truth["fire"][f])
        assert record["frequency"] == pytest.approx(fire / (TOKENS * len(images)), rel=1e-5)
        assert record["mean"] == pytest.approx(float(truth["total"][f]) / max(fire, 1), rel=1e-5)
        assert record["images"] == int((truth["peaks"][:, f] > 0).sum())
        assert record["max"] == pytest.approx(float(truth["peaks"][:, f].max()), rel=1e-5)
        assert record["histogram"] == truth["histogram"][f].tolist()


def test_timestep_and_guidance_profiles_equal_a_brute_force_computation(random_index):
    index, _, truth = random_index
    header = index.header["profile"]
    assert header["tokens"] == truth["step_tokens"].int().tolist()
    assert header["guidance_tokens"] == {"cond": int(truth["group_tokens"][0]), "uncond": int(truth["group_tokens"][1])}
    assert header["sigma_mean"][0] is None or 0.0 <= header["sigma_mean"][0] <= 1.0
    for f in range(N_LATENTS):
        record = index.feature(f)
        for name, (fires_sums, tokens) in {"timesteps": (truth["steps"], truth["step_tokens"]),
                                           "guidance": (truth["groups"], truth["group_tokens"])}.items():
            fires, sums = fires_sums[0][:, f], fires_sums[1][:, f]
            assert record[name]["rate"] == pytest.approx((fires / tokens.clamp_min(1)).tolist(), rel=1e-5), name
            assert record[name]["mean"] == pytest.approx((sums / fires.clamp_min(1)).tolist(), rel=1e-5), name


def test_top_images_are_the_strongest_peaks_and_words_follow_the_atlas_method(random_index):
    index, images, truth = random_index
    peaks = truth["peaks"]
    for f in range(N_LATENTS):
        record = index.feature(f)
        order = sorted((i for i in range(len(images)) if peaks[i, f] > 0), key=lambda i: (-float(peaks[i, f]), i))
        assert [t["image"] for t in record["top"]] == order[:TOP_M]
        assert [t["prompt"] for t in record["top"]] == [images[i]["prompt"] for i in order[:TOP_M]]
        assert all(t["seed"] == 7 for t in record["top"])
        assert [w for w, _ in record["words"]] == expected_words(images, peaks, f)
        assert record["score"] == (record["words"][0][1] if record["words"] else 0.0)


def test_heatmap_holds_the_feature_activation_per_token_and_tiles_show_it(tmp_path):
    builder = FeatureIndexBuilder(tmp_path / "idx", identity(n_latents=4), top_m=2)
    values, indices = torch.zeros(16, 1), torch.zeros(16, 1, dtype=torch.int64)
    values[[0, 1, 4, 5], 0], indices[:, 0] = torch.tensor([4.0, 2.0, 2.0, 1.0]), 3
    builder.add(np.full((16, 16), 128, dtype=np.uint8), "a cat", SparseCodes(values, indices), GRID)
    index = builder.finish()
    expected = np.zeros(16, dtype=np.float32)
    expected[[0, 1, 4, 5]] = [4, 2, 2, 1]
    np.testing.assert_array_equal(index.heatmap(3, 0), expected.reshape(GRID))
    tile = np.asarray(index.tile(3, 0)).astype(float)
    assert tile.shape == (96, 96, 3)  # a 16 px image is enlarged for people to see
    assert tile[:30, :30, 0].mean() > tile[66:, 66:, 0].mean() + 80
    assert index.image_path(3, 0).name == "000000.png" and index.image_path(3, 0).is_file()
    with pytest.raises(InputError, match="feature 3 has 1 top image"):
        index.image_path(3, 1)
    with pytest.raises(DictionaryError, match="features 0..3"):
        index.feature(4)


# ----------------------------------------------------------------------------- memory and resume


def test_memory_holds_only_the_images_some_top_list_needs(tmp_path):
    builder = FeatureIndexBuilder(tmp_path / "idx", identity(n_latents=4), top_m=2, checkpoint_every=10)
    rng = random.Random(3)
    for i in range(120):
        builder.add(np.zeros((8, 8), dtype=np.uint8), "x", random_codes(rng, n_latents=4, k=2), GRID)
        builder.maybe_checkpoint()
        assert builder.kept_images <= 4 * 2
    builder.checkpoint()
    assert len(list((tmp_path / "idx" / "images").glob("*.png"))) == builder.kept_images
    index = builder.finish()
    held = {t["image"] for f in range(4) for t in index.feature(f)["top"]}
    assert {int(p.stem) for p in (tmp_path / "idx" / "images").glob("*.png")} == held


def folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_build_resumes_to_the_same_files_as_an_unbroken_one(tmp_path):
    images = random_images(seed=2, n=23)
    build(tmp_path / "whole", images, checkpoint_every=5).finish()

    killed = build(tmp_path / "broken", images[:13], checkpoint_every=5)  # checkpoints at 5 and 10, dies at 13
    del killed
    for leftover in ("000011.safetensors", ".000012.png.x1.tmp"):  # as a kill inside a write or finish leaves them
        (tmp_path / "broken" / "images" / leftover).write_bytes(b"partial")
    resumed = FeatureIndexBuilder(tmp_path / "broken", identity(), top_m=TOP_M, checkpoint_every=5)
    assert resumed.n_images == 10  # images 10..12 were after the last checkpoint: fed again
    feed(resumed, images[10:])
    resumed.finish()
    whole, broken = folder_bytes(tmp_path / "whole"), folder_bytes(tmp_path / "broken")
    assert sorted(whole) == sorted(broken) and "state.safetensors" not in whole
    for name in whole:
        assert whole[name] == broken[name], name


def test_a_finished_build_reopens_complete_and_refuses_more_images(tmp_path):
    images = random_images(seed=4, n=3)
    build(tmp_path / "idx", images).finish()
    again = FeatureIndexBuilder(tmp_path / "idx", identity(), top_m=TOP_M)
    assert again.complete and again.n_images == 3
    assert again.finish().header["counts"]["images"] == 3
    with pytest.raises(InputError, match="complete index"):
        feed(again, images[:1])


def test_a_build_with_other_settings_or_another_dictionary_refuses_to_resume(tmp_path):
    build(tmp_path / "idx", random_images(seed=5, n=4), checkpoint_every=2)
    with pytest.raises(ConfigError, match=r"other settings \(top_m\); pass a new folder, or overwrite"):
        FeatureIndexBuilder(tmp_path / "idx", identity(), top_m=TOP_M + 1)
    with pytest.raises(ConfigError, match=r"other settings \(source.seed\)"):
        FeatureIndexBuilder(tmp_path / "idx", identity(), top_m=TOP_M, source={"seed": 1})
    with pytest.raises(DictionaryError, match="another dictionary.*pass a new folder, or overwrite"):
        FeatureIndexBuilder(tmp_path / "idx", identity(fingerprint="decoder-sha256:other"), top_m=TOP_M)
    fresh = FeatureIndexBuilder(tmp_path / "idx", identity(fingerprint="decoder-sha256:other"), top_m=TOP_M,
                                overwrite=True)
    assert fresh.n_images == 0 and not list((tmp_path / "idx" / "images").glob("*.png"))


def test_a_folder_holding_other_files_is_not_taken_over(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty and holds no feature index"):
        FeatureIndexBuilder(tmp_path, identity())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_damaged_checkpoint_is_refused_with_the_way_out(tmp_path):
    build(tmp_path / "idx", random_images(seed=6, n=4), checkpoint_every=2)
    state = tmp_path / "idx" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(InputError, match="checkpoint.*damaged.*overwrite"):
        FeatureIndexBuilder(tmp_path / "idx", identity(), top_m=TOP_M)


def test_bad_inputs_are_refused_without_a_trace(tmp_path):
    builder = FeatureIndexBuilder(tmp_path / "idx", identity(), top_m=TOP_M)
    codes = random_codes(random.Random(0))
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(InputError, match=r"grid \(4, 5\).*20 cells.*16 tokens"):
        builder.add(image, "x", codes, (4, 5))
    with pytest.raises(DictionaryError, match="latent index 12 is out of range.*12 latents"):
        builder.add(image, "x", SparseCodes(torch.ones(16, 1), torch.full((16, 1), 12)), GRID)
    with pytest.raises(DictionaryError, match="latent index 40"):
        builder.add(image, "x", codes, GRID, calls=[tally(SparseCodes(torch.ones(1, 1), torch.tensor([[40]])))])
    with pytest.raises(InputError, match="NaN or inf"):
        builder.add(image, "x", SparseCodes(torch.full((16, 1), math.nan), torch.zeros(16, 1, dtype=torch.long)), GRID)
    with pytest.raises(InputError, match="uint8"):
        builder.add(image.astype(np.float32), "x", codes, GRID)
    assert builder.n_images == 0 and builder.n_tokens == 0 and int(builder.fire_count.sum()) == 0
    with pytest.raises(InputError, match="no image was added"):
        builder.finish()


# ----------------------------------------------------------------------------- the probe


def test_probe_reads_the_first_call_at_progress_and_tallies_every_call(tmp_path):
    sae = SparseAutoencoder(8, N_LATENTS, 2, seed=0)
    probe = IndexProbe(sae, at=0.5)
    probe.begin(2)
    g = torch.Generator().manual_seed(0)
    calls = []
    for progress in (0.0, 0.25, 0.5, 0.75):  # batched guidance: rows uncond 0, uncond 1, cond 0, cond 1
        h = torch.randn(4, TOKENS, 8, generator=g)
        ctx = call_context(4, progress=progress, sigma=1 - progress, cond=[False, False, True, True]).at(GRID)
        assert probe(h, ctx) is h
        calls.append(h)
    builder = FeatureIndexBuilder(tmp_path / "idx", identity(), top_m=TOP_M)
    pixels = [np.zeros((8, 8), dtype=np.uint8)] * 2
    assert probe.feed(builder, pixels, ["a cat", "a dog"], seeds=[10, 11]) == [0, 1]
    chosen = sae.encode(calls[2][2:].reshape(-1, 8))  # the cond rows of the call at progress 0.5
    dense = codes_to_dense(chosen, N_LATENTS)
    assert torch.equal(builder.fire_count, (dense > 0).sum(0).double())
    index = builder.finish()
    assert index.header["profile"]["guidance_tokens"] == {"cond": 2 * 4 * TOKENS, "uncond": 2 * 4 * TOKENS}
    assert index.header["profile"]["tokens"] == [2 * 2 * TOKENS if b in (0, 2, 5, 7) else 0
                                                 for b in range(PROGRESS_BINS)]


def test_probe_without_a_call_at_the_chosen_progress_says_so(tmp_path):
    probe = IndexProbe(SparseAutoencoder(8, N_LATENTS, 2, seed=0), at=0.9)
    probe(torch.randn(1, TOKENS, 8), call_context(1, progress=0.2).at(GRID))
    builder = FeatureIndexBuilder(tmp_path / "idx", identity(), top_m=TOP_M)
    with pytest.raises(ScheduleError, match="progress >= 0.9"):
        probe.feed(builder, [np.zeros((8, 8), dtype=np.uint8)], ["x"])


# ----------------------------------------------------------------------------- reading


def test_pages_come_sorted_and_the_same_from_page_files_or_summary(random_index):
    index, _, _ = random_index
    everything = [index.feature(f) for f in range(N_LATENTS)]
    for sort in ("frequency", "images", "mean", "score"):
        rows = index.page(0, N_LATENTS, sort=sort)["features"]
        expected = sorted(everything, key=lambda r: (-r[sort], r["id"]))
        assert [r["id"] for r in rows] == [r["id"] for r in expected], sort
        assert [r["id"] for r in index.page(3, 4, sort=sort)["features"]] == [r["id"] for r in expected[3:7]]
    by_id = index.page(0, N_LATENTS, sort="id")
    assert by_id["total"] == N_LATENTS and [r["id"] for r in by_id["features"]] == list(range(N_LATENTS))
    from_summary = {r["id"]: r for r in index.page(0, N_LATENTS, sort="frequency")["features"]}
    assert all(row == from_summary[row["id"]] for row in by_id["features"])
    assert index.page(N_LATENTS + 5, 10, sort="id")["features"] == []


def test_queries_match_words_and_labels(random_index, tmp_path):
    index, _, _ = random_index
    with_cat = [f for f in range(N_LATENTS) if "cat" in [w for w, _ in index.feature(f)["words"]]]
    found = index.page(0, 100, sort="id", query=" CAT ")
    assert [r["id"] for r in found["features"]] == with_cat and found["total"] == len(with_cat)
    labelled = open_index(index.folder, labels=lambda f: "zebra stripes" if f == 5 else None)
    rows = labelled.page(0, 100, sort="frequency", query="zebra")["features"]
    assert [(r["id"], r["label"]) for r in rows] == [(5, "zebra stripes")]
    labels_file = index.folder / "labels.json"
    labels_file.write_text(json.dumps({"features": {"2": {"vlm": {"text": "a red square", "status": "ok"},
                                                          "words": {"text": "red", "status": "ok"}}}}))
    try:
        rows = open_index(index.folder).page(0, 10, sort="id", query="square")["features"]
        assert [(r["id"], r["label"]) for r in rows] == [(2, "a red square / red")]
    finally:
        labels_file.unlink()


def test_labels_written_by_the_label_store_are_searched(random_index):
    from sae_core.labels import Label, LabelStore

    index, _, _ = random_index
    store = LabelStore(index.folder)
    try:
        store.put(Label(4, "striped fur", "vlm", 0.8), Label(4, "cat", "words"), Label(6, "", "vlm", status="timeout"))
        rows = open_index(index.folder).page(0, 10, sort="score", query="STRIPED")["features"]
        assert [(r["id"], r["label"]) for r in rows] == [(4, "striped fur / cat")]  # sources in the file's order
        assert open_index(index.folder).page(6, 1, sort="id")["features"][0]["label"] is None
        assert open_index(index.folder).label(4) == "striped fur / cat" and open_index(index.folder).label(5) is None
    finally:
        store.path.unlink()


def test_label_files_of_several_shapes_are_read():
    assert label_texts({"3": "snow"}) == {3: "snow"}
    assert label_texts([{"feature": 4, "text": "dog", "source": "vlm", "status": "ok"},
                        {"feature": 5, "text": "", "status": "timeout"},
                        {"feature": 6, "text": "x", "status": "refused"}]) == {4: "dog"}
    assert label_texts({"labels": {"7": [{"source": "words", "text": "cat"}]}}) == {7: "cat"}
    assert label_texts(None) == {} and label_texts("garbage") == {}


def test_page_arguments_are_checked(random_index):
    index, _, _ = random_index
    for kwargs, message in (({"sort": "colour"}, "sort='colour'"), ({"offset": -1}, "offset -1"),
                            ({"limit": 0}, "limit 0"), ({"limit": "ten"}, "limit must be a whole number"),
                            ({"query": 5}, "query must be text")):
        with pytest.raises(InputError, match=message):
            index.page(**kwargs)


@pytest.fixture(scope="module")
def big_index(tmp_path_factory):
    """A 50k-latent index over a few random images (most features silent, as in a real large dictionary)."""
    n_latents, g = 50_000, torch.Generator().manual_seed(0)
    builder = FeatureIndexBuilder(tmp_path_factory.mktemp("big") / "idx", identity(n_latents=n_latents), top_m=8)
    for i in range(4):
        codes = SparseCodes(torch.rand(256, 16, generator=g), torch.randint(0, n_latents, (256, 16), generator=g))
        builder.add(np.zeros((32, 32, 3), dtype=np.uint8), f"image {i} of a big dictionary", codes, (16, 16))
    return builder.finish()


@pytest.fixture
def opened(monkeypatch):
    """The files read through pathlib from now on (every JSON file of an index is)."""
    names: list[str] = []
    real_open = pathlib.Path.open

    def counting_open(self, *args, **kwargs):
        names.append(self.relative_to(self.parents[1]).as_posix() if self.parent.name in ("features", "images")
                     else self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", counting_open)
    return names


def test_a_large_index_answers_a_page_by_id_from_one_page_file(big_index, opened):
    index = open_index(big_index.folder)
    opened.clear()
    start = time.perf_counter()
    page = index.page(PAGE_SIZE * 100, PAGE_SIZE, sort="id")
    assert time.perf_counter() - start < 0.5
    assert [r["id"] for r in page["features"]] == list(range(PAGE_SIZE * 100, PAGE_SIZE * 101))
    assert opened == [f"features/{PAGE_SIZE * 100:05d}.json"]
    index.feature(PAGE_SIZE * 100 + 3)
    assert len(opened) == 1  # the page is cached


def test_a_large_index_sorts_and_searches_from_the_summary_alone(big_index, opened):
    index = open_index(big_index.folder)
    opened.clear()
    page = index.page(0, PAGE_SIZE, sort="frequency")
    frequencies = [r["frequency"] for r in page["features"]]
    assert frequencies == sorted(frequencies, reverse=True) and frequencies[0] > 0
    assert index.page(0, 10, sort="id", query="nothing matches this")["total"] == 0
    assert opened == ["summary.json"]


def test_an_index_is_refused_with_another_dictionary(tmp_path):
    sae, other = SparseAutoencoder(8, N_LATENTS, 2, seed=0), SparseAutoencoder(8, N_LATENTS, 2, seed=1)
    path = save_dictionary(sae, tmp_path / "toy.safetensors")
    folder = index_folder_for(path)
    assert folder == tmp_path / "toy.features"
    builder = FeatureIndexBuilder(folder, DictionaryIdentity.of(sae, path), top_m=2)
    feed(builder, random_images(seed=8, n=2))
    builder.finish()
    assert open_index(folder, dictionary=sae).header["dictionary"]["file"] == "toy.safetensors"
    assert open_index(folder, dictionary=path).n_latents == N_LATENTS
    with pytest.raises(DictionaryError, match="index of another dictionary.*rebuild it for this dictionary"):
        open_index(folder, dictionary=other)
    with pytest.raises(DictionaryError, match="index of another dictionary"):
        open_index(folder, dictionary=save_dictionary(other, tmp_path / "other.safetensors"))


@pytest.mark.parametrize("damage, message", [
    (lambda h: "{not json", r"index.json \(the index header\) is damaged"),
    (lambda h: json.dumps([1, 2]), "not a feature index header"),
    (lambda h: json.dumps({**h, "format_version": 99}), "format version 99; this version reads 1: rebuild"),
    (lambda h: json.dumps({**h, "dictionary": {"kind": "topk"}}), "dictionary identity is unreadable"),
    (lambda h: json.dumps({**h, "complete": False}), "unfinished index build; run the build again"),
    (lambda h: json.dumps({**h, "settings": None}), "no build settings"),
])
def test_a_damaged_index_is_refused_with_a_clear_error(tmp_path, damage, message):
    build(tmp_path / "idx", random_images(seed=9, n=2)).finish()
    header = tmp_path / "idx" / "index.json"
    header.write_text(damage(json.loads(header.read_text())))
    with pytest.raises(InputError, match=message):
        open_index(tmp_path / "idx")


def test_a_folder_that_is_not_an_index_and_damaged_pages_are_refused(tmp_path):
    with pytest.raises(InputError, match="is not a feature index"):
        open_index(tmp_path)
    index = build(tmp_path / "idx", random_images(seed=10, n=2)).finish()
    (index.folder / "features" / "00000.json").write_text('{"first": 0, "features": [{"id": 1}]}')
    (index.folder / "summary.json").write_text('{"frequency": []}')
    with pytest.raises(InputError, match="00000.json is damaged"):
        index.feature(0)
    with pytest.raises(InputError, match="summary.json is damaged"):
        index.page(sort="frequency")
