"""The ComfyUI adapters (nodes/adapters) on tiny REAL ComfyUI models: Flux and SD1.5 U-Net.

Each test states one behaviour of the contract in sae_core.intervention: a site function sees the
site's own tokens (batch, tokens, d) with a SiteContext, and what it returns replaces them; ``patch``
returns a clone and leaves the given MODEL as it was.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

import tiny_comfy_models as tiny
from site_probes import Recorder

STEPS = 3
FLUX_D = tiny.FLUX_CONFIG["hidden_size"]
TEXT = tiny.TEXT_TOKENS


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def plugin(comfyui):
    comfyui.load_plugin_nodes()
    return comfyui.plugin_module()


@pytest.fixture(scope="module")
def adapters(plugin):
    return importlib.import_module(plugin.__name__ + ".nodes.adapters")


@pytest.fixture(scope="module")
def Site(plugin):
    return importlib.import_module(plugin.__name__ + ".sae_core.sites").Site


@pytest.fixture(scope="module")
def SiteError(plugin):
    return importlib.import_module(plugin.__name__ + ".sae_core.errors").SiteError


@pytest.fixture(scope="module")
def flux(comfyui):
    return tiny.tiny_flux_patcher(0)


@pytest.fixture(scope="module")
def sd15(comfyui):
    return tiny.tiny_sd15_patcher(0)


@pytest.fixture(scope="module")
def conds(flux, sd15):
    return {"flux": tiny.random_conditioning(flux, seed=1), "sd15": tiny.random_conditioning(sd15, seed=1)}


def run(patcher, conds, cfg=2.0, steps=STEPS, latent=None, seed=3, positive=None, negative=None):
    family = "flux" if tiny.is_flux(patcher) else "sd15"
    pos, neg = conds[family]
    return tiny.sample(patcher, seed=seed, steps=steps, cfg=cfg, positive=positive or pos,
                       negative=negative or neg, latent=latent)



def direction(width, seed=5, scale=2.0):
    """A random direction: a constant vector would vanish in the next LayerNorm/GroupNorm."""
    return torch.randn(width, generator=torch.Generator().manual_seed(seed)) * scale


def adder(vector):
    def add(h, ctx):
        return h + vector.to(h.dtype)

    return add


def site(adapters, patcher, name):
    """The model's own Site for "block:stream"."""
    for s in adapters.adapter_for(patcher).available_sites(patcher):
        if f"{s.block}:{s.stream}" == name:
            return s
    raise AssertionError(f"{name} not among the sites")


def patch(adapters, patcher, functions: dict):
    """``adapter.patch`` with sites given as "block:stream" names."""
    return adapters.adapter_for(patcher).patch(patcher, {site(adapters, patcher, k): f for k, f in functions.items()})


def snapshot(patcher):
    return (copy.deepcopy(patcher.model_options), dict(patcher.object_patches),
            {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in patcher.wrappers.items()})


def _copy(value):
    """Tensors copied as they are now (Flux blocks add to their inputs in place later)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


class Hook:
    """Forward hook on a module of the shared model for one ``with`` block (never left behind)."""

    def __init__(self, module, pre=False):
        self.module, self.pre, self.seen = module, pre, []

    def __enter__(self):
        if self.pre:
            self.handle = self.module.register_forward_pre_hook(
                lambda m, args, kwargs: self.seen.append(_copy((args, kwargs))), with_kwargs=True)
        else:
            self.handle = self.module.register_forward_hook(
                lambda m, args, kwargs, out: self.seen.append(_copy((args, kwargs, out))), with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----------------------------------------------------------------------------- families and sites


def test_flux_sites_are_its_double_and_single_blocks_with_every_stream(adapters, flux):
    names = {f"{s.block}:{s.stream}": s.extra["d"] for s in adapters.adapter_for(flux).available_sites(flux)}
    assert names == {f"{kind}_blocks.{i}:{st}": FLUX_D for kind in ("double", "single") for i in (0, 1)
                     for st in ("image", "text", "update")} | {"context:text": tiny.FLUX_TEXT_WIDTH}
    assert {s.family for s in adapters.adapter_for(flux).available_sites(flux)} == {"flux"}


def test_sd15_sites_are_its_blocks_and_the_transformers_inside_them(adapters, sd15):
    unet = adapters.adapter_for(sd15)
    sites = unet.available_sites(sd15)
    assert {s.family for s in sites} == {"sd15"}
    assert {f"{s.block}:{s.stream}": s.extra["d"] for s in sites} == {
        "context:text": tiny.SD15_TEXT_WIDTH, "input_blocks.0:residual": 32, "input_blocks.1:residual": 32, "input_blocks.1:update": 32,
        "input_blocks.2:residual": 32, "input_blocks.3:residual": 64,
        "middle_block:residual": 64, "middle_block:update": 64,
        "output_blocks.0:residual": 64, "output_blocks.1:residual": 64,
        "output_blocks.2:residual": 32, "output_blocks.3:residual": 32,
        "input_blocks.1.1:update": 32, "input_blocks.3.1:update": 64, "middle_block.1:update": 64,
        "output_blocks.0.1:update": 64, "output_blocks.1.1:update": 64, "output_blocks.2.1:update": 32,
        "output_blocks.3.1:update": 32,
    }
    assert unet.site_width(sd15, site(adapters, sd15, "output_blocks.1:residual")) == 64


def test_sdxl_unet_is_family_sdxl(adapters, comfyui):
    patcher = tiny.tiny_sdxl_patcher(0)
    adapter = adapters.adapter_for(patcher)
    assert adapter.family(patcher) == "sdxl"
    assert {s.family for s in adapter.available_sites(patcher)} == {"sdxl"}


def test_revelio_names_map_to_sd15_output_blocks(adapters, comfyui):
    patcher = tiny.tiny_sd15_patcher(0, full_layout=True)  # SD1.5's own 12 + 12 block layout, 32 channels
    assert adapters.REVELIO_BLOCKS == {"bottleneck": "middle_block", "up_ft1": "up_blocks.1", "up_ft2": "up_blocks.2"}
    up_ft1, up_ft2 = adapters.revelio_site("up_ft1", patcher), adapters.revelio_site("up_ft2", patcher)
    assert (up_ft1.block, up_ft2.block) == ("output_blocks.5", "output_blocks.8")
    real = adapters.revelio_site("up_ft1")  # without a MODEL: SD 1.5's own layout
    assert (real.block, real.extra["d"]) == ("output_blocks.5", 1280)
    # diffusers' up_blocks.1 / .2 end with an upsampler and have 4x / 2x the base width (1280 / 640 in SD1.5).
    net = patcher.model.diffusion_model
    for s, width in ((up_ft1, 128), (up_ft2, 64)):
        index = int(s.block.split(".")[1])
        assert type(list(net.output_blocks[index])[-1]).__name__ == "Upsample"
        assert s.extra["d"] == width and s.stream == "residual"
    recorders = {"middle_block:residual": Recorder(), "output_blocks.5:residual": Recorder(),
                 "output_blocks.8:residual": Recorder()}
    patched = patch(adapters, patcher, recorders)
    tiny.sample(patched, seed=0, steps=1, cfg=1.0, positive=tiny.random_conditioning(patcher)[0],
                negative=tiny.random_conditioning(patcher)[1])
    grids = {k: r.calls[0][1].grid for k, r in recorders.items()}  # 8x8 latent: 1x1 bottleneck, then 4x4, 8x8
    assert grids == {"middle_block:residual": (1, 1), "output_blocks.5:residual": (4, 4),
                     "output_blocks.8:residual": (8, 8)}


# ----------------------------------------------------------------------------- what a site function sees


def test_flux_image_text_and_single_sites_see_their_own_tokens(adapters, flux, conds):
    recorders = {name: Recorder() for name in ("double_blocks.0:image", "double_blocks.1:text",
                                               "single_blocks.1:image", "single_blocks.1:text")}
    patched = patch(adapters, flux, recorders)
    net = flux.model.diffusion_model
    with Hook(net.double_blocks[0]) as double, Hook(net.double_blocks[1]) as double1, \
            Hook(net.single_blocks[1]) as single:
        run(patched, conds, steps=1)
    image, image_ctx = recorders["double_blocks.0:image"].calls[0]
    text, text_ctx = recorders["double_blocks.1:text"].calls[0]
    tail, tail_ctx = recorders["single_blocks.1:image"].calls[0]
    assert image.shape == (2, 16, FLUX_D) and image_ctx.grid == (4, 4)  # 8x8 latent, 2x2 patches
    assert text.shape == (2, TEXT, FLUX_D) and text_ctx.grid is None
    assert tail.shape == image.shape and tail_ctx.grid == (4, 4)  # image tokens only, not cat(txt, img)
    # Exactly the blocks' own outputs: double -> (img, txt); single -> cat(txt, img), image the tail.
    assert torch.equal(image, double.seen[0][2][0])
    assert torch.equal(text, double1.seen[0][2][1])
    assert torch.equal(tail, single.seen[0][2][:, TEXT:])
    assert torch.equal(recorders["single_blocks.1:text"].calls[0][0], single.seen[0][2][:, :TEXT])


def test_flux_grid_is_row_major_over_the_latent(adapters, flux, conds):
    """Editing image token (r, c) of the last single block moves only latent patch (r, c) (final layer is per token)."""
    latent = tiny.random_latent(size=(6, 10))  # -> 3 x 5 tokens
    rows, cols, r, c = 3, 5, 1, 3
    seen = Recorder()

    def poke(h, ctx):
        seen(h, ctx)
        h = h.clone()
        h[:, r * cols + c] += 5.0
        return h

    base = run(flux, conds, steps=1, latent=latent)
    out = run(patch(adapters, flux, {"single_blocks.1:image": poke}), conds, steps=1, latent=latent)
    assert seen.calls[0][1].grid == (rows, cols) and seen.calls[0][0].shape[1] == rows * cols
    changed = (out != base).any(dim=1)[0]
    expected = torch.zeros(6, 10, dtype=torch.bool)
    expected[2 * r:2 * r + 2, 2 * c:2 * c + 2] = True
    assert torch.equal(changed, expected)


def test_flux_reference_latent_tokens_are_not_part_of_the_image_site(adapters, flux, conds):
    """Kontext appends a reference latent's tokens after the picture's: sites see the picture's 4x4 only."""
    pos, neg = conds["flux"]
    reference = tiny.random_latent(seed=7, size=(4, 6))  # -> 2 x 3 = 6 extra image tokens
    with_ref = [[c, dict(extra, reference_latents=[reference])] for c, extra in pos]
    image, tail, update = Recorder(), Recorder(), Recorder()
    patched = patch(adapters, flux, {"double_blocks.1:image": image, "single_blocks.0:image": tail,
                                     "single_blocks.1:update": update})
    net = flux.model.diffusion_model
    with Hook(net.double_blocks[1]) as double, Hook(net.single_blocks[0]) as single:
        run(patched, conds, cfg=1.0, steps=1, positive=with_ref, negative=neg)
    img_out = double.seen[0][2][0]
    assert img_out.shape[1] == 16 + 6
    assert image.calls[0][0].shape == tail.calls[0][0].shape == update.calls[0][0].shape == (1, 16, FLUX_D)
    assert image.calls[0][1].grid == tail.calls[0][1].grid == (4, 4)
    assert torch.equal(image.calls[0][0], img_out[:, :16])
    assert torch.equal(tail.calls[0][0], single.seen[0][2][:, TEXT:TEXT + 16])


def test_flux_single_block_text_length_follows_the_blocks_not_the_prompt(adapters, flux, conds):
    """A post_input patch (as USO's) lengthens txt inside the model; single blocks still get image tokens only."""
    def longer_text(kwargs):
        kwargs = dict(kwargs)
        extra = torch.zeros(kwargs["txt"].shape[0], 3, kwargs["txt"].shape[2])
        kwargs["txt"] = torch.cat([extra, kwargs["txt"]], dim=1)
        kwargs["txt_ids"] = torch.cat([torch.zeros(kwargs["txt_ids"].shape[0], 3, 3), kwargs["txt_ids"]], dim=1)
        return kwargs

    base = flux.clone()
    base.set_model_post_input_patch(longer_text)
    recorder = Recorder()
    patched = patch(adapters, base, {"single_blocks.0:image": recorder})
    with Hook(flux.model.diffusion_model.single_blocks[0]) as single:
        run(patched, conds, steps=1)
    tokens = recorder.calls[0][0]
    assert tokens.shape == (2, 16, FLUX_D)
    assert torch.equal(tokens, single.seen[0][2][:, TEXT + 3:])


def test_sd15_block_sites_see_block_outputs_as_tokens(adapters, sd15, conds):
    names = ("input_blocks.1:residual", "middle_block:residual", "output_blocks.3:residual")
    recorders = {name: Recorder() for name in names}
    patched = patch(adapters, sd15, recorders)
    with Hook(sd15.model.diffusion_model.out, pre=True) as out:
        run(patched, conds, steps=1)
    shapes = {k: (tuple(r.calls[0][0].shape), r.calls[0][1].grid) for k, r in recorders.items()}
    assert shapes == {"input_blocks.1:residual": ((2, 64, 32), (8, 8)),
                      "middle_block:residual": ((2, 16, 64), (4, 4)),
                      "output_blocks.3:residual": ((2, 64, 32), (8, 8))}
    # The LAST output block (beyond ComfyUI's own output_block_patch) is the map fed to the final layer.
    final_input = out.seen[0][0][0]
    assert torch.equal(recorders["output_blocks.3:residual"].calls[0][0], final_input.flatten(2).transpose(1, 2))


def test_update_stream_is_block_output_minus_input(adapters, flux, sd15, conds):
    update, single_update = Recorder(), Recorder()
    patched = patch(adapters, flux, {"double_blocks.0:update": update, "single_blocks.0:update": single_update})
    net = flux.model.diffusion_model
    with Hook(net.double_blocks[0], pre=True) as double_in, Hook(net.double_blocks[0]) as double, \
            Hook(net.single_blocks[0], pre=True) as single_in, Hook(net.single_blocks[0]) as single:
        run(patched, conds, steps=1)
    img_in, (img_out, _) = double_in.seen[0][1]["img"], double.seen[0][2]
    assert torch.equal(update.calls[0][0], img_out - img_in)
    joint_in, joint_out = single_in.seen[0][0][0], single.seen[0][2]
    assert torch.equal(single_update.calls[0][0], joint_out[:, TEXT:] - joint_in[:, TEXT:])

    names = ("input_blocks.3:residual", "middle_block:residual", "middle_block:update")
    recorders = {name: Recorder() for name in names}
    run(patch(adapters, sd15, recorders), conds, steps=1)
    before, after, delta = (recorders[n].calls[0][0] for n in names)
    assert torch.equal(delta, after - before)


# ----------------------------------------------------------------------------- identity, isolation, steering


@pytest.mark.parametrize("family", ["flux", "sd15"])
def test_identity_site_functions_are_bit_identical(adapters, flux, sd15, conds, family):
    patcher = flux if family == "flux" else sd15
    base = run(patcher, conds)
    every_site = {s: (lambda h, ctx: h) for s in adapters.adapter_for(patcher).available_sites(patcher)}
    patched = adapters.adapter_for(patcher).patch(patcher, every_site)
    assert torch.equal(run(patched, conds), base)


@pytest.mark.parametrize("family", ["flux", "sd15"])
def test_original_patcher_is_untouched(adapters, flux, sd15, conds, family):
    patcher = flux if family == "flux" else sd15
    name = "double_blocks.0:image" if family == "flux" else "middle_block:residual"
    before_options = snapshot(patcher)
    base = run(patcher, conds)
    width = site(adapters, patcher, name).extra["d"]
    patched = patch(adapters, patcher, {name: adder(direction(width))})
    assert patched is not patcher
    assert not torch.equal(run(patched, conds), base)  # the clone is steered...
    assert torch.equal(run(patcher, conds), base)  # ...the original still samples as before
    assert snapshot(patcher) == before_options
    if family == "sd15":  # ComfyUI put the original block back into the shared model
        net = patcher.model.diffusion_model
        assert type(net.middle_block).__name__ == "TimestepEmbedSequential"
        assert len(list(net.middle_block)) == len(net.middle_block._modules)


@pytest.mark.parametrize("name", ["double_blocks.0:image", "double_blocks.0:text", "single_blocks.1:image",
                                  "middle_block:residual", "output_blocks.3:residual", "input_blocks.1:update",
                                  "output_blocks.3.1:update"])
def test_steering_a_site_changes_the_output(adapters, flux, sd15, conds, name):
    patcher = flux if ("double" in name or "single" in name) else sd15
    width = site(adapters, patcher, name).extra["d"]
    base = run(patcher, conds, steps=2)
    # Added to the first half of the tokens only: a per-channel constant over all positions would be
    # normalised away by the U-Net's final GroupNorm (one channel per group here).
    def steer(h, ctx):
        h = h.clone()
        h[:, : h.shape[1] // 2] += direction(width)
        return h

    steered = run(patch(adapters, patcher, {name: steer}), conds, steps=2)
    assert torch.isfinite(steered).all()
    assert (steered - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------- context: cond rows, sigma, progress


def test_cond_and_uncond_rows_are_identified_under_cfg(adapters, flux, conds):
    pos, _ = conds["flux"]
    short_negative = [[torch.randn(1, 5, tiny.FLUX_TEXT_WIDTH, generator=torch.Generator().manual_seed(9)),
                       dict(pos[0][1])]]
    # Different text lengths cannot share a batch: cond and uncond run as separate calls (ground truth).
    text = Recorder()
    run(patch(adapters, flux, {"double_blocks.0:text": text}), conds, cfg=2.0, steps=1, negative=short_negative)
    by_length = {(h.shape[1], tuple(ctx.cond.tolist())) for h, ctx in text.calls}
    assert by_length == {(TEXT, (True,)), (5, (False,))}

    # Same lengths: one batched call; the row marked cond is the positive prompt's (as computed alone at cfg 1).
    alone, batched = Recorder(), Recorder()
    run(patch(adapters, flux, {"double_blocks.0:text": alone}), conds, cfg=1.0, steps=1)
    run(patch(adapters, flux, {"double_blocks.0:text": batched}), conds, cfg=2.0, steps=1)
    assert alone.calls[0][1].cond.tolist() == [True]
    tokens, ctx = batched.calls[0]
    assert sorted(ctx.cond.tolist()) == [False, True] and ctx.cond.dtype == torch.bool
    assert torch.allclose(tokens[ctx.cond], alone.calls[0][0], atol=1e-5)
    assert not torch.allclose(tokens[~ctx.cond], alone.calls[0][0], atol=1e-3)


@pytest.mark.parametrize("family", ["flux", "sd15"])
def test_sigma_follows_the_schedule_and_progress_goes_from_0_to_1(adapters, flux, sd15, conds, family):
    import comfy.samplers

    patcher = flux if family == "flux" else sd15
    name = "double_blocks.1:image" if family == "flux" else "output_blocks.0:residual"
    recorder = Recorder()
    run(patch(adapters, patcher, {name: recorder}), conds, steps=STEPS)
    schedule = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", STEPS)
    sigmas = [ctx.sigma for _, ctx in recorder.calls]
    assert sigmas == pytest.approx(schedule[:-1].tolist(), rel=1e-6)
    assert [ctx.progress for _, ctx in recorder.calls] == pytest.approx([0.0, 0.5, 1.0])
    assert all(sorted(ctx.cond.tolist()) == [False, True] for _, ctx in recorder.calls)


# ----------------------------------------------------------------------------- chaining


@pytest.mark.parametrize("name", ["double_blocks.0:image", "single_blocks.0:image", "middle_block:residual",
                                  "output_blocks.3:residual", "input_blocks.1.1:update"])
def test_two_patches_on_one_block_both_run_in_order(adapters, flux, sd15, conds, name):
    patcher = flux if ("double" in name or "single" in name) else sd15
    vector = direction(site(adapters, patcher, name).extra["d"])
    alone = Recorder()
    run(patch(adapters, patcher, {name: alone}), conds, steps=2)
    steered_only = run(patch(adapters, patcher, {name: adder(vector)}), conds, steps=2)

    recorder = Recorder()
    first = patch(adapters, patcher, {name: recorder})  # e.g. a capture node ...
    first_state = snapshot(first)
    second = patch(adapters, first, {name: adder(vector)})  # ... then a steer node on the same block
    out = run(second, conds, steps=2)
    assert snapshot(first) == first_state  # patching a patched clone leaves it as it was
    assert len(recorder.calls) == len(alone.calls) == 2
    assert torch.equal(recorder.calls[0][0], alone.calls[0][0])  # the recorder ran first (1st step: same input)
    assert torch.equal(out, steered_only)  # and the steer still acted

    after = Recorder()  # the other order: the recorder sees the steered tokens
    run(patch(adapters, patch(adapters, patcher, {name: adder(vector)}), {name: after}), conds, steps=2)
    assert torch.allclose(after.calls[0][0], alone.calls[0][0] + vector)


def test_flux_patch_wraps_another_nodes_replace_patch(adapters, flux, conds):
    calls = []

    def foreign(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    base = flux.clone()
    base.set_model_patch_replace(foreign, "dit", "double_block", 1)
    recorder = Recorder()
    run(patch(adapters, base, {"double_blocks.1:image": recorder, "single_blocks.0:image": Recorder()}), conds,
        steps=1)
    assert calls == [1] and len(recorder.calls) == 1


# ----------------------------------------------------------------------------- errors


def test_unsupported_models_raise_naming_what_is_supported(adapters, comfyui, SiteError):
    import comfy.model_patcher
    import comfy.supported_models as models

    cpu = torch.device("cpu")

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(2, 2)

    # HunyuanImage 2.1 runs HunyuanVideo's network class: another model, so not the hunyuan_video family.
    hunyuan_image = models.HunyuanImage21(dict(tiny.TINY_FAMILIES["hunyuan_video"].unet_config, vec_in_dim=None,
                                               patch_size=[2, 2], axes_dim=[16, 16])).get_model({})
    cases = {"Linear": Stub(), "HunyuanVideo in a HunyuanImage21 model": hunyuan_image}
    for expected, model in cases.items():
        patcher = comfy.model_patcher.ModelPatcher(model, cpu, cpu)
        with pytest.raises(SiteError) as error:
            adapters.adapter_for(patcher)
        message = str(error.value)
        assert "not supported" in message and expected in message
        assert "supported: transformers: FLUX.1, FLUX.2, Chroma, HunyuanVideo" in message
        assert "Lumina 2 / Z-Image, HiDream-I1; U-Nets: sd15" in message
    with pytest.raises(SiteError, match="expected a ComfyUI MODEL"):
        adapters.adapter_for(object())


def test_unknown_site_lists_the_available_ones(adapters, flux, sd15, Site, SiteError):
    with pytest.raises(SiteError) as error:
        adapters.adapter_for(flux).patch(flux, {Site("flux", "double_blocks.7", "image"): lambda h, ctx: h})
    assert "double_blocks.7:image" in str(error.value)
    assert "available sites" in str(error.value) and "single_blocks.1:image" in str(error.value)
    with pytest.raises(SiteError, match="middle_block:update"):  # no "update" where the shape changes
        adapters.adapter_for(sd15).patch(sd15, {Site("sd15", "output_blocks.0", "update"): lambda h, ctx: h})
    with pytest.raises(SiteError, match="flux"):  # a dictionary for another family
        adapters.adapter_for(sd15).patch(sd15, {Site("flux", "middle_block", "residual"): lambda h, ctx: h})


def test_a_site_function_returning_another_shape_is_an_error(adapters, flux, conds, SiteError):
    patched = patch(adapters, flux, {"double_blocks.0:image": lambda h, ctx: h[:, :3]})
    with pytest.raises(SiteError, match="returned"):
        run(patched, conds, steps=1)


def test_diffusers_unet_block_names_resolve_to_the_comfyui_block_with_the_same_output(adapters, comfyui, Site,
                                                                                     SiteError):
    """A dictionary trained headless (diffusers names) is used in ComfyUI by its own site name."""
    patcher = tiny.tiny_sd15_patcher(0, full_layout=True)  # SD1.5's layout: 4 levels of 2 resnets
    adapter = adapters.adapter_for(patcher)
    expected = {"down_blocks.0": "input_blocks.3", "down_blocks.2": "input_blocks.9", "down_blocks.3": "input_blocks.11",
                "mid_block": "middle_block", "up_blocks.0": "output_blocks.2", "up_blocks.1": "output_blocks.5",
                "up_blocks.2": "output_blocks.8", "up_blocks.3": "output_blocks.11"}
    for diffusers_name, comfy_name in expected.items():
        site = adapter.resolve(patcher, Site(family="sd15", block=diffusers_name, stream="residual"))
        assert site.block == comfy_name
    sdlens = {"down_blocks.1.attentions.0": "input_blocks.4.1", "mid_block.attentions.0": "middle_block.1",
              "up_blocks.1.attentions.2": "output_blocks.5.1"}
    for diffusers_name, comfy_name in sdlens.items():
        assert adapter.resolve(patcher, f"{diffusers_name}:update").block == comfy_name
    with pytest.raises(SiteError, match=r"unknown site up_blocks\.4:residual for this sd15 model"):
        adapter.resolve(patcher, Site(family="sd15", block="up_blocks.4", stream="residual"))
