"""Capture Activations from Images in real ComfyUI graphs: tiny SD1.5 U-Net + a tiny real VAE (TAESD).

The VAE is ComfyUI's own ``comfy.sd.VAE`` built from a TAESD state dict with seeded random weights
(TAESD is the smallest VAE ComfyUI constructs from a state dict alone): 64x64 images -> 8x8 latents.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tiny_comfy_models import model_node, tiny_sd15_patcher

from test_nodes_graph import _sae_core, comfy, shard_rows  # noqa: F401  (comfy: the module fixture with our plugin)

SITE = "middle_block:residual"  # tiny U-Net: 64 channels at 4x4
SITE_WIDTH, SITE_TOKENS = 64, 16
N_IMAGES = 3
SIGMA = 0.155


SAETestTinySD15 = model_node("SAETestTinySD15", tiny_sd15_patcher)


def tiny_vae(seed: int = 0, latent_channels: int = 4):
    import comfy.sd
    import comfy.taesd.taesd
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in comfy.taesd.taesd.TAESD(latent_channels=latent_channels).state_dict().items():
        if key == "vae_scale":
            sd[key] = torch.ones_like(value)
        elif key == "vae_shift":
            sd[key] = torch.zeros_like(value)
        elif value.is_floating_point():
            sd[key] = torch.randn(value.shape, generator=g) * 0.05
        else:
            sd[key] = value
    return comfy.sd.VAE(sd=sd)


class SAETestTinyVAE:
    _cache: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, seed):
        if seed not in self._cache:
            self._cache[seed] = tiny_vae(seed)
        return (self._cache[seed],)


class SAETestImagesAndEmptyPrompt:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"batch": ("INT", {"default": N_IMAGES, "min": 1, "max": 8})}}

    RETURN_TYPES = ("IMAGE", "CONDITIONING")
    FUNCTION = "make"
    CATEGORY = "_for_testing"

    def make(self, batch):
        import torch

        from tiny_comfy_models import SD15_TEXT_WIDTH

        g = torch.Generator().manual_seed(7)
        images = torch.rand(batch, 64, 64, 4, generator=g)  # an alpha channel, dropped by the node
        return (images, [[torch.randn(1, 8, SD15_TEXT_WIDTH, generator=g), {}]])


TEST_NODES = {cls.__name__: cls for cls in (SAETestTinySD15, SAETestTinyVAE, SAETestImagesAndEmptyPrompt)}


@pytest.fixture(scope="module")
def image_comfy(comfy):  # noqa: F811
    import nodes

    nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
    return comfy


def capture_graph(folder: str, pool: str = "mean", seed: int = 0, site: str = SITE) -> dict:
    return {
        "1": {"class_type": "SAETestTinySD15", "inputs": {"seed": 0}},
        "2": {"class_type": "SAETestTinyVAE", "inputs": {"seed": 0}},
        "3": {"class_type": "SAETestImagesAndEmptyPrompt", "inputs": {"batch": N_IMAGES}},
        "4": {"class_type": "SAECaptureFromImages", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "images": ["3", 0], "positive": ["3", 1], "site": site,
            "sigma": SIGMA, "pool": pool, "folder": folder, "seed": seed}},
    }


def run_capture(image_comfy, name: str, **kw) -> tuple[dict, Path]:
    import folder_paths

    history = image_comfy.execute_graph(capture_graph(f"sae_activations/{name}", **kw))
    folder = Path(folder_paths.get_output_directory()) / "sae_activations" / name
    return history, folder


def test_pooled_capture_writes_one_vector_per_image_with_provenance(image_comfy):
    history, folder = run_capture(image_comfy, "img_pooled")
    reader = _sae_core(image_comfy).ShardReader(folder, batch_size=1, shuffle=False)
    assert reader.n_tokens == N_IMAGES and reader.d == SITE_WIDTH
    assert reader.site.block == "middle_block" and reader.site.stream == "residual"
    rows = shard_rows(folder)
    assert rows["sample_id"].tolist() == list(range(N_IMAGES))
    assert rows["token"].tolist() == [-1] * N_IMAGES
    assert rows["timestep"].float().allclose(rows["timestep"].new_full((N_IMAGES,), SIGMA).float())
    assert rows["activations"].float().abs().sum() > 0
    assert "3 image(s)" in history["outputs"]["4"]["text"][0]


def test_unpooled_capture_writes_every_token_of_every_image(image_comfy):
    _, folder = run_capture(image_comfy, "img_tokens", pool="none")
    rows = shard_rows(folder)
    assert rows["activations"].shape == (N_IMAGES * SITE_TOKENS, SITE_WIDTH)
    assert rows["sample_id"].tolist() == [i for i in range(N_IMAGES) for _ in range(SITE_TOKENS)]
    assert rows["token"].tolist() == list(range(SITE_TOKENS)) * N_IMAGES
    # pooling the tokens gives the pooled capture's vectors
    _, pooled_folder = run_capture(image_comfy, "img_pooled_again")
    pooled = shard_rows(pooled_folder)["activations"].float()
    tokens = rows["activations"].float().reshape(N_IMAGES, SITE_TOKENS, SITE_WIDTH).mean(1)
    assert tokens.allclose(pooled, atol=1e-5)


def test_same_seed_same_vectors_other_seed_other_vectors(image_comfy):
    _, a = run_capture(image_comfy, "img_seed_a", seed=5)
    _, b = run_capture(image_comfy, "img_seed_b", seed=5)
    _, c = run_capture(image_comfy, "img_seed_c", seed=6)
    va, vb, vc = (shard_rows(f)["activations"] for f in (a, b, c))
    assert va.equal(vb)
    assert not va.equal(vc)


def test_the_model_given_is_not_modified(image_comfy):
    import torch

    from tiny_comfy_models import random_conditioning, random_latent, sample

    model = SAETestTinySD15().load(0)[0]  # the instance the graph used (built once per seed)
    positive, negative = random_conditioning(model, seed=1)
    before = sample(model, seed=3, positive=positive, negative=negative, latent=random_latent(seed=2), cfg=2.0)
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS["SAECaptureFromImages"]
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        node.execute(model, tiny_vae(0), images, SITE, SIGMA, "mean", "sae_activations/img_untouched", 0,
                     positive=positive)
    after = sample(model, seed=3, positive=positive, negative=negative, latent=random_latent(seed=2), cfg=2.0)
    assert hashlib.sha256(before.numpy().tobytes()).digest() == hashlib.sha256(after.numpy().tobytes()).digest()
    assert not model.object_patches and "patches" not in model.model_options.get("transformer_options", {})


def test_unknown_site_and_bad_folder_are_node_errors_named_by_kind(image_comfy):
    with pytest.raises(image_comfy.GraphError) as raised:
        image_comfy.execute_graph(capture_graph("sae_activations/img_bad_site", site="middle_block:nope"))
    failure = raised.value.details
    assert failure["exception_type"].endswith(".SiteError")
    assert "unknown site middle_block:nope" in failure["exception_message"] and SITE in failure["exception_message"]
    with pytest.raises(image_comfy.GraphError) as raised:
        image_comfy.execute_graph(capture_graph("../outside"))
    failure = raised.value.details
    assert failure["exception_type"].endswith(".InputError")
    assert "inside ComfyUI's output folder" in failure["exception_message"]


def _capture_error(images=None, vae=None, **inputs) -> str:
    """The node's error for a capture of the tiny U-Net with these images / VAE / inputs, called as ComfyUI does."""
    import nodes
    import torch

    from tiny_comfy_models import random_conditioning

    model = SAETestTinySD15().load(0)[0]
    positive, _ = random_conditioning(model, seed=1)
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1)) if images is None else images
    arguments = {"site": SITE, "sigma": SIGMA, "pool": "mean", "folder": "sae_activations/img_refused", "seed": 0,
                 "positive": positive, **inputs}
    node = nodes.NODE_CLASS_MAPPINGS["SAECaptureFromImages"]
    with pytest.raises(ValueError) as raised, torch.inference_mode():
        node.execute(model, tiny_vae(0) if vae is None else vae, images, **arguments)
    assert type(raised.value).__name__ == "InputError"
    return str(raised.value)


def test_a_vae_whose_latents_the_model_cannot_take_is_refused_naming_both_channel_counts(image_comfy):
    message = _capture_error(vae=tiny_vae(0, latent_channels=16))
    assert "the VAE makes 16-channel latents but the model takes 4 channels" in message


def test_images_that_are_not_a_comfyui_image_batch_are_refused_naming_the_input(image_comfy):
    import torch

    assert "images shaped (2, 3, 64, 64) are not ComfyUI images" in _capture_error(torch.rand(2, 3, 64, 64))
    assert "images of dtype torch.uint8" in _capture_error(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    assert "images hold NaN" in _capture_error(torch.full((2, 64, 64, 3), float("nan")))
    assert "smaller than one latent" in _capture_error(torch.rand(2, 4, 4, 3))


def test_conditioning_encoded_for_another_model_is_refused_naming_both_widths(image_comfy):
    import torch

    foreign = [[torch.zeros(1, 8, 48), {}]]
    assert "positive has 48-wide text tokens but the model takes 64" in _capture_error(positive=foreign)


def test_the_shards_folder_output_is_the_folder_inside_output_that_train_dictionary_takes(image_comfy):
    import nodes
    import torch

    node = nodes.NODE_CLASS_MAPPINGS["SAECaptureFromImages"]
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        summary, folder = node.execute(SAETestTinySD15().load(0)[0], tiny_vae(0), images, SITE, SIGMA, "mean",
                                       "sae_activations/img_for_train", 0).result
    assert folder == "sae_activations/img_for_train"
    assert "into output/sae_activations/img_for_train" in summary
