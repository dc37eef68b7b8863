"""U-Net sites in both runtimes: ComfyUI's ``UNetModel`` (nodes/adapters/comfy_unet.py) and diffusers'
``UNet2DConditionModel`` (training/adapters/unet.py) list the same sites, and a site is the same tensor
in both, for SD 1.5, SD 2.x, SDXL and the SDXL refiner (tiny twins: tests/tiny_unets.py).
"""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

import tiny_comfy_models
from sae_core.sites import unet_catalogue
from sae_core.sites.unet import SHAPES
from site_probes import Recorder
from tiny_unets import FAMILIES, UNetPair, conditioning, unet_inputs, unet_pair

TOL = dict(rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def plugin(comfyui):
    comfyui.load_plugin_nodes()
    return comfyui.plugin_module()


@pytest.fixture(scope="module")
def comfy_adapters(plugin):
    return importlib.import_module(plugin.__name__ + ".nodes.adapters")


@pytest.fixture(scope="module")
def plugin_core(plugin):
    return importlib.import_module(plugin.__name__ + ".sae_core")


@pytest.fixture(scope="module")
def diffusers_adapters(comfyui):  # the comfyui fixture made torchvision importable beside CPU torch
    return importlib.import_module("training.adapters")



def adder(vector):
    def add(h, ctx):
        return h + vector.to(h.dtype)

    return add


def listing(adapter, model) -> list[tuple[str, int]]:
    return [(site.name, site.extra["d"]) for site in adapter.available_sites(model)]


@contextlib.contextmanager
def applied(patcher):
    """The patcher's object patches (our site blocks) installed in its model, removed on exit."""
    patcher.patch_model()
    try:
        yield patcher.model.diffusion_model
    finally:
        patcher.unpatch_model()


def comfy_call(patcher, inputs):
    """One direct call of ComfyUI's network under ``patcher``'s patches, with its transformer_options."""
    x, t, tokens, _, y = inputs
    options = dict(patcher.model_options.get("transformer_options", {}))
    with applied(patcher) as net, torch.no_grad():
        return net(x, t, context=tokens, y=y, transformer_options=options)


def diffusers_call(model, inputs):
    x, t, tokens, added, _ = inputs
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=tokens, added_cond_kwargs=added).sample


def comfy_patch(adapters, patcher, functions: dict):
    """``adapter.patch`` with sites given by name (either runtime's naming)."""
    adapter = adapters.adapter_for(patcher)
    return adapter.patch(patcher, {adapter.resolve(patcher, name): fn for name, fn in functions.items()})


# ----------------------------------------------------------------------------- one catalogue


@pytest.mark.parametrize("family", FAMILIES)
def test_both_runtimes_list_the_same_sites_with_the_same_widths(comfy_adapters, diffusers_adapters, family):
    from comfy.ldm.modules.attention import SpatialTransformer

    pair = unet_pair(family)
    comfy, diffusers = comfy_adapters.adapter_for(pair.comfy), diffusers_adapters.adapter_for(pair.diffusers)
    assert comfy.family(pair.comfy) == diffusers.family(pair.diffusers) == family
    sites = listing(comfy, pair.comfy)
    assert sites == listing(diffusers, pair.diffusers)
    # ... and the list is the network's: a residual site per block, an update site per spatial transformer.
    net = pair.comfy.model.diffusion_model
    blocks = [f"input_blocks.{i}" for i in range(len(net.input_blocks))] + ["middle_block"] + \
             [f"output_blocks.{i}" for i in range(len(net.output_blocks))]
    transformers = [name for name, module in net.named_modules() if isinstance(module, SpatialTransformer)]
    assert [name for name, _ in sites if name.endswith(":residual")] == [f"{b}:residual" for b in blocks]
    assert sorted(name for name, _ in sites if name.split(":")[0] in transformers) == \
           sorted(f"{t}:update" for t in transformers)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_capture_at_a_site_is_the_same_tensor_in_both_runtimes(comfy_adapters, diffusers_adapters, family):
    pair = unet_pair(family)
    inputs = unet_inputs(pair)
    names = [name for name, _ in listing(comfy_adapters.adapter_for(pair.comfy), pair.comfy)
             if not name.startswith("context:")]  # edited in apply_model, which this direct network call skips
    in_comfy, in_diffusers = {n: Recorder() for n in names}, {n: Recorder() for n in names}
    comfy_out = comfy_call(comfy_patch(comfy_adapters, pair.comfy, in_comfy), inputs)
    with diffusers_adapters.attach(pair.diffusers, in_diffusers):
        diffusers_out = diffusers_call(pair.diffusers, inputs)
    torch.testing.assert_close(comfy_out, diffusers_out, **TOL)
    assert any(n.endswith(".1:update") for n in names) and any(n.endswith(":update") and ".1:" not in n for n in names)
    for name in names:
        (a,), (b,) = in_comfy[name].h, in_diffusers[name].h
        assert a.shape == b.shape and in_comfy[name].ctx[0].grid == in_diffusers[name].ctx[0].grid, name
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name}: {m}")


OLD_NAMES = {
    "sd15": ["down_blocks.0:residual", "down_blocks.1:residual", "mid_block:residual", "mid_block:update",
             "up_blocks.0:residual", "up_blocks.1:residual", "down_blocks.0.attentions.0:update",
             "mid_block.attentions.0:update", "up_blocks.1.attentions.0:update", "up_blocks.1.attentions.1:update"],
    "sdxl": ["down_blocks.0:residual", "down_blocks.1:residual", "mid_block:residual", "mid_block:update",
             "up_blocks.0:residual", "up_blocks.1:residual", "down_blocks.1.attentions.1:update",
             "mid_block.attentions.0:update", "up_blocks.0.attentions.0:update", "up_blocks.0.attentions.2:update"],
}
"""Site names the diffusers adapter used to offer (block outputs and SDLens's transformer updates)."""


def _old_tensor(name: str, inputs: dict, outputs: dict) -> torch.Tensor:
    """What an old diffusers site meant: the module's output (item 0 of a tuple), minus its input for "update"."""
    block, stream = name.split(":")
    out = outputs[block][0] if isinstance(outputs[block], tuple) else outputs[block]
    if stream == "update":
        out = out - inputs[block]
    return out.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_old_diffusers_names_resolve_to_the_canonical_site_with_their_tensor(comfy_adapters, diffusers_adapters,
                                                                            family):
    pair = unet_pair(family)
    inputs = unet_inputs(pair)
    diffusers = diffusers_adapters.adapter_for(pair.diffusers)
    comfy = comfy_adapters.adapter_for(pair.comfy)
    for name in OLD_NAMES[family]:
        assert diffusers.resolve(pair.diffusers, name).name == comfy.resolve(pair.comfy, name).name, name
        assert not diffusers.resolve(pair.diffusers, name).block.startswith(("down_", "mid_", "up_")), name
    module_in, module_out, handles = {}, {}, []

    def keep(block):
        def hook(module, args, kwargs, out):
            module_in[block] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            module_out[block] = out

        return hook

    for block in {name.split(":")[0] for name in OLD_NAMES[family]}:
        handles.append(pair.diffusers.get_submodule(block).register_forward_hook(keep(block), with_kwargs=True))
    in_comfy = {n: Recorder() for n in OLD_NAMES[family]}
    in_diffusers = {n: Recorder() for n in OLD_NAMES[family]}
    try:
        with diffusers_adapters.attach(pair.diffusers, in_diffusers):
            diffusers_call(pair.diffusers, inputs)
    finally:
        for handle in handles:
            handle.remove()
    comfy_call(comfy_patch(comfy_adapters, pair.comfy, in_comfy), inputs)
    for name in OLD_NAMES[family]:
        expected = _old_tensor(name, module_in, module_out)
        assert torch.equal(in_diffusers[name].h[0], expected), name
        torch.testing.assert_close(in_comfy[name].h[0], expected, **TOL, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- the released layouts

RELEASED = {
    "sd15": dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1),
    "sdxl": dict(num_res_blocks=[2] * 3, channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10),
    "sdxl_refiner": dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4], transformer_depth=[0, 0, 4, 4, 4, 4, 0, 0],
                         transformer_depth_output=[0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0], transformer_depth_middle=4),
}
"""ComfyUI's unet_config numbers of the released checkpoints (SD 2.x has SD 1.5's)."""
RELEASED["sd2"] = RELEASED["sd15"]


@pytest.mark.parametrize("family", FAMILIES)
def test_released_layouts_pair_the_modules_that_comfyuis_own_key_map_pairs(comfyui, family):
    import comfy.utils

    key_map = comfy.utils.unet_to_diffusers(RELEASED[family])  # diffusers weight -> ComfyUI weight
    catalogue = unet_catalogue(family, SHAPES[family])
    for block in catalogue.blocks:
        for module in {block.module("diffusers"), block.input_module("diffusers")}:
            targets = {v for k, v in key_map.items() if k.startswith(module + ".")}
            assert targets and all(t.startswith(block.name + ".") for t in targets), (block.name, module)


def test_sdlens_and_revelio_names_are_the_comfyui_blocks_they_always_meant():
    sdxl = unet_catalogue("sdxl", SHAPES["sdxl"])
    sdlens = {name: sdxl.resolve(f"{name}:update").block for name in (
        "down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1")}
    assert sdlens == {"down_blocks.2.attentions.1": "input_blocks.8.1", "mid_block.attentions.0": "middle_block.1",
                      "up_blocks.0.attentions.0": "output_blocks.0.1", "up_blocks.0.attentions.1": "output_blocks.1.1"}
    assert sdxl.resolve("input_blocks.8.1:update").extra["d"] == 1280
    sd15 = unet_catalogue("sd15", SHAPES["sd15"])
    revelio = {name: sd15.resolve(f"{name}:residual") for name in ("mid_block", "up_blocks.1", "up_blocks.2")}
    assert {n: (s.block, s.extra["d"]) for n, s in revelio.items()} == {
        "mid_block": ("middle_block", 1280), "up_blocks.1": ("output_blocks.5", 1280),
        "up_blocks.2": ("output_blocks.8", 640)}


# ----------------------------------------------------------------------------- SD 2.x and the refiner in ComfyUI


def _sample(pair: UNetPair, patcher, prompt_seed: int = 1):
    positive, negative = conditioning(pair, seed=prompt_seed)
    return tiny_comfy_models.sample(patcher, seed=3, steps=1, cfg=2.0, positive=positive, negative=negative,
                                    latent=tiny_comfy_models.random_latent(seed=2))


def _attention_site(adapters, patcher) -> str:
    return next(s.name for s in adapters.adapter_for(patcher).available_sites(patcher) if s.block.endswith(".1"))


@pytest.mark.parametrize("family", ["sd2", "sdxl_refiner"])
def test_sd2_and_refiner_capture_and_steer_through_comfyuis_sampler(comfy_adapters, plugin_core, family):
    pair = unet_pair(family)
    patcher = pair.comfy
    attention = _attention_site(comfy_adapters, patcher)
    base = _sample(pair, patcher)

    seen = {"middle_block:residual": Recorder(), attention: Recorder()}
    assert torch.equal(_sample(pair, comfy_patch(comfy_adapters, patcher, seen)), base)
    for recorder in seen.values():
        assert len(recorder.h) == 1 and recorder.h[0].shape[0] == 2  # 1 step, cond + uncond batched
        assert all(ctx.sigma is not None and sorted(ctx.cond.tolist()) == [False, True] for ctx in recorder.ctx)
        grid = recorder.ctx[0].grid
        assert recorder.h[0].shape[1] == grid[0] * grid[1]

    width = comfy_adapters.adapter_for(patcher).site_width(patcher, attention)
    sae = plugin_core.SparseAutoencoder(width, 16, 4, seed=0)

    def steered(strength: float):
        fn = plugin_core.steer_function(sae, [plugin_core.Steer(features=(0, 1), strengths=(strength,))])
        return comfy_patch(comfy_adapters, patcher, {attention: fn})

    assert torch.equal(_sample(pair, steered(0.0)), base)
    strong = steered(8.0)
    assert (_sample(pair, strong) - base).abs().max() > 1e-3
    for run in range(20):  # alternating steered / unsteered prompts leave nothing behind in the shared model
        _sample(pair, strong if run % 2 == 0 else patcher, prompt_seed=10 + run)
    assert torch.equal(_sample(pair, patcher), base)


@pytest.mark.parametrize("family", ["sd2", "sdxl_refiner"])
def test_an_attention_update_edit_moves_the_transformer_output_by_what_was_added(comfy_adapters, family):
    pair = unet_pair(family)
    patcher = pair.comfy
    net = patcher.model.diffusion_model
    # A block whose transformer is its last layer: the block's residual is the transformer's output.
    owner = next(s.block[:-2] for s in comfy_adapters.adapter_for(patcher).available_sites(patcher)
                 if s.block.endswith(".1") and len(net.get_submodule(s.block[:-2])) == 2)
    width = comfy_adapters.adapter_for(patcher).site_width(patcher, f"{owner}.1:update")
    vector = torch.linspace(-1, 1, width)
    after, update = Recorder(), Recorder()
    patched = comfy_patch(comfy_adapters, patcher, {f"{owner}.1:update": update, f"{owner}:residual": after})
    patched = comfy_patch(comfy_adapters, patched, {f"{owner}.1:update": adder(vector)})
    transformer_in, transformer_out = [], []

    def keep(module, args, out):
        transformer_in.append(args[0].clone())
        transformer_out.append(out.clone())

    handle = net.get_submodule(owner)[1].register_forward_hook(keep)
    try:
        comfy_call(patched, unet_inputs(pair))
    finally:
        handle.remove()
    plain = transformer_out[0].flatten(2).transpose(1, 2)
    assert torch.equal(update.h[0], plain - transformer_in[0].flatten(2).transpose(1, 2))  # the update, untouched
    torch.testing.assert_close(after.h[0], plain + vector, rtol=0, atol=1e-6)  # the output moved by exactly vector


# ----------------------------------------------------------------------------- other U-Nets


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # ComfyUI's upscaler buffers
def test_other_unets_are_refused_with_a_site_error(comfy_adapters, diffusers_adapters, plugin_core, comfyui):
    import comfy.supported_models as models
    from sae_core.errors import SiteError

    upscaler = tiny_comfy_models.tiny_unet_patcher(  # its config disables self-attention on 4 levels
        models.SD_X4Upscaler, in_channels=7, channel_mult=[1, 1, 1, 1], num_res_blocks=[1] * 4,
        transformer_depth=[1] * 4, transformer_depth_output=[1] * 8)
    adapter = comfy_adapters.UNetAdapter()
    assert not adapter.handles(upscaler)
    with pytest.raises(plugin_core.SiteError, match="not an SD 1.5, SD 2.x, SDXL or SDXL refiner U-Net"):
        adapter.available_sites(upscaler)

    unet = diffusers_adapters.UNetAdapter()
    config = dict(unet_pair("sd2").diffusers.config)
    for change, message in (({"num_class_embeds": 1000}, "class labels"),
                            ({"down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")}, "no sites here")):
        model = type("Model", (), {"config": {**config, **change}})()
        with pytest.raises(SiteError, match=message):
            unet.available_sites(model)
