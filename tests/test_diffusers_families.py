"""Every diffusion-transformer family diffusers has, through ``training.adapters``: tiny random-weight models
(two blocks of each kind, width 32, Z-Image 64) called directly, the way their pipelines call them.

What each family's blocks return is written down here once (``Family.blocks``), from reading diffusers
0.42.1: which item of a block's output is the image / text stream, and where in that tensor the site's
tokens start (joint sequences and padding). Every test checks the adapter against that table and against
plain torch hooks on the same modules. Token counts are chosen so a swapped stream, a wrong offset or a
transposed grid changes a shape or a value: 5 text tokens, a 3 x 4 token grid (2 frames for video), and a
non-square latent (HiDream pads it to ``max_seq`` tokens).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import comfyui_harness

comfyui_harness.apply_torchvision_workaround()  # diffusers -> transformers -> torchvision (see the harness)

import diffusers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sae_core.errors import SiteError  # noqa: E402
from sae_core.sites import block_sites  # noqa: E402
from training.adapters import attach, available_sites, catalogue, resolve_site  # noqa: E402

B, TEXT, ROWS, COLS, FRAMES = 2, 5, 3, 4, 2
Where = Optional[tuple[Optional[int], int]]
"""(position in the block's output tuple, None: the output is the tensor; first token of the stream)."""


@dataclass(frozen=True)
class Block:
    diffusers: str
    """diffusers' module list for this kind (the canonical, ComfyUI name is the key in ``Family.blocks``)."""
    image: Where
    text: Where
    text_tokens: int = TEXT


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator], dict]
    blocks: dict[str, Block]
    width: int = 32
    frames: int = 1


def ids(rows: int, cols: int, axes: int = 3) -> torch.Tensor:
    grid = torch.zeros(rows, cols, axes)
    grid[..., 1] += torch.arange(rows)[:, None]
    grid[..., 2] += torch.arange(cols)[None, :]
    return grid.reshape(-1, axes)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


HEADS = dict(num_attention_heads=2, attention_head_dim=16)
FLUX_LIKE = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, joint_attention_dim=32, **HEADS)
TEXT_IMAGE = (1, 0), (0, 0)
IMAGE_TEXT = (0, 0), (1, 0)


def flux_inputs(gen: torch.Generator, axes: int = 3, pooled: bool = True) -> dict:
    inputs = dict(hidden_states=randn(gen, B, ROWS * COLS, 16), encoder_hidden_states=randn(gen, B, TEXT, 32),
                  timestep=torch.full((B,), 0.75), img_ids=ids(ROWS, COLS, axes), txt_ids=torch.zeros(TEXT, axes))
    return dict(inputs, pooled_projections=randn(gen, B, 32)) if pooled else inputs


def latent(gen: torch.Generator, channels: int = 4) -> torch.Tensor:
    return randn(gen, B, channels, 2 * ROWS, 2 * COLS)  # patch size 2 -> ROWS x COLS tokens, not square


def video(gen: torch.Generator) -> torch.Tensor:
    return randn(gen, B, 4, FRAMES, 2 * ROWS, 2 * COLS)


FAMILIES = [
    Family("flux", lambda: diffusers.FluxTransformer2DModel(**FLUX_LIKE, pooled_projection_dim=32, guidance_embeds=False,
                                                             axes_dims_rope=[4, 6, 6]),
           flux_inputs, {"double_blocks": Block("transformer_blocks", *TEXT_IMAGE),
                         "single_blocks": Block("single_transformer_blocks", *TEXT_IMAGE)}),
    Family("flux2", lambda: diffusers.Flux2Transformer2DModel(**FLUX_LIKE, timestep_guidance_channels=32,
                                                               axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False),
           lambda gen: flux_inputs(gen, axes=4, pooled=False),
           {"double_blocks": Block("transformer_blocks", *TEXT_IMAGE),
            "single_blocks": Block("single_transformer_blocks", (None, TEXT), (None, 0))}),
    Family("chroma", lambda: diffusers.ChromaTransformer2DModel(**FLUX_LIKE, axes_dims_rope=(4, 6, 6),
                                                                 approximator_num_channels=16, approximator_hidden_dim=32,
                                                                 approximator_layers=1),
           lambda gen: flux_inputs(gen, pooled=False),
           {"double_blocks": Block("transformer_blocks", *TEXT_IMAGE),
            "single_blocks": Block("single_transformer_blocks", (None, TEXT), (None, 0))}),
    Family("sd3", lambda: diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                                           joint_attention_dim=32, caption_projection_dim=32,
                                                           pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
                                                           **HEADS),
           lambda gen: dict(hidden_states=latent(gen), encoder_hidden_states=randn(gen, B, TEXT, 32),
                            pooled_projections=randn(gen, B, 32), timestep=torch.full((B,), 750.0)),
           {"joint_blocks": Block("transformer_blocks", *TEXT_IMAGE)}),
    Family("qwen_image", lambda: diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4,
                                                                        num_layers=2, joint_attention_dim=32,
                                                                        axes_dims_rope=(4, 6, 6), **HEADS),
           lambda gen: dict(hidden_states=randn(gen, B, ROWS * COLS, 16), encoder_hidden_states=randn(gen, B, TEXT, 32),
                            encoder_hidden_states_mask=torch.ones(B, TEXT), timestep=torch.full((B,), 0.75),
                            img_shapes=[[(1, ROWS, COLS)]] * B),
           {"transformer_blocks": Block("transformer_blocks", *TEXT_IMAGE)}),
    Family("wan", lambda: diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=32,
                                                           freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
                                                           **HEADS),
           lambda gen: dict(hidden_states=video(gen), timestep=torch.full((B,), 750.0),
                            encoder_hidden_states=randn(gen, B, TEXT, 32)),
           {"blocks": Block("blocks", (None, 0), None)}, frames=FRAMES),
    Family("aura_flow", lambda: diffusers.AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4,
                                                                      num_mmdit_layers=2, num_single_dit_layers=2,
                                                                      joint_attention_dim=32, caption_projection_dim=32,
                                                                      out_channels=4, pos_embed_max_size=64, **HEADS),
           lambda gen: dict(hidden_states=latent(gen), encoder_hidden_states=randn(gen, B, TEXT, 32),
                            timestep=torch.full((B,), 0.75)),
           {"double_layers": Block("joint_transformer_blocks", *TEXT_IMAGE, text_tokens=TEXT + 8),  # 8 register tokens
            "single_layers": Block("single_transformer_blocks", (None, TEXT + 8), (None, 0), text_tokens=TEXT + 8)}),
    Family("hunyuan_video", lambda: diffusers.HunyuanVideoTransformer3DModel(
               in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2,
               patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
               guidance_embeds=False, **HEADS),
           lambda gen: dict(hidden_states=video(gen), timestep=torch.full((B,), 750.0),
                            encoder_hidden_states=randn(gen, B, TEXT, 32), encoder_attention_mask=torch.ones(B, TEXT),
                            pooled_projections=randn(gen, B, 32)),
           {"double_blocks": Block("transformer_blocks", *IMAGE_TEXT),
            "single_blocks": Block("single_transformer_blocks", *IMAGE_TEXT)}, frames=FRAMES),
    Family("ltxv", lambda: diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1,
                                                                 patch_size_t=1, cross_attention_dim=32, num_layers=2,
                                                                 caption_channels=32, **HEADS),
           lambda gen: dict(hidden_states=randn(gen, B, FRAMES * ROWS * COLS, 8), encoder_hidden_states=randn(gen, B, TEXT, 32),
                            timestep=torch.full((B,), 750.0), encoder_attention_mask=torch.ones(B, TEXT),
                            num_frames=FRAMES, height=ROWS, width=COLS),
           {"transformer_blocks": Block("transformer_blocks", (None, 0), None)}, frames=FRAMES),
    Family("lumina2", lambda: diffusers.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32,
                                                                   num_layers=2, num_refiner_layers=2, num_attention_heads=2,
                                                                   num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 6, 6),
                                                                   axes_lens=(64, 32, 32), cap_feat_dim=32),
           lambda gen: dict(hidden_states=latent(gen), timestep=torch.full((B,), 0.25),
                            encoder_hidden_states=randn(gen, B, TEXT, 32),
                            encoder_attention_mask=torch.ones(B, TEXT, dtype=torch.long)),
           {"noise_refiner": Block("noise_refiner", (None, 0), None), "context_refiner": Block("context_refiner", None, (None, 0)),
            "layers": Block("layers", (None, TEXT), (None, 0))}),
    Family("z_image", lambda: diffusers.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4,
                                                                  dim=64, n_layers=2, n_refiner_layers=2, n_heads=2,
                                                                  n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12],
                                                                  axes_lens=[64, 32, 32]),
           lambda gen: dict(x=list(randn(gen, B, 4, 1, 2 * ROWS, 2 * COLS).unbind(0)), t=torch.full((B,), 0.25),
                            cap_feats=list(randn(gen, B, TEXT, 32).unbind(0))),
           {"noise_refiner": Block("noise_refiner", (None, 0), None),  # image and text are padded to 32 tokens
            "context_refiner": Block("context_refiner", None, (None, 0), text_tokens=32),
            "layers": Block("layers", (None, 0), (None, 32), text_tokens=32)}, width=64),
    Family("hidream", lambda: diffusers.HiDreamImageTransformer2DModel(
               patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, caption_channels=[32, 16],
               text_emb_dim=32, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(4, 6, 6),
               max_resolution=(16, 16), llama_layers=[0, 1, 0, 1], **HEADS),
           lambda gen: dict(hidden_states=latent(gen), timesteps=torch.full((B,), 750.0),
                            encoder_hidden_states_t5=randn(gen, B, TEXT, 32),
                            encoder_hidden_states_llama3=randn(gen, 2, B, 3, 16), pooled_embeds=randn(gen, B, 32)),
           {"double_stream_blocks": Block("double_stream_blocks", (0, 0), (1, 0), text_tokens=TEXT + 2 * 3),
            # a non-square latent is padded to max_seq = 64 image tokens; the text (T5 + 2 Llama layers) follows
            "single_stream_blocks": Block("single_stream_blocks", (None, 0), (None, 64), text_tokens=TEXT + 2 * 3)}),
]
BY_NAME = {family.name: family for family in FAMILIES}


@pytest.fixture(scope="module")
def models():
    """Every family's tiny model and inputs, built once."""
    built = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        built[family.name] = (family.build().eval(), family.inputs(torch.Generator().manual_seed(1)))
    return built


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return torch.stack(out) if isinstance(out, list) else out


class Hooks:
    """Plain torch forward hooks recording modules' first input and their output; removed on exit."""

    def __init__(self, model, names):
        self.model, self.names, self.inputs, self.outputs, self.handles = model, names, {}, {}, []

    def __enter__(self):
        for name in self.names:
            self.handles.append(self.model.get_submodule(name).register_forward_hook(self._record(name), with_kwargs=True))
        return self

    def _record(self, name):
        def hook(module, args, kwargs, output):
            first = next(iter(kwargs.values())) if not args else args[0]
            self.inputs[name] = kwargs.get("hidden_states", first).detach().clone()
            self.outputs[name] = output

        return hook

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def assert_no_hooks(model):
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name or 'model'}"


def module_of(family, site):
    prefix, index = site.block.rsplit(".", 1)
    return f"{family.blocks[prefix].diffusers}.{index}"


def expected(family, site, hooks):
    """The site's tokens as the table says: the output item, from its first token, minus the input for "update"."""
    block = family.blocks[site.block.rsplit(".", 1)[0]]
    where = block.text if site.stream == "text" else block.image
    index, start = where
    count = block.text_tokens if site.stream == "text" else family.frames * ROWS * COLS
    name = module_of(family, site)
    output = hooks.outputs[name] if index is None else hooks.outputs[name][index]
    tokens = output[:, start:start + count]
    return tokens - hooks.inputs[name][:, start:start + count] if site.stream == "update" else tokens


def model_block_sites(model) -> list:
    """Every site but the conditioning one (``context:text``: the model's input, not a block's tensor)."""
    return block_sites(available_sites(model))


def record_all(model, inputs):
    seen = {site: [] for site in model_block_sites(model)}

    def recorder(site):
        def record(h, ctx):
            seen[site].append((h.detach().clone(), ctx))
            return h

        return record

    with attach(model, {site: recorder(site) for site in seen}):
        run(model, inputs)
    return seen


# ------------------------------------------------------------------------------------------- sites


@pytest.mark.parametrize("name", BY_NAME)
def test_the_catalogue_counts_every_block_kind_from_the_config(name, models):
    family, (model, _) = BY_NAME[name], models[name]
    sites = available_sites(model)
    for prefix, block in family.blocks.items():
        listed = {s.block for s in sites if s.block.startswith(prefix + ".")}
        assert listed == {f"{prefix}.{i}" for i in range(len(model.get_submodule(block.diffusers)))} and len(listed) == 2
    assert {s.extra["d"] for s in sites} == {family.width}
    assert {s.family for s in sites} == {"lumina2" if name == "z_image" else name}


@pytest.mark.parametrize("name", BY_NAME)
def test_every_site_fires_once_per_call_with_its_own_tokens(name, models):
    family, (model, inputs) = BY_NAME[name], models[name]
    with Hooks(model, sorted({module_of(family, s) for s in model_block_sites(model)})) as hooks:
        seen = record_all(model, inputs)
    for site, calls in seen.items():
        assert len(calls) == 1, site
        (h, ctx), = calls
        tokens = expected(family, site, hooks)
        assert h.shape == (B, tokens.shape[1], family.width), site
        assert torch.equal(h, tokens), site
        if site.stream == "text":
            assert ctx.grid is None and tokens.shape[1] == family.blocks[site.block.rsplit(".", 1)[0]].text_tokens
        else:
            assert (ctx.grid, ctx.frames, h.shape[1]) == ((ROWS, COLS), family.frames, family.frames * ROWS * COLS), site
        assert ctx.sigma == pytest.approx(0.75), site


@pytest.mark.parametrize("name", BY_NAME)
def test_identity_functions_are_bit_identical_to_no_hooks(name, models):
    model, inputs = models[name]
    before = run(model, inputs)
    with attach(model, {site: (lambda h, ctx: h) for site in available_sites(model)}):
        during = run(model, inputs)
    assert_no_hooks(model)
    assert torch.equal(before, during) and torch.equal(before, run(model, inputs))


@pytest.mark.parametrize("name", BY_NAME)
def test_an_add_edit_moves_exactly_that_sites_tokens(name, models):
    """One block of each kind, each stream: the block's output changes by the vector on the site's tokens only."""
    family, (model, inputs) = BY_NAME[name], models[name]
    vector = torch.linspace(-1, 1, family.width)
    for site in (s for s in available_sites(model) if s.block.endswith(".0")):
        block = family.blocks[site.block.rsplit(".", 1)[0]]
        index, start = block.text if site.stream == "text" else block.image
        count = block.text_tokens if site.stream == "text" else family.frames * ROWS * COLS
        name_ = module_of(family, site)
        with Hooks(model, [name_]) as plain:
            run(model, inputs)
        with attach(model, {site: lambda h, ctx: h + vector}), Hooks(model, [name_]) as steered:
            run(model, inputs)
        before, after = plain.outputs[name_], steered.outputs[name_]
        items = range(len(before)) if isinstance(before, tuple) else [None]
        for item in items:
            old, new = (before, after) if item is None else (before[item], after[item])
            if item != index:
                assert torch.equal(old, new), (site, item)  # the other stream is untouched
                continue
            shift = torch.zeros_like(old)
            shift[:, start:start + count] = vector
            torch.testing.assert_close(new, old + shift, msg=str(site))
            outside = torch.ones(old.shape[1], dtype=torch.bool)
            outside[start:start + count] = False
            assert torch.equal(new[:, outside], old[:, outside]), site


@pytest.mark.parametrize("name", BY_NAME)
def test_hooks_are_gone_after_the_block_even_when_a_site_function_raises(name, models):
    model, inputs = models[name]
    before = run(model, inputs)

    def broken(h, ctx):
        raise RuntimeError("site function failed")

    with pytest.raises(RuntimeError, match="site function failed"):
        with attach(model, {available_sites(model)[-1]: broken}):
            run(model, inputs)
    assert_no_hooks(model)
    assert torch.equal(run(model, inputs), before)


@pytest.mark.parametrize("name", BY_NAME)
def test_diffusers_and_comfyui_names_resolve_to_the_same_site(name, models):
    family, (model, _) = BY_NAME[name], models[name]
    for site in model_block_sites(model):
        assert resolve_site(model, f"{module_of(family, site)}:{site.stream}") == site
        assert resolve_site(model, site.name) == site
        assert catalogue(model).module(site, "diffusers") == module_of(family, site)


NO_CONTEXT = ("z_image", "hidream")
"""Families whose diffusers model takes its text otherwise than as ``encoder_hidden_states`` (lists of
captions; T5 and Llama tokens apart): they have no conditioning site here."""


@pytest.mark.parametrize("name", BY_NAME)
def test_the_context_site_is_the_text_the_model_is_called_with_and_an_edit_is_a_changed_prompt(name, models):
    model, inputs = models[name]
    if name in NO_CONTEXT:
        assert "context" not in {site.block for site in available_sites(model)}
        return
    site = resolve_site(model, "encoder_hidden_states:text")  # diffusers' name for it
    assert site.name == "context:text" and site.extra["d"] == inputs["encoder_hidden_states"].shape[-1]
    seen = []
    with attach(model, {site: lambda h, ctx: seen.append((h.clone(), ctx)) or h}):
        run(model, inputs)
    (h, ctx), = seen
    assert torch.equal(h, inputs["encoder_hidden_states"]) and ctx.grid is None
    with attach(model, {site: lambda h, ctx: h * 2}):
        doubled = run(model, inputs)
    assert_no_hooks(model)
    by_hand = run(model, {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"] * 2})
    assert torch.equal(doubled, by_hand) and not torch.equal(doubled, run(model, inputs))


# ------------------------------------------------------------------------------------ family details


def test_the_last_sd3_block_has_no_text_site(models):
    model, _ = models["sd3"]
    assert resolve_site(model, "joint_blocks.0:text").extra["d"] == 32
    with pytest.raises(SiteError, match=r"unknown site transformer_blocks\.1:text .* available sites: .*joint_blocks\.1:image"):
        resolve_site(model, "transformer_blocks.1:text")


def test_lumina2_rows_with_shorter_captions_get_their_own_image_tokens(models):
    """diffusers packs each row's caption (as its mask allows) right before its image tokens."""
    family, (model, inputs) = BY_NAME["lumina2"], models["lumina2"]
    inputs = dict(inputs, encoder_attention_mask=torch.tensor([[1] * TEXT, [1] * (TEXT - 2) + [0, 0]]))
    image, text = resolve_site(model, "layers.0:image"), resolve_site(model, "layers.0:text")
    with Hooks(model, ["layers.0"]) as plain:
        seen = record_all(model, inputs)
    joint = plain.outputs["layers.0"]
    (h,), (t,) = ([x for x, _ in seen[image]]), ([x for x, _ in seen[text]])
    assert torch.equal(h[0], joint[0, TEXT:TEXT + ROWS * COLS]) and torch.equal(h[1], joint[1, TEXT - 2:TEXT - 2 + ROWS * COLS])
    assert torch.equal(t[1, :TEXT - 2], joint[1, :TEXT - 2]) and not t[1, TEXT - 2:].any()  # the missing caption: zeros
    vector = torch.linspace(-1, 1, family.width)
    with attach(model, {image: lambda h, ctx: h + vector}), Hooks(model, ["layers.0"]) as steered:
        run(model, inputs)
    shift = torch.zeros_like(joint)
    shift[0, TEXT:TEXT + ROWS * COLS] = vector
    shift[1, TEXT - 2:TEXT - 2 + ROWS * COLS] = vector
    torch.testing.assert_close(steered.outputs["layers.0"], joint + shift)
    with attach(model, {text: lambda h, ctx: h + vector}), Hooks(model, ["layers.0"]) as steered:
        run(model, inputs)
    assert torch.equal(steered.outputs["layers.0"][1, TEXT - 2:], joint[1, TEXT - 2:])  # the padding's edit is dropped
