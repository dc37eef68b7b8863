"""One dictionary, both runtimes: a dictionary whose site was resolved in diffusers loads by that site in
ComfyUI on the same architecture, and the other way round, for FLUX.1, SD3, Qwen-Image and the SD 1.5 U-Net.

Each architecture is built twice with the same weights: a tiny random diffusers model, and ComfyUI's own
class (``comfy.supported_models``) with the diffusers weights converted by ComfyUI's own key maps
(``comfy.utils.flux_to_diffusers`` / ``mmdit_to_diffusers`` / ``unet_to_diffusers``, applied by the
organism package's strict converter; Qwen-Image's ComfyUI keys are diffusers' own). A dictionary is saved by one runtime's engine (``sae_core.save_dictionary`` here, the plugin's copy
of it on the ComfyUI side) with the site that runtime resolved, under that runtime's block name, and
loaded by the other's. Then, because the weights are the same, the very tokens each runtime hands a
site function at that site are compared by value over one denoiser call with the same inputs (the
inputs ComfyUI's sampler gave its network, laid out as the diffusers model takes them).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import tiny_comfy_models as tiny

TOL = 1e-4
TEXT = 6


@dataclass
class Pair:
    """One architecture in both runtimes, with the same weights."""

    diffusers: torch.nn.Module
    comfy: Any
    """The ComfyUI MODEL (a ModelPatcher)."""
    conditioning: list
    latent: torch.Tensor
    to_diffusers: Callable[[tuple, dict], dict]
    """ComfyUI network inputs (args, kwargs) -> the diffusers model's keyword arguments for the same call."""
    flow: bool = True
    """The model's timestep input says its sigma (flow models); a U-Net's DDPM timestep does not, and a bare
    diffusers call of it knows no sigma (a pipeline's ``SamplingState`` converts it with the scheduler)."""


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (diffusers zero-initialises some gates): a copied activation cannot match by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return module.eval()


def _convert_into(patcher, diffusers_model, key_map) -> None:
    """Load the diffusers weights into ComfyUI's network through a ComfyUI key map (strict)."""
    from organism.comfy import convert_state_dict

    net = patcher.model.diffusion_model
    expected = {k: v.shape for k, v in net.state_dict().items()}
    net.load_state_dict(convert_state_dict(diffusers_model.state_dict(), key_map, expected, source="diffusers"))


def _comfy_patcher(model_config):
    import comfy.model_management
    import comfy.model_patcher

    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu,
                                            size=comfy.model_management.module_size(model))


def _conditioning(width: int, pooled: bool) -> list:
    g = torch.Generator().manual_seed(7)
    extras = {"pooled_output": torch.randn(1, 32, generator=g)} if pooled else {}
    return [[torch.randn(1, TEXT, width, generator=g), extras]]


def _grid_ids(rows: int, cols: int) -> torch.Tensor:
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(cols)[None, :]
    return ids.reshape(-1, 3)


def flux_pair() -> Pair:
    import comfy.utils
    from diffusers import FluxTransformer2DModel

    from organism.comfy import comfy_classes, flux_unet_config

    model = _randomise(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                              pooled_projection_dim=32, guidance_embeds=False,
                                              axes_dims_rope=[4, 6, 6]), seed=1)
    unet_config = flux_unet_config(dict(model.config))
    patcher = _comfy_patcher(comfy_classes().OrganismFlux(unet_config))
    _convert_into(patcher, model, comfy.utils.flux_to_diffusers(unet_config))

    def to_diffusers(args: tuple, kwargs: dict) -> dict:
        x, t = args[:2]
        rows, cols = x.shape[-2] // 2, x.shape[-1] // 2
        packed = x.reshape(x.shape[0], x.shape[1], rows, 2, cols, 2).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], rows * cols, -1)
        context = kwargs["context"]
        return dict(hidden_states=packed, encoder_hidden_states=context, pooled_projections=kwargs["y"], timestep=t,
                    img_ids=_grid_ids(rows, cols), txt_ids=torch.zeros(context.shape[1], 3))

    return Pair(model, patcher, _conditioning(48, pooled=True), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
                to_diffusers)


def sd3_pair() -> Pair:
    import comfy.utils
    from diffusers import SD3Transformer2DModel

    spec = tiny.TINY_FAMILIES["sd3"]  # depth 2: ComfyUI's MMDiT is 64 x depth = 128 wide, 2 heads
    model = _randomise(SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                             attention_head_dim=64, num_attention_heads=2, joint_attention_dim=48,
                                             caption_projection_dim=128, pooled_projection_dim=32, out_channels=4,
                                             pos_embed_max_size=8), seed=3)
    patcher = tiny.tiny_family_patcher("sd3", seed=0)
    _convert_into(patcher, model, comfy.utils.mmdit_to_diffusers(dict(spec.unet_config)))

    def to_diffusers(args: tuple, kwargs: dict) -> dict:
        return dict(hidden_states=args[0], timestep=args[1], encoder_hidden_states=kwargs["context"],
                    pooled_projections=kwargs["y"])

    return Pair(model, patcher, _conditioning(48, pooled=True), tiny.family_latent(spec), to_diffusers)


def qwen_image_pair() -> Pair:
    from diffusers import QwenImageTransformer2DModel

    spec = tiny.TINY_FAMILIES["qwen_image"]
    model = _randomise(QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                                                   axes_dims_rope=(8, 12, 12)), seed=4)
    patcher = tiny.tiny_family_patcher("qwen_image", seed=0)
    patcher.model.diffusion_model.load_state_dict(model.state_dict())  # ComfyUI's Qwen-Image keys are diffusers'

    def to_diffusers(args: tuple, kwargs: dict) -> dict:
        x, t = args[:2]  # (B, C, 1, H, W): packed as ComfyUI's process_img and diffusers' pipeline both do
        b, c, _, h, w = x.shape
        packed = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        return dict(hidden_states=packed, timestep=t, encoder_hidden_states=kwargs["context"],
                    encoder_hidden_states_mask=kwargs.get("attention_mask"), img_shapes=[[(1, h // 2, w // 2)]] * b)

    return Pair(model, patcher, _conditioning(48, pooled=False), tiny.family_latent(spec), to_diffusers)


def sd15_pair() -> Pair:
    import comfy.utils
    from diffusers import UNet2DConditionModel

    from organism.comfy import comfy_classes, unet_unet_config

    model = _randomise(UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                            block_out_channels=(32, 64), cross_attention_dim=48, attention_head_dim=4,
                                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), seed=5)
    unet_config = unet_unet_config(dict(model.config))
    patcher = _comfy_patcher(comfy_classes().OrganismSD15(unet_config))
    _convert_into(patcher, model, comfy.utils.unet_to_diffusers(unet_config))

    def to_diffusers(args: tuple, kwargs: dict) -> dict:
        return dict(sample=args[0], timestep=args[1], encoder_hidden_states=kwargs["context"])

    return Pair(model, patcher, _conditioning(48, pooled=False), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
                to_diffusers, flow=False)


PAIRS = {"flux": flux_pair, "sd3": sd3_pair, "qwen_image": qwen_image_pair, "sd15": sd15_pair}
SITES = {  # family -> (a site by diffusers' name, a site by ComfyUI's name), both mean one block of both runtimes
    "flux": ("transformer_blocks.1:image", "single_blocks.0:text"),
    "sd3": ("transformer_blocks.0:text", "joint_blocks.1:update"),
    "qwen_image": ("transformer_blocks.1:image", "transformer_blocks.0:text"),
    "sd15": ("up_blocks.1:residual", "middle_block:residual"),
}


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def plugin(comfyui):
    comfyui.load_plugin_nodes()
    return comfyui.plugin_module()


@pytest.fixture(scope="module")
def comfy_side(plugin):
    """The plugin as ComfyUI imported it: its adapters and its own copy of the engine."""
    def module(name):
        return importlib.import_module(f"{plugin.__name__}.{name}")

    return module("nodes.adapters"), module("sae_core")


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request, comfyui) -> tuple[str, Pair]:
    torch.manual_seed(0)
    return request.param, PAIRS[request.param]()


class Keep:
    """A site function keeping a copy of the tokens it is given, and the noise level it was told."""

    def __init__(self):
        self.seen: list[tuple[torch.Tensor, float]] = []

    def __call__(self, h, ctx):
        self.seen.append((h.detach().clone(), ctx.sigma))
        return h


def comfy_tokens(adapters, pair: Pair, site) -> tuple[tuple[torch.Tensor, float], tuple, dict]:
    """What ComfyUI hands a site function at ``site`` in one sampler step (tokens, sigma), and the inputs its
    network got."""
    keep, inputs = Keep(), {}

    def note(module, args, kwargs):
        inputs.setdefault("call", (tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs)))

    patched = adapters.adapter_for(pair.comfy).patch(pair.comfy, {site: keep})
    handle = pair.comfy.model.diffusion_model.register_forward_pre_hook(note, with_kwargs=True)
    try:
        tiny.sample(patched, seed=5, steps=1, cfg=1.0, positive=pair.conditioning, negative=pair.conditioning,
                    latent=pair.latent)
    finally:
        handle.remove()
    (h,) = keep.seen
    return h, *inputs["call"]


def diffusers_tokens(pair: Pair, site, args: tuple, kwargs: dict) -> tuple[torch.Tensor, float]:
    from training.adapters import attach

    keep = Keep()
    with torch.no_grad(), attach(pair.diffusers, {site: keep}):
        pair.diffusers(**pair.to_diffusers(args, kwargs), return_dict=False)
    (h,) = keep.seen
    return h


# ----------------------------------------------------------------------------- tests


def test_a_dictionary_saved_on_a_diffusers_site_loads_on_the_same_comfyui_site_and_sees_the_same_tokens(
        pair, comfy_side, tmp_path):
    import sae_core
    from training.adapters import resolve_site

    family, pair_ = pair
    adapters, comfy_engine = comfy_side
    site = resolve_site(pair_.diffusers, SITES[family][0])  # named as diffusers names it
    d = int(site.extra["d"])
    path = sae_core.save_dictionary(sae_core.SparseAutoencoder(d, 4 * d, 4, site=site), tmp_path / "headless.safetensors")

    dictionary = comfy_engine.load_dictionary(path)
    comfy_site = adapters.adapter_for(pair_.comfy).resolve(pair_.comfy, dictionary.site)
    assert (comfy_site.family, comfy_site.block, comfy_site.stream) == (site.family, site.block, site.stream)
    assert comfy_site.extra["d"] == dictionary.d_in == d
    comfy_engine.check_site_width(dictionary, int(comfy_site.extra["d"]), comfy_site.name)

    assert_same_tokens(adapters, pair_, comfy_site, site)


def assert_same_tokens(adapters, pair: Pair, comfy_site, site) -> None:
    """One call with the same inputs: both runtimes hand the site function the same tokens and sigma (where
    the call alone tells it)."""
    (in_comfy, comfy_sigma), args, kwargs = comfy_tokens(adapters, pair, comfy_site)
    in_diffusers, diffusers_sigma = diffusers_tokens(pair, site, args, kwargs)
    assert in_comfy.shape == in_diffusers.shape == (1, in_comfy.shape[1], site.extra["d"])
    assert (in_comfy - in_diffusers).abs().max() < TOL * max(1.0, float(in_diffusers.abs().max()))
    assert diffusers_sigma == (pytest.approx(comfy_sigma, rel=1e-5) if pair.flow else None)


def test_a_dictionary_saved_on_a_comfyui_site_loads_on_the_same_diffusers_site(pair, comfy_side, tmp_path):
    import sae_core
    from training.adapters import resolve_site

    family, pair_ = pair
    adapters, comfy_engine = comfy_side
    comfy_site = adapters.adapter_for(pair_.comfy).resolve(pair_.comfy, SITES[family][1])  # ComfyUI's name
    d = int(comfy_site.extra["d"])
    path = comfy_engine.save_dictionary(comfy_engine.SparseAutoencoder(d, 4 * d, 4, site=comfy_site),
                                        tmp_path / "in_comfyui.safetensors")

    dictionary = sae_core.load_dictionary(path)
    site = resolve_site(pair_.diffusers, dictionary.site)
    assert (site.family, site.block, site.stream, site.extra["d"]) == (comfy_site.family, comfy_site.block,
                                                                       comfy_site.stream, dictionary.d_in)
    sae_core.check_site_width(dictionary, int(site.extra["d"]), site.name)
    assert_same_tokens(adapters, pair_, comfy_site, site)


def test_a_dictionary_of_another_width_is_refused_in_both_runtimes(pair, comfy_side, tmp_path):
    import sae_core
    from training.adapters import resolve_site

    family, pair_ = pair
    adapters, comfy_engine = comfy_side
    site = resolve_site(pair_.diffusers, SITES[family][0])
    narrow = sae_core.SparseAutoencoder(int(site.extra["d"]) // 2, 8, 2, site=site)
    path = sae_core.save_dictionary(narrow, tmp_path / "narrow.safetensors")
    dictionary = comfy_engine.load_dictionary(path)
    comfy_site = adapters.adapter_for(pair_.comfy).resolve(pair_.comfy, dictionary.site)
    with pytest.raises(comfy_engine.DictionaryError, match="has d_in="):
        comfy_engine.check_site_width(dictionary, int(comfy_site.extra["d"]), comfy_site.name)
    with pytest.raises(sae_core.DictionaryError, match="has d_in="):
        sae_core.check_site_width(narrow, int(site.extra["d"]), site.name)


def test_the_context_site_is_one_site_with_the_same_tokens_in_both_runtimes(pair, comfy_side):
    """The conditioning site: ComfyUI's ``c_crossattn`` and diffusers' ``encoder_hidden_states`` are the same
    tokens, under the same name and width, so a dictionary trained on the prompt's tokens loads in either."""
    from training.adapters import resolve_site

    family, pair_ = pair
    adapters, _ = comfy_side
    site = resolve_site(pair_.diffusers, "encoder_hidden_states:text")
    comfy_site = adapters.adapter_for(pair_.comfy).resolve(pair_.comfy, "c_crossattn:text")
    assert site.name == comfy_site.name == "context:text" and site.extra["d"] == comfy_site.extra["d"]
    assert_same_tokens(adapters, pair_, comfy_site, site)
