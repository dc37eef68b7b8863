"""The site layer: one catalogue per architecture, names that translate both ways, one call context."""
import pytest
import torch

from sae_core.errors import SiteError
from sae_core.sites import (
    FAMILIES, Site, UNetShape, call_context, cond_from_chunks, parse_site, prompt_rows, transformer_catalogue,
    unet_catalogue,
)

SD15 = UNetShape(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=(2, 2, 2, 2),
                 attention=(True, True, True, False))
SDXL = UNetShape(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2), attention=(False, True, True))


def flux(double=19, single=38, width=3072):
    return transformer_catalogue("flux", {"double_blocks": double, "single_blocks": single}, width)


def test_a_flux_catalogue_lists_every_block_and_stream_with_its_width():
    catalogue = flux(2, 3, 64)
    assert len(catalogue.sites) == 2 * 3 + 3 * 3
    assert {site.extra["d"] for site in catalogue.sites} == {64}
    assert catalogue.names[:3] == ["double_blocks.0:image", "double_blocks.0:text", "double_blocks.0:update"]


def test_the_context_site_comes_first_under_every_runtimes_name_with_the_text_encoders_width():
    catalogue = transformer_catalogue("flux", {"double_blocks": 2, "single_blocks": 2}, 64, context_width=4096)
    assert catalogue.names[0] == "context:text" and catalogue.sites[0].extra == {"d": 4096, "role": "context"}
    for name in ("context:text", "encoder_hidden_states:text", "c_crossattn:text", "flux:context:text"):
        assert catalogue.resolve(name).name == "context:text"
    unet = unet_catalogue("sd15", SD15, context_width=768)
    assert unet.resolve("encoder_hidden_states:text").extra["d"] == 768
    assert "context:text" not in flux(2, 2, 64).names  # a runtime that cannot hand the tokens over lists none
    with pytest.raises(SiteError, match="unknown site context:image"):
        catalogue.resolve("context:image")  # the prompt's tokens are text only


def test_diffusers_names_resolve_to_the_canonical_site_and_back():
    catalogue = flux()
    site = catalogue.resolve("transformer_blocks.18:image")
    assert (site.family, site.block, site.stream) == ("flux", "double_blocks.18", "image")
    assert catalogue.module(site, "diffusers") == "transformer_blocks.18"
    assert catalogue.module("single_transformer_blocks.9:image", "comfy") == "single_blocks.9"


def test_a_site_from_a_file_header_keeps_its_window_and_gets_the_width():
    site = flux().resolve(Site(family="flux", block="double_blocks.3", stream="image", timestep_window=(0.0, 0.5)))
    assert site.timestep_window == (0.0, 0.5) and site.extra["d"] == 3072


def test_a_site_of_another_family_is_refused_naming_both():
    with pytest.raises(SiteError, match="sd15 model, but this model is flux"):
        flux().resolve(Site(family="sd15", block="double_blocks.3", stream="image"))


def test_an_unknown_site_lists_the_models_sites():
    with pytest.raises(SiteError, match="available sites: double_blocks.0:image"):
        flux(2, 2, 8).resolve("double_blocks.7:image")
    with pytest.raises(SiteError, match="not 'block:stream'"):
        parse_site("double_blocks.1")


def test_sd3s_last_joint_block_has_no_text_stream():
    catalogue = transformer_catalogue("sd3", {"joint_blocks": 3}, 64)
    assert "joint_blocks.1:text" in catalogue.names and "joint_blocks.2:text" not in catalogue.names
    assert "joint_blocks.2:image" in catalogue.names


def test_every_family_builds_a_catalogue_with_diffusers_names_for_each_block():
    for name, spec in FAMILIES.items():
        catalogue = transformer_catalogue(name, {kind.prefix: 2 for kind in spec.kinds}, 32)
        assert catalogue.sites, name
        for site in catalogue.sites:
            assert catalogue.resolve(f"{catalogue.module(site, 'diffusers')}:{site.stream}").name == site.name


def test_sd15_unet_names_match_comfyui_blocks_and_diffusers_modules():
    catalogue = unet_catalogue("sd15", SD15)
    assert sum(s.block.startswith("input_blocks.") and s.stream == "residual" for s in catalogue.sites) == 12
    assert sum(s.block.startswith("output_blocks.") and "." not in s.block[14:] for s in catalogue.sites) == 12
    # Revelio's up_ft1 / up_ft2 and the bottleneck, by diffusers' block names.
    assert catalogue.resolve("up_blocks.1:residual").block == "output_blocks.5"
    assert catalogue.resolve("up_blocks.2:residual").block == "output_blocks.8"
    assert catalogue.resolve("mid_block:residual").block == "middle_block"
    assert catalogue.module("up_blocks.1:residual", "diffusers") == "up_blocks.1.upsamplers.0"
    assert catalogue.resolve("down_blocks.0:residual").block == "input_blocks.3"
    assert catalogue.module("input_blocks.1:residual", "diffusers") == "down_blocks.0.attentions.0"
    assert catalogue.module("input_blocks.10:residual", "diffusers") == "down_blocks.3.resnets.0"


def test_sdlens_attention_names_mean_the_transformer_not_its_block():
    catalogue = unet_catalogue("sdxl", SDXL)
    site = catalogue.resolve("down_blocks.2.attentions.1:update")
    assert site.block == "input_blocks.8.1" and site.extra["d"] == 1280
    assert catalogue.resolve("mid_block.attentions.0:update").block == "middle_block.1"
    assert catalogue.resolve("up_blocks.0.attentions.1:update").block == "output_blocks.1.1"


def test_unet_update_streams_exist_only_where_a_block_keeps_its_shape():
    catalogue = unet_catalogue("sd15", SD15)
    updates = {s.block for s in catalogue.sites if s.stream == "update" and s.extra["role"] != "attention"}
    assert "input_blocks.1" in updates and "middle_block" in updates
    assert "input_blocks.4" not in updates  # 320 -> 640 channels
    assert "input_blocks.3" not in updates  # a downsampler
    assert not any(b.startswith("output_blocks") for b in updates)  # their input is cat(h, skip)


def test_the_call_context_is_the_same_from_chunks_or_from_cond_flags():
    schedule = [14.6, 7.0, 3.0, 1.0, 0.3, 0.0]
    from_chunks = call_context(4, sigma=torch.tensor([3.0, 3.0]), schedule=schedule, chunks=[1, 0])
    from_flags = call_context(4, sigma=3.0, schedule=schedule, cond=[False, False, True, True])
    assert from_chunks.progress == from_flags.progress == 0.5
    assert torch.equal(from_chunks.cond, from_flags.cond)
    assert prompt_rows(from_chunks, 4).tolist() == [2, 3]


def test_an_unknown_context_says_none_instead_of_guessing():
    ctx = call_context(3, sigma=None, chunks=[0, 1])  # 3 rows do not tile 2 chunks
    assert ctx.sigma is None and ctx.progress is None and ctx.cond is None
    assert prompt_rows(ctx, 3).tolist() == [0, 1, 2]
    assert cond_from_chunks([], 2) is None
