"""The model organism in ComfyUI (nodes/organism_nodes.py, organism/comfy.py): ComfyUI's own Flux and SD1.5 U-Net classes
with the organism's weights, the four organism nodes in graphs run by ComfyUI's executor, and our
Steer node on the result.

The organisms here are random-weight ones built with organism/models.py (``build_flux`` / ``build_unet``,
every parameter perturbed so that no weight keeps a symmetric default such as a norm scale of 1) and
saved with the organism pipelines' ``save_pretrained``: the committed weights are not needed.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from tiny_comfy_models import tiny_flux_patcher

REPO = Path(__file__).resolve().parents[1]
SITE = "double_blocks.1:image"
STEPS = 3
TOL = 1e-5
KEPT: dict = {}  # label -> the IMAGE that SAETestOrganismKeep saw


# ----------------------------------------------------------------------------- fixtures


def _plugin(comfy, name: str):
    """A module of our plugin as ComfyUI imported it (e.g. "nodes.organism_nodes")."""
    return importlib.import_module(f"{comfy.plugin_module().__name__}.{name}")


@pytest.fixture(scope="module")
def comfy(comfyui, tmp_path_factory):
    comfyui.load_plugin_nodes()
    import folder_paths
    import nodes

    nodes.NODE_CLASS_MAPPINGS["SAETestOrganismKeep"] = comfyui.image_keeper(KEPT)
    sae_dir = tmp_path_factory.mktemp("organism_sae")
    folder_paths.add_model_folder_path("sae", str(sae_dir), is_default=True)
    comfyui.organism_sae_dir = sae_dir
    return comfyui


def _perturb(module, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return module.eval()


@pytest.fixture(scope="module")
def organisms(comfy, tmp_path_factory):
    """family -> (the diffusers denoiser, the name of the folder in models/sae_organisms it was saved to)."""
    models = _plugin(comfy, "organism.models")
    pipelines = _plugin(comfy, "organism.pipelines")
    root = tmp_path_factory.mktemp("organisms")
    flux = _perturb(models.build_flux(seed=1), seed=11)
    unet = _perturb(models.build_unet(seed=2), seed=12)
    pipelines.OrganismFluxPipeline(flux, pipelines.flux_scheduler()).save_pretrained(root / "flux")
    pipelines.OrganismUNetPipeline(unet, pipelines.unet_scheduler()).save_pretrained(root / "unet")
    import folder_paths

    folder_paths.add_model_folder_path("sae_organisms", str(root), is_default=True)
    comfy.organism_root = root
    return {"flux": (flux, "flux"), "unet": (unet, "unet")}


@pytest.fixture(scope="module")
def loaded(comfy, organisms):
    """family -> the MODEL (ModelPatcher) that Load Model Organism returns for the saved folder."""
    import nodes

    load = nodes.NODE_CLASS_MAPPINGS["SAELoadModelOrganism"]
    return {family: load.execute(family, str(folder))[0] for family, (_, folder) in organisms.items()}


def _inputs(seed=0, batch=2):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 16, 384, generator=g),
            torch.randn(batch, 384, generator=g))


# ----------------------------------------------------------------------------- exact conversion


def test_flux_organism_is_comfyuis_own_flux_and_matches_diffusers_exactly(comfy, organisms, loaded):
    import torch
    from comfy.ldm.flux.model import Flux

    models = _plugin(comfy, "organism.models")
    transformer, _ = organisms["flux"]
    patcher = loaded["flux"]
    model = patcher.model
    assert type(model.diffusion_model) is Flux
    x, tokens, pooled = _inputs()
    sigma = torch.tensor([0.3, 0.85])
    with torch.no_grad():
        velocity = models.unpack(models.flux_velocity(transformer, models.pack(x), sigma, tokens, pooled))
        raw = model.diffusion_model(x, sigma, context=tokens, y=pooled)
        assert (raw - velocity).abs().max() < TOL  # the networks alone: timesteps = sigma on both sides

        # One sampler-facing call: latent format (scale 1, shift 0), sigma == t, denoised = x - sigma * v.
        x_in = model.process_latent_in(x)
        assert torch.equal(x_in, x)
        denoised = model.process_latent_out(model.apply_model(x_in, sigma, c_crossattn=tokens, y=pooled))
    assert (denoised - (x - sigma.view(-1, 1, 1, 1) * velocity)).abs().max() < TOL
    sampling = model.model_sampling
    t = torch.tensor([0.05, 0.37, 0.9])
    assert torch.allclose(sampling.sigma(t), t) and torch.equal(sampling.timestep(t), t)  # no shift
    assert sampling.percent_to_sigma(0.25) == pytest.approx(0.75)
    noise = torch.randn_like(x)
    noised = sampling.noise_scaling(sigma, noise, x)
    assert torch.allclose(noised, (1 - sigma.view(-1, 1, 1, 1)) * x + sigma.view(-1, 1, 1, 1) * noise)  # as trained


def test_unet_organism_is_comfyuis_sd15_unet_and_matches_diffusers_exactly(comfy, organisms, loaded):
    import torch
    from comfy.supported_models import SD15
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    pipelines = _plugin(comfy, "organism.pipelines")
    unet, _ = organisms["unet"]
    model = loaded["unet"].model
    assert type(model.diffusion_model) is UNetModel and isinstance(model.model_config, SD15)
    x, tokens, _ = _inputs(seed=1)
    steps = torch.tensor([300, 800])
    with torch.no_grad():
        eps = unet(x, steps.float(), encoder_hidden_states=tokens).sample
        raw = model.diffusion_model(x, steps.float(), context=tokens)
        assert (raw - eps).abs().max() < TOL

        # SD1.5's betas at zero terminal SNR: ComfyUI's sigmas are the diffusers scheduler's (both put the last,
        # infinite one at a finite stand-in: diffusers 4096, ComfyUI 4519), and apply_model is v-prediction.
        alphas = pipelines.unet_scheduler().alphas_cumprod
        comfy_alphas = 1 / (1 + model.model_sampling.sigmas.double() ** 2)
        assert torch.allclose(comfy_alphas[:-1], alphas.double()[:-1], rtol=1e-3, atol=0)  # float32 sigmas
        assert model.model_sampling.sigmas[-1] > 4000 and alphas[-1] < 1e-7
        sigma = model.model_sampling.sigmas[steps]
        assert torch.allclose(model.model_sampling.timestep(sigma).float(), steps.float())
        scaled = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
        v_scaled = unet(scaled, steps.float(), encoder_hidden_states=tokens).sample
        denoised = model.process_latent_out(model.apply_model(model.process_latent_in(x), sigma, c_crossattn=tokens))
    # v-prediction: denoised = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1); compare the v it implies.
    s = sigma.view(-1, 1, 1, 1)
    implied_v = (x / (s ** 2 + 1) - denoised) * (s ** 2 + 1) ** 0.5 / s
    assert (implied_v - v_scaled).abs().max() < TOL


@pytest.mark.parametrize("family", ["flux", "unet"])
def test_comfyui_sampling_on_the_diffusers_sigmas_reproduces_the_diffusers_pipeline(comfy, organisms, loaded, family):
    """Schedule, noise scaling, CFG and Euler steps agree: the same sigmas give the same latents."""
    import comfy.sample as comfy_sample  # "as": a plain `import comfy.x` would shadow the `comfy` fixture
    import comfy.samplers as comfy_samplers
    import nodes
    import torch

    pipelines = _plugin(comfy, "organism.pipelines")
    denoiser, _ = organisms[family]
    if family == "flux":
        pipe = pipelines.OrganismFluxPipeline(denoiser, pipelines.flux_scheduler())
    else:
        pipe = pipelines.OrganismUNetPipeline(denoiser, pipelines.unet_scheduler())
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas.float()
    # ComfyUI starts the U-Net at noise * sqrt(1 + sigma_max^2); diffusers' "trailing" Euler at noise * sigma_max.
    start = float((1 + sigmas[0] ** 2) ** 0.5 / sigmas[0]) if family == "unet" else 1.0
    expected = pipe("a handwritten seven", num_inference_steps=4, guidance_scale=3.0, latents=noise * start,
                    output_type="latent").images
    encode = nodes.NODE_CLASS_MAPPINGS["SAEOrganismTextEncode"]
    model = loaded[family]
    positive, negative = encode.execute(model, "a handwritten seven")[0], encode.execute(model, "")[0]
    with torch.no_grad():
        got = comfy_sample.sample_custom(model, noise, 3.0, comfy_samplers.sampler_object("euler"), sigmas, positive,
                                         negative, torch.zeros_like(noise), disable_pbar=True, seed=0)
    assert (got - expected).abs().max() < 1e-4


def test_diffusers_block_names_pair_with_comfyui_blocks_of_the_same_outputs(comfy, organisms, loaded):
    """The U-Net catalogue: each diffusers block's output equals its ComfyUI block's output."""
    import torch

    comfy_unet = _plugin(comfy, "nodes.adapters.comfy_unet")
    unet, _ = organisms["unet"]
    net = loaded["unet"].model.diffusion_model
    names = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2")
    pairs = {name: comfy_unet.UNetAdapter().resolve(loaded["unet"], f"{name}:residual").block for name in names}
    assert pairs["up_blocks.1"] == "output_blocks.3" and pairs["down_blocks.0"] == "input_blocks.2"
    seen_diffusers, seen_comfy, handles = {}, {}, []

    def keep(store, name):
        def hook(module, args, output):
            store[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    for diffusers_name, comfy_name in pairs.items():
        handles.append(unet.get_submodule(diffusers_name).register_forward_hook(keep(seen_diffusers, diffusers_name)))
        # ComfyUI iterates a block's layers (never calls the block), so its output is its last layer's.
        handles.append(net.get_submodule(comfy_name)[-1].register_forward_hook(keep(seen_comfy, comfy_name)))
    x, tokens, _ = _inputs(seed=2, batch=1)
    try:
        with torch.no_grad():
            unet(x, torch.tensor([500.0]), encoder_hidden_states=tokens)
            net(x, torch.tensor([500.0]), context=tokens)
    finally:
        for handle in handles:
            handle.remove()
    shapes = {}
    for diffusers_name, comfy_name in pairs.items():
        ours, theirs = seen_comfy[comfy_name], seen_diffusers[diffusers_name]
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < TOL, (diffusers_name, comfy_name)
        shapes[diffusers_name] = tuple(ours.shape[1:])
    assert shapes == {"down_blocks.0": (32, 8, 8), "down_blocks.1": (64, 4, 4), "down_blocks.2": (64, 4, 4),
                      "mid_block": (64, 4, 4), "up_blocks.0": (64, 8, 8), "up_blocks.1": (64, 16, 16),
                      "up_blocks.2": (32, 16, 16)}
    # ... and our ComfyUI adapter offers each of those blocks as a site of that width.
    common = _plugin(comfy, "nodes.common")
    for diffusers_name, comfy_name in pairs.items():
        _, site, width = common.resolve_site(loaded["unet"], f"{diffusers_name}:residual")
        assert site.block == comfy_name and width == shapes[diffusers_name][0]


# ----------------------------------------------------------------------------- nodes


def test_text_encode_gives_comfyui_conditioning_from_the_organism_encoder(comfy, loaded):
    import nodes
    import torch

    text = _plugin(comfy, "organism.text")
    encode = nodes.NODE_CLASS_MAPPINGS["SAEOrganismTextEncode"]
    (conditioning,) = encode.execute(loaded["flux"], "a handwritten seven").result
    [[tokens, extra]] = conditioning
    expected = text.shared_encoder()(["a handwritten seven"])
    assert tokens.shape == (1, 16, 384) and extra["pooled_output"].shape == (1, 384)
    assert torch.equal(tokens, expected.tokens) and torch.equal(extra["pooled_output"], expected.pooled)
    with pytest.raises(ValueError, match="needs the MODEL from Load Model Organism") as refused:
        encode.execute(tiny_flux_patcher(), "a cat")  # a Flux, but not an organism
    assert type(refused.value).__name__ == "InputError"


def organism_graph(family: str, folder, label: str, steer: float | None = None, dictionary: str = "") -> dict:
    model = ["1", 0]
    graph = {
        "1": {"class_type": "SAELoadModelOrganism", "inputs": {"family": family, "folder": str(folder)}},
        "2": {"class_type": "SAEOrganismTextEncode", "inputs": {"model": ["1", 0], "prompt": "a handwritten seven"}},
        "3": {"class_type": "SAEOrganismTextEncode", "inputs": {"model": ["1", 0], "prompt": ""}},
        "4": {"class_type": "SAEEmptyOrganismLatent", "inputs": {"batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 7, "steps": STEPS, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SAEOrganismDecode", "inputs": {"samples": ["5", 0], "upscale": 4}},
        "7": {"class_type": "SAETestOrganismKeep", "inputs": {"images": ["6", 0], "label": label}},
    }
    if steer is not None:
        graph["10"] = {"class_type": "SAELoadDictionary", "inputs": {"dictionary": dictionary, "hub_id": ""}}
        graph["11"] = {"class_type": "SAESteer", "inputs": {
            "model": ["1", 0], "dictionary": ["10", 0], "site": SITE, "mode": "add", "features": "0, 3",
            "strength": steer, "units": "token_norm", "window_start": 0.0, "window_end": 1.0, "cond_only": True}}
        graph["5"]["inputs"]["model"] = ["11", 0]
    return graph


@pytest.mark.parametrize("family", ["flux", "unet"])
def test_graph_samples_a_picture_through_comfyuis_executor(comfy, organisms, family):
    comfy.execute_graph(organism_graph(family, organisms[family][1], label=family))
    image = KEPT[family]
    assert image.shape == (1, 128, 128, 3)
    assert image.min() >= 0 and image.max() <= 1 and image.std() > 1e-3
    assert (image[..., 0] == image[..., 2]).all()  # gray, as the organism's pictures are
    assert (image[:, ::4, ::4] == image[:, 3::4, 3::4]).all()  # nearest x4 of a 32x32 picture


@pytest.fixture(scope="module")
def flux_dictionary(comfy):
    """A small TopK dictionary of width 128 (the Flux organism's hidden size) in models/sae."""
    import torch

    core = _plugin(comfy, "sae_core")
    acts = torch.randn(512, 128, generator=torch.Generator().manual_seed(0))
    config = core.TrainConfig(core.DictionaryConfig(kind="topk", k=4, n_latents=256), total_steps=5, batch_size=128,
                              warmup_steps=1)
    core.save_dictionary(core.train_dictionary(acts, config).dictionary, comfy.organism_sae_dir / "organism128.safetensors")
    return "organism128.safetensors"


def test_steer_node_works_on_the_flux_organism(comfy, organisms, flux_dictionary):
    import torch

    folder = organisms["flux"][1]
    comfy.execute_graph(organism_graph("flux", folder, label="plain"))
    comfy.execute_graph(organism_graph("flux", folder, label="zero", steer=0.0, dictionary=flux_dictionary))
    comfy.execute_graph(organism_graph("flux", folder, label="steered", steer=3.0, dictionary=flux_dictionary))
    assert torch.equal(KEPT["zero"], KEPT["plain"])
    assert not torch.equal(KEPT["steered"], KEPT["plain"])


def test_example_workflow_runs_on_a_saved_organism(comfy, organisms, flux_dictionary):
    prompt = json.loads((REPO / "example_workflows" / "api" / "organism_flux_steer.json").read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "SAELoadModelOrganism":
            inputs["folder"] = str(organisms["flux"][1])
        elif node["class_type"] == "SAELoadDictionary":
            inputs["dictionary"] = flux_dictionary
        elif node["class_type"] == "KSampler":
            inputs["steps"] = STEPS
        elif node["class_type"] == "SaveImage":
            node.update(class_type="SAETestOrganismKeep", inputs={"images": inputs["images"], "label": "example"})
    comfy.execute_graph(prompt)
    assert KEPT["example"].shape[1:] == (128, 128, 3)


# ----------------------------------------------------------------------------- errors


def test_a_bad_folder_is_a_clear_node_error(comfy, organisms, tmp_path):
    graph = organism_graph("flux", "nowhere", label="never")
    with pytest.raises(comfy.GraphError) as raised:
        comfy.execute_graph(graph)
    message = str(raised.value)
    assert "SAELoadModelOrganism" in message and "no organism folder 'nowhere' in models/sae_organisms" in message


@pytest.mark.parametrize("path", ["/etc", "~", "../organism_sae", "flux/../..", "C:\\organisms"])
def test_the_organism_folder_is_a_name_in_models_sae_organisms_never_a_path(comfy, organisms, path):
    with pytest.raises(comfy.GraphError, match="not a path|no organism folder") as raised:
        comfy.execute_graph(organism_graph("flux", path, label="never"))
    assert str(comfy.organism_root) not in str(raised.value)

    import nodes

    load = nodes.NODE_CLASS_MAPPINGS["SAELoadModelOrganism"]
    with pytest.raises(ValueError, match=r"models/sae_organisms/flux lacks unet/config.json and "
                                         r"unet/diffusion_pytorch_model.safetensors") as raised:
        load.execute("unet", str(organisms["flux"][1]))  # a Flux organism is not a U-Net one
    assert str(comfy.organism_root) not in str(raised.value)


def test_missing_or_unexpected_weights_are_named(comfy, organisms, tmp_path):
    import shutil

    import nodes
    from safetensors.torch import load_file, save_file

    folder = comfy.organism_root / "flux_damaged"
    shutil.copytree(comfy.organism_root / organisms["flux"][1], folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["transformer_blocks.1.attn.to_k.weight"], state["proj_out.bias"]
    state["extra.weight"] = state["x_embedder.weight"].clone()
    save_file(state, str(weights))
    with pytest.raises(ValueError) as raised:
        nodes.NODE_CLASS_MAPPINGS["SAELoadModelOrganism"].execute("flux", folder.name)
    message = str(raised.value)
    assert "unexpected keys (1): extra.weight" in message
    assert "final_layer.linear.bias" in message  # missing, in ComfyUI's name
    assert "double_blocks.1.img_attn.qkv.weight" in message  # the qkv concatenation has a gap


# ----------------------------------------------------------------------------- feature index


def index_graph(folder, dictionary: str, prompts: str, top_m: int = 4) -> dict:
    """Load Model Organism's MODEL, CLIP and VAE -> Build Feature Index over ``prompts``, two images each."""
    return {
        "1": {"class_type": "SAELoadModelOrganism", "inputs": {"family": "flux", "folder": str(folder)}},
        "2": {"class_type": "SAEEmptyOrganismLatent", "inputs": {"batch_size": 2}},
        "3": {"class_type": "SAEBuildFeatureIndex", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "latent": ["2", 0], "dictionary": dictionary,
            "prompts": prompts, "negative": "", "site": "double_blocks.1:image", "seed": 0, "steps": STEPS,
            "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "at": 0.5, "top_m": top_m,
            "overwrite": False}},
    }


def test_build_feature_index_writes_a_browsable_labelled_index_beside_the_dictionary(comfy, organisms,
                                                                                      flux_dictionary):
    feature_index = _plugin(comfy, "sae_core.feature_index")
    prompts = "a handwritten seven\na handwritten two\na white cat on black"
    outputs = comfy.execute_graph(index_graph(organisms["flux"][1], flux_dictionary, prompts))["outputs"]
    folder = comfy.organism_sae_dir / "organism128.features"
    index = feature_index.open_index(folder)
    assert index.n_latents == 256 and index.header["counts"]["images"] == 6 and index.top_m == 4
    assert "6 images (3 prompts x 2)" in outputs["3"]["text"][0] and outputs["3"]["images"]
    fired = index.page(limit=5)["features"]
    assert fired[0]["frequency"] > 0 and fired[0]["thumbnail"]
    assert any(row["label"] for row in fired)  # every fired feature gets its prompt-word label
    prompts_seen = {entry["prompt"] for row in fired for entry in index.feature(row["id"])["top"]}
    assert prompts_seen <= set(prompts.splitlines())
    # the same settings again: the finished index is reused, nothing regenerated or rewritten
    before = {p: p.stat().st_mtime_ns for p in (folder / "features").iterdir()}
    comfy.execute_graph(index_graph(organisms["flux"][1], flux_dictionary, prompts))
    assert {p: p.stat().st_mtime_ns for p in (folder / "features").iterdir()} == before


def test_build_feature_index_refuses_to_replace_an_index_built_otherwise_unless_asked(comfy, organisms,
                                                                                      flux_dictionary):
    graph = index_graph(organisms["flux"][1], flux_dictionary, "a handwritten seven\na handwritten two\na white cat on black",
                        top_m=3)
    with pytest.raises(comfy.GraphError, match="other settings"):
        comfy.execute_graph(graph)
    graph["3"]["inputs"]["overwrite"] = True
    comfy.execute_graph(graph)
    assert _plugin(comfy, "sae_core.feature_index").open_index(comfy.organism_sae_dir / "organism128.features").top_m == 3


def test_the_organism_clip_and_vae_work_with_comfyuis_own_nodes(comfy, organisms):
    import torch

    graph = {
        "1": {"class_type": "SAELoadModelOrganism", "inputs": {"family": "flux", "folder": str(organisms["flux"][1])}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a handwritten seven"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "SAEEmptyOrganismLatent", "inputs": {"batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": STEPS, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SAETestOrganismKeep", "inputs": {"images": ["6", 0], "label": "stock_nodes"}},
        "8": {"class_type": "SAEOrganismTextEncode", "inputs": {"model": ["1", 0], "prompt": "a handwritten seven"}},
        "9": {"class_type": "SAEOrganismTextEncode", "inputs": {"model": ["1", 0], "prompt": ""}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["8", 0], "negative": ["9", 0],
                                                    "latent_image": ["4", 0], "seed": 0, "steps": STEPS, "cfg": 4.0,
                                                    "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "11": {"class_type": "SAEOrganismDecode", "inputs": {"samples": ["10", 0], "upscale": 1}},
        "12": {"class_type": "SAETestOrganismKeep", "inputs": {"images": ["11", 0], "label": "organism_nodes"}},
    }
    comfy.execute_graph(graph)
    assert KEPT["stock_nodes"].shape == (1, 32, 32, 3)
    assert torch.equal(KEPT["stock_nodes"], KEPT["organism_nodes"])  # same conditioning, same decoder


ORGANISM_EXAMPLES = sorted((REPO / "example_workflows" / "api").glob("organism_*.json"))


@pytest.mark.parametrize("path", ORGANISM_EXAMPLES, ids=lambda p: p.stem)
def test_every_organism_example_runs_as_shipped_on_a_clean_install(comfy, path):
    """The committed organism and the plugin's own dictionaries: nothing to download or to put in place (fewer
    sampling and training steps, to keep the suite short)."""
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        if node["class_type"] in ("KSampler", "SAESteerSweep"):
            node["inputs"]["steps"] = STEPS
        elif node["class_type"] == "SAETrainDictionary":
            node["inputs"].update(steps=20, name=f"example_{path.stem}")
    outputs = comfy.execute_graph(prompt)["outputs"]
    assert any(output.get("images") for output in outputs.values()), outputs.keys()
