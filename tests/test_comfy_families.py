"""Every diffusion-transformer family ComfyUI 0.3.75 runs, through ComfyUI's own sampler.

One tiny random-weight instance per family (``tiny_comfy_models.TINY_FAMILIES``: FLUX.1, FLUX.2, Chroma,
HunyuanVideo, AuraFlow, Qwen-Image, SD3, Wan, LTX-Video, Lumina 2, Z-Image, HiDream), built by
``comfy.supported_models``; ``comfy.sample.sample`` runs it at cfg 2 (cond and uncond batched, two rows).
Each test states one promise of the adapters for every family: which sites exist, what a site function
sees, that edits land exactly where they are asked (by value), and that nothing leaks into the model.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import tiny_comfy_models as tiny
from site_probes import Recorder

NAMES = list(tiny.TINY_FAMILIES)
BOTH = ("image", "text", "update")
IMAGE = ("image", "update")
BLOCKS = {
    "flux": {"double_blocks": BOTH, "single_blocks": BOTH},
    "flux2": {"double_blocks": BOTH, "single_blocks": BOTH},
    "chroma": {"double_blocks": BOTH, "single_blocks": BOTH},
    "hunyuan_video": {"double_blocks": BOTH, "single_blocks": BOTH},
    "aura_flow": {"double_layers": BOTH, "single_layers": BOTH},
    "qwen_image": {"transformer_blocks": BOTH},
    "sd3": {"joint_blocks": BOTH},
    "wan": {"blocks": IMAGE},
    "ltxv": {"transformer_blocks": IMAGE},
    "lumina2": {"noise_refiner": IMAGE, "context_refiner": ("text",), "layers": BOTH},
    "z_image": {"noise_refiner": IMAGE, "context_refiner": ("text",), "layers": BOTH},
    "hidream": {"double_stream_blocks": BOTH, "single_stream_blocks": BOTH},
}
"""The sites each tiny model must list: two blocks of every kind, these streams."""
WIDTH = {"sd3": 128, "z_image": 256}  # the others are 64 wide
HOOKED = ("lumina2", "z_image", "hidream")
NO_CONTEXT = ("hidream",)
"""Families without the conditioning site ``context:text`` (HiDream reads T5 and Llama tokens, not one context)."""


# ----------------------------------------------------------------------------- fixtures and helpers


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plugin(comfyui):
    comfyui.load_plugin_nodes()
    return comfyui.plugin_module()


def _module(plugin, name):
    return importlib.import_module(f"{plugin.__name__}.{name}")


@pytest.fixture(scope="module")
def adapters(plugin):
    return _module(plugin, "nodes.adapters")


@pytest.fixture(scope="module")
def engine(plugin):
    """The plugin's own sae_core (its classes, not a second copy's)."""
    return _module(plugin, "sae_core")


class Model:
    """A tiny family model with its prompt pair and latent."""

    def __init__(self, name: str):
        self.name = name
        self.spec = tiny.TINY_FAMILIES[name]
        self.patcher = tiny.tiny_family_patcher(name, seed=0)
        self.positive, self.negative = tiny.family_conditioning(self.spec, seed=1)

    def run(self, patcher=None, steps: int = 1, cfg: float = 2.0, size=(8, 8)) -> torch.Tensor:
        return tiny.sample(patcher or self.patcher, seed=3, steps=steps, cfg=cfg, positive=self.positive,
                           negative=self.negative, latent=tiny.family_latent(self.spec, size=size))

    def grid(self, size=(8, 8)) -> tuple[int, int, int]:
        """(frames, rows, cols) of the picture's tokens for a latent of ``size``."""
        pt, ph, pw = self.spec.patch
        return (self.spec.frames or 1) // pt, -(-size[0] // ph), -(-size[1] // pw)


@pytest.fixture(scope="module")
def models(comfyui):
    built: dict[str, Model] = {}

    def get(name: str) -> Model:
        if name not in built:
            built[name] = Model(name)
        return built[name]

    return get



def sites_of(adapters, patcher) -> dict:
    return {site.name: site for site in adapters.adapter_for(patcher).available_sites(patcher)}


def patch(adapters, patcher, functions: dict):
    """``adapter.patch`` with sites given by name."""
    adapter = adapters.adapter_for(patcher)
    return adapter.patch(patcher, {adapter.resolve(patcher, name): fn for name, fn in functions.items()})


def last_image_site(adapters, patcher) -> str:
    """The image site of the block that feeds the final layer."""
    return [name for name, site in sites_of(adapters, patcher).items() if site.stream == "image"][-1]


def steer_sites(name: str) -> list[tuple[str, str]]:
    """(family, site) pairs for the by-value steering tests: each stream of each block kind."""
    pairs = []
    for prefix, streams in BLOCKS[name].items():
        block = f"{prefix}.0" if name == "sd3" else f"{prefix}.1"  # SD3's last joint block has no text
        pairs += [(name, f"{block}:{stream}") for stream in streams]
    return pairs


def dictionary(engine, width: int):
    return engine.SparseAutoencoder(width, 16, 4, seed=0)


def hooks_left(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]


# ----------------------------------------------------------------------------- sites and what they see


@pytest.mark.parametrize("name", NAMES)
def test_every_site_of_the_family_is_listed_with_the_network_width(adapters, models, name):
    model = models(name)
    expected = {f"{prefix}.{i}:{stream}" for prefix, streams in BLOCKS[name].items() for i in (0, 1)
                for stream in streams}
    if name == "sd3":
        expected.discard("joint_blocks.1:text")  # the last joint block returns no text tokens
    if name not in NO_CONTEXT:
        expected.add("context:text")
    listed = sites_of(adapters, model.patcher)
    assert set(listed) == expected
    context = listed.pop("context:text", None)
    assert {site.extra["d"] for site in listed.values()} == {WIDTH.get(name, 64)}
    assert {site.family for site in listed.values()} == {model.spec.family}
    if context is not None:  # the prompt's tokens, as wide as the text encoder's
        assert context.extra["d"] == model.spec.text_width and context.family == model.spec.family


@pytest.mark.parametrize("name", [name for name in NAMES if name not in NO_CONTEXT])
def test_the_context_site_sees_the_prompts_tokens_and_its_edit_reaches_the_network(adapters, models, name):
    model = models(name)
    seen = Recorder()
    model.run(patch(adapters, model.patcher, {"context:text": seen}), steps=2)
    assert len(seen.calls) == 2  # once per step, cond and uncond batched
    positive, negative = model.positive[0][0], model.negative[0][0]
    for tokens, ctx in seen.calls:
        assert holds(tokens[ctx.cond], positive) and holds(tokens[~ctx.cond], negative)
        assert ctx.grid is None and ctx.progress is not None
    base = model.run()
    doubled = model.run(patch(adapters, model.patcher, {"context:text": lambda h, ctx: h * 2}))
    by_hand = tiny.sample(model.patcher, seed=3, steps=1, cfg=2.0, positive=[[positive * 2, model.positive[0][1]]],
                          negative=[[negative * 2, model.negative[0][1]]], latent=tiny.family_latent(model.spec))
    assert not torch.equal(doubled, base)
    assert torch.equal(doubled, by_hand)  # the edit is exactly a changed prompt, and nothing else


def holds(tokens: torch.Tensor, prompt: torch.Tensor) -> bool:
    """``tokens`` (1, n, d) are the prompt's (1, m, d), padded with zeros around them where the family pads
    (FLUX.2 pads its text to 512 tokens)."""
    for start in range(tokens.shape[1] - prompt.shape[1] + 1):
        window = tokens[:, start:start + prompt.shape[1]]
        rest = torch.cat([tokens[:, :start], tokens[:, start + prompt.shape[1]:]], dim=1)
        if torch.equal(window, prompt) and not rest.any():
            return True
    return False


@pytest.mark.parametrize("name", NAMES)
def test_each_site_sees_its_own_tokens_with_grid_frames_cond_and_progress(adapters, models, name):
    import comfy.samplers

    model = models(name)
    recorders = {site: Recorder() for site in sites_of(adapters, model.patcher)}
    model.run(patch(adapters, model.patcher, recorders), steps=2)
    frames, rows, cols = model.grid()
    schedule = comfy.samplers.calculate_sigmas(model.patcher.get_model_object("model_sampling"), "simple", 2)
    width = WIDTH.get(name, 64)
    for site, recorder in recorders.items():
        assert len(recorder.calls) == 2, site  # once per step: cond and uncond in one call
        for (tokens, ctx), sigma, progress in zip(recorder.calls, schedule[:-1].tolist(), (0.0, 1.0)):
            if site == "context:text":  # the prompt's tokens (FLUX.2 pads them to 512)
                assert tokens.shape == (2, 512 if name == "flux2" else tiny.TEXT_TOKENS, model.spec.text_width), site
                assert ctx.grid is None and ctx.frames == 1, site
            elif site.endswith(":text"):
                assert tokens.shape == (2, model.spec.text_seen, width), site
                assert ctx.grid is None and ctx.frames == 1, site
            else:
                assert tokens.shape == (2, frames * rows * cols, width), site
                assert (ctx.grid, ctx.frames) == ((rows, cols), frames), site
            assert sorted(ctx.cond.tolist()) == [False, True] and ctx.cond.dtype == torch.bool
            assert ctx.sigma == pytest.approx(sigma, rel=1e-6) and ctx.progress == pytest.approx(progress)
            assert ctx.timestep is not None


@pytest.mark.parametrize("name", NAMES)
def test_the_rows_marked_cond_are_the_positive_prompts(adapters, models, name):
    model = models(name)
    site = last_image_site(adapters, model.patcher)
    alone, batched = Recorder(), Recorder()
    model.run(patch(adapters, model.patcher, {site: alone}), cfg=1.0)
    model.run(patch(adapters, model.patcher, {site: batched}), cfg=2.0)
    tokens, ctx = batched.calls[0]
    assert alone.calls[0][1].cond.tolist() == [True]
    assert torch.allclose(tokens[ctx.cond], alone.calls[0][0], atol=1e-5)
    assert not torch.allclose(tokens[~ctx.cond], alone.calls[0][0], atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_image_tokens_are_the_latent_patches_frame_major_then_row_major(adapters, models, name):
    """Editing picture token (f, r, c) of the last block moves only latent patch (f, r, c): final layers act per token."""
    model = models(name)
    size = (6, 10)
    frames, rows, cols = model.grid(size)
    f, r, c = frames - 1, 1, 3
    seen = []

    def poke(h, ctx):
        seen.append(ctx)
        h = h.clone()
        h[:, (f * rows + r) * cols + c] += 5.0
        return h

    base = model.run(size=size)
    out = model.run(patch(adapters, model.patcher, {last_image_site(adapters, model.patcher): poke}), size=size)
    assert (seen[0].grid, seen[0].frames) == ((rows, cols), frames)
    changed = (out != base).any(dim=1)[0]
    expected = torch.zeros(changed.shape, dtype=torch.bool)
    pt, ph, pw = model.spec.patch
    where = (slice(f * pt, (f + 1) * pt),) if model.spec.frames else ()
    expected[(*where, slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw))] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("name", NAMES)
def test_update_is_the_blocks_output_minus_its_input(adapters, models, name):
    model = models(name)
    recorders = {}
    for prefix, streams in BLOCKS[name].items():
        if "update" in streams:  # block 1's input is block 0's output
            recorders.update({f"{prefix}.0:image": Recorder(), f"{prefix}.1:image": Recorder(),
                              f"{prefix}.1:update": Recorder()})
    model.run(patch(adapters, model.patcher, recorders))
    for prefix, streams in BLOCKS[name].items():
        if "update" in streams:
            before, after, update = (recorders[f"{prefix}.{site}"].calls[0][0] for site in ("0:image", "1:image",
                                                                                             "1:update"))
            assert torch.equal(update, after - before), prefix
            assert update.abs().max() > 0


# ----------------------------------------------------------------------------- identity, steering, isolation


@pytest.mark.parametrize("name", NAMES)
def test_capture_at_every_site_is_bit_identical_to_the_unpatched_model(adapters, models, name):
    model = models(name)
    base = model.run(steps=2)
    every_site = {site: Recorder() for site in sites_of(adapters, model.patcher)}
    assert torch.equal(model.run(patch(adapters, model.patcher, every_site), steps=2), base)


@pytest.mark.parametrize("name", NAMES)
def test_zero_strength_steer_is_bit_identical(adapters, models, engine, name):
    model = models(name)
    base = model.run(steps=2)
    steers = {name_: engine.steer_function(dictionary(engine, site.extra["d"]),
                                           [engine.Steer(features=(3, 5), strengths=(0.0, 0.0))])
              for name_, site in sites_of(adapters, model.patcher).items()}
    assert torch.equal(model.run(patch(adapters, model.patcher, steers), steps=2), base)


@pytest.mark.parametrize("name,site", [pair for name in NAMES for pair in steer_sites(name)])
def test_add_steer_moves_exactly_the_sites_tokens_by_strength_times_direction(adapters, models, engine, name, site):
    model = models(name)
    block = site.split(":")[0]
    others = [other for other in sites_of(adapters, model.patcher) if other.startswith(block + ":") and other != site]
    sae = dictionary(engine, WIDTH.get(name, 64))
    strength = 0.75
    steer = engine.steer_function(sae, [engine.Steer(features=(3,), strengths=(strength,), units="raw",
                                                     cond_only=False)])
    before = {name_: Recorder() for name_ in (site, *others)}
    model.run(patch(adapters, model.patcher, before))
    after = {name_: Recorder() for name_ in (site, *others)}
    steered = patch(adapters, model.patcher, {site: steer})
    model.run(patch(adapters, steered, after))  # the captures run after the steer, on the same block
    moved = after[site].calls[0][0]
    assert torch.allclose(moved, before[site].calls[0][0] + strength * sae.direction(3), atol=1e-5)
    assert not torch.equal(moved, before[site].calls[0][0])
    for other in others:  # the text beside the image tokens, or the image tokens beside the text
        if other.endswith(":text") != site.endswith(":text"):
            assert torch.equal(after[other].calls[0][0], before[other].calls[0][0]), other


@pytest.mark.parametrize("name", NAMES)
def test_clamp_steer_sets_the_features_activation_keeping_the_rest(adapters, models, engine, name):
    model = models(name)
    site = last_image_site(adapters, model.patcher)
    sae = dictionary(engine, WIDTH.get(name, 64))
    target = 4.0
    clamp = engine.steer_function(sae, [engine.Steer(features=(3,), strengths=(target,), mode="clamp", units="raw",
                                                     cond_only=False)])
    before, after = Recorder(), Recorder()
    model.run(patch(adapters, model.patcher, {site: before}))
    model.run(patch(adapters, patch(adapters, model.patcher, {site: clamp}), {site: after}))
    h = before.calls[0][0]
    current = engine.steering.feature_activations(h, sae, [3])
    assert torch.allclose(after.calls[0][0], h + (target - current) * sae.direction(3), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_twenty_alternating_steered_samplings_leave_the_unpatched_model_bit_identical(adapters, models, engine, name):
    model = models(name)
    options = repr(model.patcher.model_options)
    base = model.run()
    steered = patch(adapters, model.patcher, {
        name_: engine.steer_function(dictionary(engine, site.extra["d"]),
                                     [engine.Steer(features=(3,), strengths=(2.0,), units="raw")])
        for name_, site in sites_of(adapters, model.patcher).items()})
    for i in range(20):
        out = model.run(steered if i % 2 == 0 else None)
        assert torch.equal(out, base) == (i % 2 == 1), i
    assert torch.equal(model.run(), base)
    assert repr(model.patcher.model_options) == options
    assert hooks_left(model.patcher.model.diffusion_model) == []


@pytest.mark.parametrize("name", NAMES)
def test_two_patches_on_one_block_both_run_in_order(adapters, models, name):
    model = models(name)
    site = last_image_site(adapters, model.patcher)
    shift = torch.randn(WIDTH.get(name, 64), generator=torch.Generator().manual_seed(5))
    first, last = Recorder(), Recorder()
    chained = patch(adapters, model.patcher, {site: first})
    chained = patch(adapters, chained, {site: lambda h, ctx: h + shift})
    chained = patch(adapters, chained, {site: last})
    alone = Recorder()
    model.run(patch(adapters, model.patcher, {site: alone}))
    model.run(chained)
    assert torch.equal(first.calls[0][0], alone.calls[0][0])
    assert torch.allclose(last.calls[0][0], alone.calls[0][0] + shift)


# ----------------------------------------------------------------------------- hooks always come off


@pytest.mark.parametrize("name", HOOKED)
def test_hooks_exist_only_while_the_patched_clone_runs(adapters, models, name):
    model = models(name)
    net = model.patcher.model.diffusion_model
    during = []
    site = last_image_site(adapters, model.patcher)
    patched = patch(adapters, model.patcher, {site: lambda h, ctx: during.append(hooks_left(net)) or h})
    assert hooks_left(net) == []  # patching installs nothing on the shared network
    model.run(patched)
    assert during and all(site.split(":")[0] in hooked for hooked in during)
    assert hooks_left(net) == []


@pytest.mark.parametrize("name", HOOKED)
def test_a_failing_site_function_still_takes_the_hooks_off(adapters, models, name):
    model = models(name)
    base = model.run()

    def fail(h, ctx):
        raise RuntimeError("site function failed")

    sites = list(sites_of(adapters, model.patcher))
    with pytest.raises(RuntimeError, match="site function failed"):
        model.run(patch(adapters, model.patcher, {sites[0]: Recorder(), sites[-1]: fail}))
    assert hooks_left(model.patcher.model.diffusion_model) == []
    assert torch.equal(model.run(), base)
