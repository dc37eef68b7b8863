"""The feature atlas: what a person opening it relies on (right statistics, right images, right words,
heatmaps where the feature fired, a page that opens offline) and that it scales to large dictionaries.
The statistics come from the feature index (tests/test_feature_index.py); the page is written from it."""
import json
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from sae_core import Site, SparseAutoencoder
from sae_core.errors import ConfigError, DictionaryError, InputError
from sae_core.feature_index import DictionaryIdentity, FeatureIndexBuilder
from sae_core.kernels import SparseCodes
from sae_core.sites import call_context
from training.atlas import write_atlas
from training.atlas_run import build_atlas

GRID = (4, 4)
TOP_LEFT = [0, 1, 4, 5]  # row-major tokens of the grid's top-left quadrant
PLANTED = [1.0, 0.5, 0.5, 0.25]  # feature 3's activation on those tokens, times the image's strength
# (prompt, strength of feature 3): it fires only on cat images
IMAGES = [("a cat on grass", 1.0), ("a dog on grass", 0.0), ("a cat in snow", 2.0), ("a dog in snow", 0.0),
          ("the cat sleeps <script>alert(1)</script>", 3.0), ("a bird flies", 0.0)]


def builder(folder, n_latents: int, top_m: int = 8) -> FeatureIndexBuilder:
    identity = DictionaryIdentity(file=None, kind="topk", site="toy:image", d_in=4, n_latents=n_latents,
                                  fingerprint="planted")
    return FeatureIndexBuilder(folder, identity, top_m=top_m)


def write(atlas: FeatureIndexBuilder, out, title="t", site_name="s", **options):
    """The page of a build, finishing it first (a finished index is written again as often as asked)."""
    return write_atlas(atlas.finish(), out, title, site_name, **options)


def planted_codes(strength: float) -> SparseCodes:
    """Feature 1 fires weakly on every token; feature 3 on the top-left quadrant with ``strength``.
    Unused slots hold value 0 and index 0, which must not count as firing."""
    values, indices = torch.zeros(16, 2), torch.zeros(16, 2, dtype=torch.int64)
    values[:, 0], indices[:, 0] = 0.1, 1
    if strength:
        values[TOP_LEFT, 1], indices[TOP_LEFT, 1] = strength * torch.tensor(PLANTED), 3
    return SparseCodes(values, indices)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    atlas = builder(out / "index", n_latents=8, top_m=4)
    gray = np.full((16, 16), 128, dtype=np.uint8)
    ids = [atlas.add(gray, prompt, planted_codes(s), GRID) for prompt, s in IMAGES]
    assert ids == list(range(len(IMAGES)))
    index = write(atlas, out, title="Planted <atlas>", site_name="toy:image")
    return index, json.loads((out / "atlas.json").read_text())


def test_planted_feature_statistics_are_exact(planted):
    _, stats = planted
    tokens = 16 * len(IMAGES)
    assert stats["n_images"] == len(IMAGES) and stats["n_tokens"] == tokens
    cat_strengths = [s for _, s in IMAGES if s]
    assert stats["frequency"][3] == pytest.approx(4 * len(cat_strengths) / tokens)
    assert stats["mean_activation"][3] == pytest.approx(sum(cat_strengths) * sum(PLANTED) / (4 * len(cat_strengths)))
    assert stats["images_fired"][3] == 3
    assert stats["frequency"][1] == pytest.approx(1.0) and stats["mean_activation"][1] == pytest.approx(0.1)


def test_planted_feature_top_images_are_the_cat_images_strongest_first(planted):
    _, stats = planted
    top = stats["features"]["3"]["top_images"]
    assert [image for image, _, _ in top] == [4, 2, 0]
    assert [peak for _, peak, _ in top] == pytest.approx([3.0, 2.0, 1.0])
    assert all("cat" in prompt for _, _, prompt in top)


def test_planted_feature_is_associated_with_cat_first(planted):
    _, stats = planted
    words = stats["features"]["3"]["words"]
    assert words[0][0] == "cat"
    assert words[0][1] == pytest.approx(2.0)  # mean peak on cat images (1+2+3)/3 minus 0 elsewhere
    # "sleeps" is in one image only: too little evidence to be listed
    assert "sleeps" not in [w for w, _ in words]
    # feature 1 fires alike on every image: no word goes with it
    assert stats["features"]["1"]["words"] == []


def test_heatmap_is_red_where_the_feature_fired(planted):
    index, stats = planted
    strip = np.asarray(Image.open(index.parent / stats["features"]["3"]["strip"]).convert("RGB")).astype(float)
    # the first tile is the 16 px image enlarged to 96 px, 4 px in from the strip's corner
    top_left, bottom_right = strip[12:40, 12:40], strip[64:92, 64:92]
    assert top_left[..., 0].mean() > bottom_right[..., 0].mean() + 80
    assert top_left[..., 0].mean() > top_left[..., 2].mean() + 80  # red/yellow, not the gray image


def test_index_opens_offline_and_escapes_prompts(planted):
    index, _ = planted
    page = index.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "&lt;script&gt;" in page and "Planted &lt;atlas&gt;" in page
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert "features/f00003.png" in refs and "firing_histogram.png" in refs
    for ref in refs:
        assert not ref.startswith("/") and ":" not in ref
        assert (index.parent / ref).is_file(), ref


def test_dead_features_are_counted_and_listed(planted):
    index, stats = planted
    assert stats["dead"] == [0, 2, 4, 5, 6, 7]
    assert all(stats["frequency"][f] == 0 for f in stats["dead"])
    assert set(stats["features"]) == {"1", "3"}
    assert "2 of 8 features fired; 6 dead" in index.read_text(encoding="utf-8")


def test_shown_features_are_those_fired_in_most_images_not_most_tokens(tmp_path):
    atlas = builder(tmp_path / "index", n_latents=8, top_m=2)
    gray = np.zeros((16, 16, 3), dtype=np.uint8)
    for i in range(3):
        # feature 5 covers all of image 0 (frequent), feature 6 one token of every image (widespread)
        values, indices = torch.zeros(16, 2), torch.zeros(16, 2, dtype=torch.int64)
        values[0, 0], indices[0, 0] = 1.0, 6
        if i == 0:
            values[:, 1], indices[:, 1] = 1.0, 5
        atlas.add(gray, "x", SparseCodes(values, indices), GRID)
    write(atlas, tmp_path)
    stats = json.loads((tmp_path / "atlas.json").read_text())
    assert stats["frequency"][5] > stats["frequency"][6]
    assert list(stats["features"]) == ["6", "5"]
    write(atlas, tmp_path / "one", n_features=1)
    assert list(json.loads((tmp_path / "one" / "atlas.json").read_text())["features"]) == ["6"]
    write(atlas, tmp_path / "min", min_images=2)
    assert list(json.loads((tmp_path / "min" / "atlas.json").read_text())["features"]) == ["6"]


def test_top_lists_keep_the_strongest_images_and_free_the_rest(tmp_path):
    atlas = builder(tmp_path / "index", n_latents=4, top_m=2)
    gray = np.zeros((16, 16), dtype=np.uint8)
    for strength in [5, 9, 1, 7, 3, 8, 2]:  # one feature, firing on every token with this strength
        codes = SparseCodes(torch.full((16, 1), float(strength)), torch.zeros(16, 1, dtype=torch.int64))
        atlas.add(gray, "x", codes, GRID)
    assert atlas.kept_images == 2  # memory holds only what some top list needs
    write(atlas, tmp_path)
    top = json.loads((tmp_path / "atlas.json").read_text())["features"]["0"]["top_images"]
    assert [(image, peak) for image, peak, _ in top] == [(1, 9.0), (5, 8.0)]


def test_images_without_a_grid_get_plain_frames(tmp_path):
    atlas = builder(tmp_path / "index", n_latents=4, top_m=2)
    pixels = np.full((40, 30, 3), 200, dtype=np.uint8)
    atlas.add(pixels, "pooled", SparseCodes(torch.tensor([[2.0]]), torch.tensor([[1]])), None)
    index = write(atlas, tmp_path)
    strip = np.asarray(Image.open(tmp_path / "features" / "f00001.png").convert("RGB"))
    assert strip.shape[0] >= 96 + 8  # small images are enlarged
    assert (strip[20:60, 20:60] == 200).all()  # the image itself, no overlay
    assert index.is_file()


def test_fifty_thousand_latents_stay_fast(tmp_path, one_thread):
    # a Python loop over latents in add() would take seconds per image here
    n_latents, tokens, k = 50_000, 256, 16
    g = torch.Generator().manual_seed(0)
    atlas = builder(tmp_path / "index", n_latents, top_m=8)
    start = time.perf_counter()
    for i in range(6):
        codes = SparseCodes(torch.rand(tokens, k, generator=g), torch.randint(0, n_latents, (tokens, k), generator=g))
        atlas.add(np.zeros((64, 64, 3), dtype=np.uint8), f"image {i} of a big dictionary", codes, (16, 16))
    added = time.perf_counter() - start
    cpu = time.process_time()
    write(atlas, tmp_path, "big", n_features=10)
    # adding an image costs per token, not per latent; writing is one pass over the 50k records (CPU time: the
    # page files' fsyncs wait on a busy disk, not on this code)
    assert added < 1.0 and time.process_time() - cpu < 8.0
    stats = json.loads((tmp_path / "atlas.json").read_text())
    assert len(stats["frequency"]) == n_latents and len(stats["features"]) == 10
    assert len(stats["dead"]) == n_latents - int((atlas.images_fired > 0).sum())


def test_grid_that_does_not_match_the_tokens_is_refused(tmp_path):
    atlas = builder(tmp_path, n_latents=8)
    with pytest.raises(InputError, match=r"grid \(4, 5\).*20 cells.*16 tokens"):
        atlas.add(np.zeros((16, 16), dtype=np.uint8), "x", planted_codes(1.0), (4, 5))


def test_latent_index_beyond_the_dictionary_is_refused(tmp_path):
    atlas = builder(tmp_path, n_latents=8)
    codes = SparseCodes(torch.ones(16, 1), torch.full((16, 1), 8, dtype=torch.int64))
    with pytest.raises(DictionaryError, match=r"latent index 8 is out of range.*8 latents"):
        atlas.add(np.zeros((16, 16), dtype=np.uint8), "x", codes, GRID)
    assert atlas.n_images == 0  # a refused image leaves no trace


class ToyRunner:
    """A runner whose model calls the site 4 times per generation (uncond and cond rows, as batched guidance lays
    them out) with tokens made from each sample's seed; it dies after ``die_after`` generations when told to."""

    name = "toy"

    def __init__(self, die_after: int | None = None):
        self.die_after, self.generated = die_after, []

    def generate(self, prompts, seeds, site_functions):
        if self.die_after is not None and len(self.generated) >= self.die_after:
            raise KeyboardInterrupt("killed")
        self.generated.append(list(prompts))
        (function,) = site_functions.values()
        for step, progress in enumerate((0.0, 0.33, 0.66, 1.0)):
            rows = [torch.randn(16, 8, generator=torch.Generator().manual_seed(s * 10 + step)) for s in seeds]
            cond = [False] * len(seeds) + [True] * len(seeds)
            function(torch.stack(rows + rows), call_context(2 * len(seeds), progress=progress, cond=cond).at(GRID))
        return torch.stack([torch.full((3, 16, 16), (s % 7) / 7) for s in seeds])


def test_the_atlas_command_resumes_a_killed_build_and_skips_the_prompts_done(tmp_path):
    sae = SparseAutoencoder(8, 32, 3, site=Site("toy", "block", "image"), seed=0)
    prompts = [f"a {colour} {animal}" for colour in ("red", "blue", "green") for animal in ("cat", "dog", "bird")]
    options = dict(images_per_prompt=1, seed=5, top_m=3, batch_size=2, checkpoint_every=4)
    build_atlas(ToyRunner(), sae, sae.site, prompts, tmp_path / "whole", **options)
    with pytest.raises(KeyboardInterrupt):
        build_atlas(ToyRunner(die_after=3), sae, sae.site, prompts, tmp_path / "broken", **options)
    rerun = ToyRunner()
    page = build_atlas(rerun, sae, sae.site, prompts, tmp_path / "broken", **options)
    assert [p for batch in rerun.generated for p in batch] == prompts[4:]  # the checkpoint held 4 images
    assert page.read_text() == (tmp_path / "whole" / "index.html").read_text()
    for name in ("atlas.json", "index/summary.json", "index/features/00000.json"):
        assert (tmp_path / "broken" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    again = ToyRunner()
    build_atlas(again, sae, sae.site, prompts, tmp_path / "broken", **options)
    assert again.generated == []  # a finished index is reused
    with pytest.raises(ConfigError, match="other settings.*top_m.*pass a new folder, or overwrite"):
        build_atlas(ToyRunner(), sae, sae.site, prompts, tmp_path / "broken", **{**options, "top_m": 4})
    overwritten = ToyRunner()
    build_atlas(overwritten, sae, sae.site, prompts, tmp_path / "broken", **{**options, "top_m": 4}, overwrite=True)
    assert len(overwritten.generated) == 5
