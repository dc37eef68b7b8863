"""diffusers adapters: sites of real (tiny, random) Flux and U-Net models, read and edited through hooks.

Each tiny model is built once per module. Token counts are chosen so that a swapped stream or a
transposed grid changes a shape: 5 text tokens, a 3x4 image-token grid for Flux, 8x8 U-Net latents.
"""
from types import SimpleNamespace

import comfyui_harness

comfyui_harness.apply_torchvision_workaround()  # diffusers -> transformers -> torchvision (see the harness)

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from sae_core import SparseAutoencoder, Steer, steer_function  # noqa: E402
from sae_core.errors import ConfigError, ScheduleError, SiteError  # noqa: E402
from sae_core.sites import Site  # noqa: E402
from training.adapters import ModelCall, SamplingState, Span, adapter_for, attach, available_sites, resolve_site  # noqa: E402
from training.adapters.transformers import token_grid  # noqa: E402
from site_probes import Recorder  # noqa: E402

B, TEXT, ROWS, COLS = 2, 5, 3, 4
D_FLUX = 32


def identity(h, ctx):
    return h


def add(vector):
    def steer(h, ctx):
        return h + vector.to(h.dtype)

    return steer



class ManualHooks:
    """Plain torch hooks recording modules' inputs and outputs, for comparison; removed on exit."""

    def __init__(self, model, names):
        self.model, self.names = model, names
        self.inputs, self.outputs, self.handles = {}, {}, []

    def __enter__(self):
        for name in self.names:
            module = self.model.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._record(name), with_kwargs=True))
        return self

    def _record(self, name):
        def hook(module, args, kwargs, output):
            self.inputs[name] = dict(kwargs, _args=args)
            self.outputs[name] = output

        return hook

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def hidden_input(inputs):
    return inputs["hidden_states"] if "hidden_states" in inputs else inputs["_args"][0]


def assert_no_hooks(model):
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name or 'model'}"


def site(model, block, stream):
    return resolve_site(model, f"{block}:{stream}")


# ---------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=[4, 6, 6])
    return model.eval()


def grid_ids(rows, cols):
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(cols)[None, :]
    return ids.reshape(-1, 3)


@pytest.fixture(scope="module")
def flux_inputs():
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(B, ROWS * COLS, 16, generator=gen),
                encoder_hidden_states=torch.randn(B, TEXT, 32, generator=gen),
                pooled_projections=torch.randn(B, 32, generator=gen), timestep=torch.full((B,), 0.75),
                img_ids=grid_ids(ROWS, COLS), txt_ids=torch.zeros(TEXT, 3))


UNET_COMMON = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                   sample_size=8, attention_head_dim=8)


@pytest.fixture(scope="module")
def sd15():
    torch.manual_seed(0)
    model = UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **UNET_COMMON)
    return model.eval()


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(0)
    model = UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                 transformer_layers_per_block=(1, 2), use_linear_projection=True, **UNET_COMMON)
    return model.eval()


@pytest.fixture(scope="module")
def unet_inputs():
    gen = torch.Generator().manual_seed(2)
    return dict(sample=torch.randn(B, 4, 8, 8, generator=gen), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(B, TEXT, 32, generator=gen))


@pytest.fixture(scope="module")
def sdxl_inputs(unet_inputs):
    gen = torch.Generator().manual_seed(3)
    added = dict(text_embeds=torch.randn(B, 32, generator=gen), time_ids=torch.randn(B, 6, generator=gen))
    return dict(unet_inputs, added_cond_kwargs=added)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# ---------------------------------------------------------------------------------------- Flux: sites


def test_flux_lists_double_and_single_block_sites(flux):
    names = [(s.family, s.block, s.stream, s.extra["d"]) for s in available_sites(flux)]
    assert names == [("flux", "context", "text", 32)] + [  # the prompt's tokens first, as wide as joint_attention_dim
        ("flux", f"{kind}.{i}", stream, D_FLUX) for kind in ("double_blocks", "single_blocks")
        for i in range(2) for stream in ("image", "text", "update")]


def test_flux_sites_resolve_by_either_runtimes_name(flux):
    assert resolve_site(flux, "transformer_blocks.1:text") == resolve_site(flux, "double_blocks.1:text")
    assert resolve_site(flux, "single_transformer_blocks.0:image").name == "single_blocks.0:image"
    assert resolve_site(flux, Site("flux", "double_blocks.1", "image", timestep_window=(0.0, 0.5))).timestep_window == (0.0, 0.5)
    assert resolve_site(flux, "flux:double_blocks.0:update").extra["d"] == D_FLUX


def test_flux_blocks_return_text_then_image(flux, flux_inputs):
    """diffusers 0.42: both block kinds return (encoder_hidden_states, hidden_states) = (text, image)."""
    names = ["transformer_blocks.0", "single_transformer_blocks.0"]
    with ManualHooks(flux, names) as manual:
        run(flux, flux_inputs)
    for name in names:
        text, image = manual.outputs[name]
        assert text.shape == (B, TEXT, D_FLUX) and image.shape == (B, ROWS * COLS, D_FLUX)


def test_flux_capture_sees_each_streams_own_tokens(flux, flux_inputs):
    recorders = {s: Recorder() for s in available_sites(flux) if s.block != "context"}
    names = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    with ManualHooks(flux, names) as manual, attach(flux, recorders):
        run(flux, flux_inputs)
    for s, recorder in recorders.items():
        kind, i = s.block.split(".")
        module = f"{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}.{i}"
        text, image = manual.outputs[module]
        expected = {"image": image, "text": text, "update": image - hidden_input(manual.inputs[module])}[s.stream]
        (h,), (ctx,) = recorder.h, recorder.ctx
        assert torch.equal(h, expected), s
        assert ctx.grid == (None if s.stream == "text" else (ROWS, COLS))


def test_flux_identity_is_bit_identical_and_leaves_no_hooks(flux, flux_inputs):
    before = run(flux, flux_inputs)
    with attach(flux, {s: identity for s in available_sites(flux)}):
        during = run(flux, flux_inputs)
    assert_no_hooks(flux)
    after = run(flux, flux_inputs)
    assert torch.equal(before, during) and torch.equal(before, after)


@pytest.mark.parametrize("stream, changed, unchanged", [("image", "hidden_states", "encoder_hidden_states"),
                                                        ("text", "encoder_hidden_states", "hidden_states")])
def test_flux_steer_changes_only_the_steered_stream(flux, flux_inputs, stream, changed, unchanged):
    vector = torch.linspace(-1, 1, D_FLUX)
    with ManualHooks(flux, ["transformer_blocks.1"]) as plain:
        base = run(flux, flux_inputs)
    with attach(flux, {site(flux, "double_blocks.0", stream): add(vector)}):
        with ManualHooks(flux, ["transformer_blocks.1"]) as steered:
            out = run(flux, flux_inputs)
    assert not torch.equal(out, base)
    next_plain, next_steered = plain.inputs["transformer_blocks.1"], steered.inputs["transformer_blocks.1"]
    torch.testing.assert_close(next_steered[changed], next_plain[changed] + vector)
    assert torch.equal(next_steered[unchanged], next_plain[unchanged])


def test_flux_single_block_steer_reaches_the_next_blocks_image_tokens(flux, flux_inputs):
    vector = torch.linspace(-1, 1, D_FLUX)
    with ManualHooks(flux, ["single_transformer_blocks.1"]) as plain:
        run(flux, flux_inputs)
    with attach(flux, {site(flux, "single_blocks.0", "image"): add(vector)}):
        with ManualHooks(flux, ["single_transformer_blocks.1"]) as steered:
            run(flux, flux_inputs)
    before, after = plain.inputs["single_transformer_blocks.1"], steered.inputs["single_transformer_blocks.1"]
    torch.testing.assert_close(after["hidden_states"], before["hidden_states"] + vector)
    assert torch.equal(after["encoder_hidden_states"], before["encoder_hidden_states"])


def test_flux_update_edit_moves_the_block_output(flux, flux_inputs):
    vector = torch.linspace(-1, 1, D_FLUX)
    with ManualHooks(flux, ["transformer_blocks.1"]) as plain:
        run(flux, flux_inputs)
    with attach(flux, {site(flux, "double_blocks.1", "update"): add(vector)}):
        with ManualHooks(flux, ["transformer_blocks.1"]) as steered:
            run(flux, flux_inputs)
    torch.testing.assert_close(steered.outputs["transformer_blocks.1"][1], plain.outputs["transformer_blocks.1"][1] + vector)
    assert torch.equal(steered.outputs["transformer_blocks.1"][0], plain.outputs["transformer_blocks.1"][0])


def test_flux_grid_comes_from_img_ids():
    assert token_grid(grid_ids(ROWS, COLS), ROWS * COLS) == (ROWS, COLS)
    assert token_grid(grid_ids(ROWS, COLS)[None], ROWS * COLS) == (ROWS, COLS)  # deprecated batch dimension
    assert token_grid(grid_ids(ROWS, COLS).flip(0), ROWS * COLS) is None  # not row-major
    assert token_grid(torch.cat([grid_ids(2, 2), grid_ids(2, 2)]), 8) is None  # e.g. appended reference tokens
    assert token_grid(None, 4) is None


# ---------------------------------------------------------------------------------------- U-Net: sites


def test_unet_sites_are_comfyuis_blocks_and_the_transformers_inside_them(sd15, sdxl):
    def names(model):
        return {(s.block, s.stream): s.extra["d"] for s in available_sites(model)}

    assert {s.family for s in available_sites(sd15)} == {"sd15"}
    assert {s.family for s in available_sites(sdxl)} == {"sdxl"}
    assert names(sd15) == {
        ("context", "text"): sd15.config.cross_attention_dim, ("input_blocks.0", "residual"): 32, ("input_blocks.1", "residual"): 32, ("input_blocks.1", "update"): 32,
        ("input_blocks.2", "residual"): 32, ("input_blocks.3", "residual"): 64,
        ("middle_block", "residual"): 64, ("middle_block", "update"): 64,
        ("output_blocks.0", "residual"): 64, ("output_blocks.1", "residual"): 64,
        ("output_blocks.2", "residual"): 32, ("output_blocks.3", "residual"): 32,
        ("input_blocks.1.1", "update"): 32, ("input_blocks.3.1", "update"): 64, ("middle_block.1", "update"): 64,
        ("output_blocks.0.1", "update"): 64, ("output_blocks.1.1", "update"): 64,
        ("output_blocks.2.1", "update"): 32, ("output_blocks.3.1", "update"): 32,
    }
    # The sites diffusers' names used to offer still resolve, with their widths.
    old = {
        "down_blocks.0:residual": 32, "down_blocks.0.attentions.0:update": 32, "down_blocks.1:residual": 64,
        "down_blocks.1.attentions.0:update": 64, "mid_block:residual": 64, "mid_block:update": 64,
        "mid_block.attentions.0:update": 64, "up_blocks.0:residual": 64, "up_blocks.0.attentions.0:update": 64,
        "up_blocks.0.attentions.1:update": 64, "up_blocks.1:residual": 32, "up_blocks.1.attentions.0:update": 32,
        "up_blocks.1.attentions.1:update": 32,
    }
    assert {name: resolve_site(sd15, name).extra["d"] for name in old} == old
    with pytest.raises(SiteError, match="unknown site down_blocks.0.attentions.0:update"):
        resolve_site(sdxl, "down_blocks.0.attentions.0:update")  # DownBlock2D has no attention
    assert resolve_site(sdxl, "mid_block.attentions.0:update").block == "middle_block.1"


def _module_names(model) -> dict:
    """Site block -> (diffusers module whose output it is, module whose input is its input)."""
    catalogue = adapter_for(model).catalogue(model)
    return {b.name: (b.module("diffusers"), b.input_module("diffusers")) for b in catalogue.blocks if b.role != "context"}


def test_unet_update_is_listed_exactly_where_a_block_keeps_its_shape(sd15, unet_inputs):
    modules = _module_names(sd15)
    with ManualHooks(sd15, sorted({m for pair in modules.values() for m in pair})) as manual:
        run(sd15, unet_inputs)
    listed = {s.block for s in available_sites(sd15) if s.stream == "update"}
    for block, (out_module, in_module) in modules.items():
        output = manual.outputs[out_module]
        output = output[0] if isinstance(output, tuple) else output
        assert (block in listed) == (output.shape == hidden_input(manual.inputs[in_module]).shape), block


def test_unet_capture_is_the_output_map_as_tokens(sd15, unet_inputs):
    modules = _module_names(sd15)
    recorders = {s: Recorder() for s in available_sites(sd15) if s.block != "context"}
    with ManualHooks(sd15, sorted({m for pair in modules.values() for m in pair})) as manual, attach(sd15, recorders):
        run(sd15, unet_inputs)
    for s, recorder in recorders.items():
        out_module, in_module = modules[s.block]
        output = manual.outputs[out_module]
        output = output[0] if isinstance(output, tuple) else output
        x = output - hidden_input(manual.inputs[in_module]) if s.stream == "update" else output
        (h,), (ctx,) = recorder.h, recorder.ctx
        height, width = x.shape[-2:]
        assert h.shape == (B, height * width, s.extra["d"]) and ctx.grid == (height, width), s
        assert torch.equal(h, x.flatten(2).transpose(1, 2)), s
        assert torch.equal(h[:, 1 * width + 2], x[:, :, 1, 2]), s  # token r * W + c is position (r, c)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_unet_identity_is_bit_identical_and_leaves_no_hooks(name, request):
    model = request.getfixturevalue(name)
    inputs = request.getfixturevalue("unet_inputs" if name == "sd15" else "sdxl_inputs")
    before = run(model, inputs)
    with attach(model, {s: identity for s in available_sites(model)}):
        during = run(model, inputs)
    assert_no_hooks(model)
    between = run(model, inputs)
    with attach(model, {s: Recorder() for s in available_sites(model)}):
        again = run(model, inputs)
    assert_no_hooks(model)
    after = run(model, inputs)
    for out in (during, between, again, after):
        assert torch.equal(before, out)


def test_unet_down_block_steer_reaches_next_block_and_skip(sd15, unet_inputs):
    """down_blocks.0's output feeds down_blocks.1 and, as a skip, up_blocks.0: both get the edit."""
    vector = torch.linspace(-1, 1, 32)
    names = ["down_blocks.1", "up_blocks.0", "up_blocks.1"]
    with ManualHooks(sd15, names) as plain:
        base = run(sd15, unet_inputs)
    with attach(sd15, {site(sd15, "down_blocks.0", "residual"): add(vector)}):
        with ManualHooks(sd15, names) as steered:
            out = run(sd15, unet_inputs)
    assert not torch.equal(out, base)
    shift = vector.reshape(1, -1, 1, 1)
    torch.testing.assert_close(steered.inputs["down_blocks.1"]["hidden_states"],
                               plain.inputs["down_blocks.1"]["hidden_states"] + shift)
    skips_plain, skips_steered = ([m.inputs[up]["res_hidden_states_tuple"] for up in ("up_blocks.0", "up_blocks.1")]
                                  for m in (plain, steered))
    # up_blocks.0 gets down_blocks.0's last skip (its output, after the downsampler) ...
    torch.testing.assert_close(skips_steered[0][0], skips_plain[0][0] + shift)
    # ... up_blocks.1 its first (before the downsampler): that one is not the block output, left alone
    assert torch.equal(skips_steered[1][1], skips_plain[1][1])


def test_unet_update_edit_adds_to_the_block_output(sd15, unet_inputs):
    vector = torch.linspace(-1, 1, 64)
    for block in ("mid_block", "mid_block.attentions.0"):
        with ManualHooks(sd15, [block]) as plain:
            run(sd15, unet_inputs)
        with attach(sd15, {site(sd15, block, "update"): add(vector)}):
            with ManualHooks(sd15, [block]) as steered:
                run(sd15, unet_inputs)
        output_plain, output_steered = plain.outputs[block], steered.outputs[block]
        if block.endswith("attentions.0"):
            output_plain, output_steered = output_plain[0], output_steered[0]
        torch.testing.assert_close(output_steered, output_plain + vector.reshape(1, -1, 1, 1))


# ------------------------------------------------------------------------------- errors and clean-up


def test_unknown_site_lists_the_available_ones(flux):
    with pytest.raises(SiteError, match=r"unknown site double_blocks\.7:image for this flux model; "
                                        r"available sites: context:text, double_blocks\.0:image, "):
        with attach(flux, {Site("flux", "double_blocks.7", "image"): identity}):
            pass
    with pytest.raises(SiteError, match="is for a sd3 model, but this model is flux"):
        with attach(flux, {Site("sd3", "double_blocks.0", "image"): identity}):
            pass
    with pytest.raises(SiteError, match=r"unknown site transformer_blocks\.9:image .*single_blocks\.1:update"):
        resolve_site(flux, "transformer_blocks.9:image")
    assert_no_hooks(flux)


def test_unsupported_model_class_names_the_supported_ones():
    with pytest.raises(SiteError, match="unsupported model class Linear: supported are FluxTransformer2DModel, "
                                        ".*SD3Transformer2DModel, .*UNet2DConditionModel"):
        available_sites(torch.nn.Linear(2, 2))


def test_exceptions_still_remove_the_hooks(flux, flux_inputs):
    before = run(flux, flux_inputs)
    with pytest.raises(RuntimeError, match="boom"):
        with attach(flux, {s: identity for s in available_sites(flux)}):
            raise RuntimeError("boom")
    assert_no_hooks(flux)

    def broken(h, ctx):
        raise RuntimeError("site function failed")

    with pytest.raises(RuntimeError, match="site function failed"):
        with attach(flux, {site(flux, "single_blocks.1", "image"): broken}):
            run(flux, flux_inputs)
    assert_no_hooks(flux)
    assert torch.equal(run(flux, flux_inputs), before)


def test_a_wrongly_shaped_result_is_refused(flux, flux_inputs):
    with pytest.raises(SiteError, match=r"returned \(2, 12, 31\), expected \(2, 12, 32\)"):
        with attach(flux, {site(flux, "double_blocks.0", "image"): lambda h, ctx: h[..., :-1]}):
            run(flux, flux_inputs)
    assert_no_hooks(flux)


def test_site_functions_at_one_site_compose_in_order(flux, flux_inputs):
    vector = torch.linspace(-1, 1, D_FLUX)
    seen = Recorder()
    first = site(flux, "double_blocks.0", "image")
    second = Site("flux", "double_blocks.0", "image", timestep_window=(0.0, 0.5))  # windows: the function's job
    with ManualHooks(flux, ["transformer_blocks.0"]) as plain:
        run(flux, flux_inputs)
    with attach(flux, {first: add(vector), second: seen}):
        run(flux, flux_inputs)
    torch.testing.assert_close(seen.h[0], plain.outputs["transformer_blocks.0"][1] + vector)


# --------------------------------------------------------------------------------- context and timing


def test_direct_calls_know_only_what_the_call_says(flux, flux_inputs, sd15, unet_inputs):
    flux_seen, unet_seen = Recorder(), Recorder()
    with attach(flux, {site(flux, "double_blocks.0", "image"): flux_seen}):
        run(flux, flux_inputs)
    with attach(sd15, {site(sd15, "mid_block", "residual"): unet_seen}):
        run(sd15, unet_inputs)
    flux_ctx, unet_ctx = flux_seen.ctx[0], unet_seen.ctx[0]
    assert (flux_ctx.sigma, flux_ctx.progress, flux_ctx.cond, flux_ctx.timestep) == (0.75, None, None, 0.75)  # sigma
    assert (unet_ctx.sigma, unet_ctx.progress, unet_ctx.cond, unet_ctx.grid) == (None, None, None, (4, 4))


def test_a_plain_callable_can_provide_the_context(flux, flux_inputs):
    seen = Recorder()
    context = {"progress": 0.25, "cond": [False, True]}
    with attach(flux, {site(flux, "double_blocks.0", "text"): seen}, context=lambda: context):
        run(flux, flux_inputs)
    ctx = seen.ctx[0]
    assert (ctx.sigma, ctx.progress, ctx.cond.tolist(), ctx.grid) == (0.75, 0.25, [False, True], None)


def test_sampling_state_maps_unet_timesteps_onto_the_schedule(sd15, unet_inputs):
    scheduler = EulerDiscreteScheduler(steps_offset=1)
    scheduler.set_timesteps(4)
    state, seen = SamplingState(scheduler, guidance="batched"), Recorder()
    inputs = dict(unet_inputs, timestep=scheduler.timesteps[2])
    with attach(sd15, {site(sd15, "mid_block", "residual"): seen}, context=state):
        run(sd15, inputs)
    ctx = seen.ctx[0]
    assert ctx.sigma == pytest.approx(float(scheduler.sigmas[2]), rel=1e-5)
    assert ctx.progress == pytest.approx(2 / 3)
    assert ctx.cond.tolist() == [False, True]  # [uncond, cond] halves


def test_sampling_state_sequential_guidance_alternates_and_the_callback_advances(flux, flux_inputs):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    state, seen = SamplingState(scheduler, guidance="sequential"), Recorder()
    pipe = SimpleNamespace(num_timesteps=4)
    inputs = dict(flux_inputs, timestep=(scheduler.timesteps[1] / 1000).expand(B))
    with attach(flux, {site(flux, "single_blocks.0", "image"): seen}, context=state):
        run(flux, inputs)
        run(flux, inputs)
        assert state.on_step_end(pipe, 1, scheduler.timesteps[1], {"latents": 1}) == {"latents": 1}
        run(flux, inputs)
    assert [c.cond.tolist() for c in seen.ctx] == [[True, True], [False, False], [True, True]]
    assert all(c.progress == pytest.approx(1 / 3) for c in seen.ctx)
    assert seen.ctx[0].sigma == pytest.approx(float(scheduler.sigmas[1]), rel=1e-5)
    assert (state.step, state.num_steps) == (2, 4)
    state.on_step_end(pipe, 3, scheduler.timesteps[3], {})
    assert state.step == 0  # a finished run leaves the state ready for the next one


def test_sampling_state_refuses_guidance_that_contradicts_the_pipeline():
    with pytest.raises(ConfigError, match="use the pipeline's CFG layout"):
        SamplingState(guidance="none").on_step_end(SimpleNamespace(num_timesteps=2, do_classifier_free_guidance=True), 0, 0, {})
    with pytest.raises(ConfigError, match="use 'none'"):
        SamplingState(guidance="sequential").on_step_end(SimpleNamespace(num_timesteps=2, do_classifier_free_guidance=False), 0, 0, {})
    with pytest.raises(ConfigError, match="guidance must be one of"):
        SamplingState(guidance="cfg")
    with pytest.raises(ConfigError, match=r"expects cond and uncond halves, but the model got 3 rows"):
        SamplingState(guidance="batched").context_values(ModelCall(batch=3, timestep=None, sigma=None, grid=None))


def test_batched_guidance_marks_the_half_the_pipeline_gives_the_prompt():
    call = ModelCall(batch=4, timestep=None, sigma=0.5, grid=None)
    assert SamplingState(guidance="batched").context_values(call)["cond"].tolist() == [False, False, True, True]
    assert SamplingState(guidance="batched_cond_first").context_values(call)["cond"].tolist() == [True, True, False, False]


def test_a_progress_window_on_a_bare_model_call_raises_and_says_to_use_a_sigma_range(flux, flux_inputs):
    """A user's own loop gives no schedule: a progress window cannot be placed, and must not silently do nothing."""
    dictionary, plain = SparseAutoencoder(D_FLUX, 16, 2), run(flux, flux_inputs)
    windowed = steer_function(dictionary, [Steer((1,), (1.0,), window=(0.0, 0.5))])
    with pytest.raises(ScheduleError, match="use a sigma range"):
        with attach(flux, {site(flux, "double_blocks.0", "image"): windowed}):
            run(flux, flux_inputs)
    assert_no_hooks(flux)
    by_sigma = steer_function(dictionary, [Steer((1,), (1.0,), sigma_range=(0.0, 0.5))])  # the call is at sigma 0.75
    with attach(flux, {site(flux, "double_blocks.0", "image"): by_sigma}):
        assert torch.equal(run(flux, flux_inputs), plain)
    schedule = {"schedule": [1.0, 0.75, 0.5, 0.0]}  # with the sampler's schedule the window is placed: progress 0.5
    with attach(flux, {site(flux, "double_blocks.0", "image"): windowed}, context=lambda: schedule):
        assert not torch.equal(run(flux, flux_inputs), plain)


def test_span_takes_and_puts_back_each_rows_own_tokens():
    x = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1)
    span = Span(torch.tensor([1, 2]), torch.tensor([3, 2]))
    part = span.take(x)
    assert part[..., 0].tolist() == [[1, 2, 3], [8, 9, 0]]  # row 1 is one token shorter: padded with a zero
    back = span.put(x, part + 100)
    assert back[..., 0].tolist() == [[0, 101, 102, 103, 4, 5], [6, 7, 108, 109, 10, 11]]  # the pad is dropped
    assert torch.equal(Span(2, 3).put(x, Span(2, 3).take(x) + 0), x)


def test_stable_diffusion_pipeline_batches_uncond_then_cond(sd15):
    """A real StableDiffusionPipeline run (prompt embeddings given, no text encoder or VAE needed)."""
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=sd15,
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(4)
    positive, negative = torch.randn(1, TEXT, 32, generator=gen), torch.randn(1, TEXT, 32, generator=gen)
    state, seen, prompts = SamplingState(pipe.scheduler, guidance="batched"), Recorder(), []
    record_prompts = sd15.register_forward_pre_hook(
        lambda module, args, kwargs: prompts.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    try:
        with attach(sd15, {site(sd15, "up_blocks.1", "residual"): seen}, context=state):
            pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=3, guidance_scale=5.0,
                 height=64, width=64, output_type="latent", callback_on_step_end=state.on_step_end)
    finally:
        record_prompts.remove()
    assert_no_hooks(sd15)
    assert [c.progress for c in seen.ctx] == [0.0, 0.5, 1.0]
    for ctx, embeddings in zip(seen.ctx, prompts):
        assert torch.equal(embeddings[ctx.cond], positive) and torch.equal(embeddings[~ctx.cond], negative)
    assert [c.sigma for c in seen.ctx] == pytest.approx(pipe.scheduler.sigmas[:-1].tolist(), rel=1e-5)


def test_flux_pipeline_true_cfg_calls_cond_then_uncond(flux):
    """A real FluxPipeline run with true CFG: two transformer calls per step, the prompt's first."""
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=flux)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(5)
    positive, negative = torch.randn(1, TEXT, 32, generator=gen), torch.randn(1, TEXT, 32, generator=gen)
    state, seen, prompts = SamplingState(pipe.scheduler, guidance="sequential"), Recorder(), []
    record_prompts = flux.register_forward_pre_hook(
        lambda module, args, kwargs: prompts.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    try:
        with attach(flux, {site(flux, "single_blocks.1", "image"): seen}, context=state):
            pipe(prompt_embeds=positive, pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                 negative_prompt_embeds=negative, negative_pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                 true_cfg_scale=2.0, num_inference_steps=3, height=48, width=64, output_type="latent",
                 callback_on_step_end=state.on_step_end)
    finally:
        record_prompts.remove()
    assert_no_hooks(flux)
    assert [c.progress for c in seen.ctx] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert all(c.grid == (3, 4) for c in seen.ctx)  # 48x64 pixels -> 6x8 latent -> 3x4 packed tokens
    for ctx, embeddings in zip(seen.ctx, prompts):
        assert torch.equal(embeddings, positive if bool(ctx.cond.all()) else negative)
    assert [bool(c.cond.all()) for c in seen.ctx] == [True, False] * 3


def test_adapter_for_picks_the_family(flux, sd15, sdxl):
    assert [adapter_for(m).family(m) for m in (flux, sd15, sdxl)] == ["flux", "sd15", "sdxl"]
