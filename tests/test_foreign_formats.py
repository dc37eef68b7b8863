"""SAELens, sparsify, SDLens and seed-A ITDA folders compute their published formulas;
SAELens export folds our normalisation so that SAELens computes the same function.

Each fixture writes random weights with the other library's own file and tensor
names; each reference below is that library's formula, written out here."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_core.errors import DictionaryError
from sae_core.foreign import export_saelens, load_saelens
from sae_core.itda import ITDA
from sae_core.loading import load_dictionary
from sae_core.normalize import Standardizer
from sae_core.sae import SparseAutoencoder
from sae_core.sites import Site

D, N, K = 12, 40, 5
g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


def topk_relu(pre, k):
    """relu(topk(pre)) as a dense matrix (equal to topk(relu(pre)))."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def assert_same_function(dictionary, encode_ref, decode_ref, x):
    torch.testing.assert_close(dictionary.dense_codes(x), encode_ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dictionary.decode(dictionary.encode(x)), decode_ref(encode_ref(x)), atol=1e-5, rtol=1e-5)


def write_json(path, data):
    path.write_text(json.dumps(data))


# --- SAELens ---------------------------------------------------------------------------------


def saelens_reference(t, cfg):
    """SAELens' encode/decode for the architectures and options we read."""
    architecture = cfg.get("architecture", "standard")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    norms = t["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else torch.ones(t["W_dec"].shape[0])

    def encode(x):
        pre = (x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ t["W_enc"] + t["b_enc"]
        pre = pre * norms
        if architecture == "topk" or cfg.get("activation_fn_str") == "topk":
            return topk_relu(pre, k)
        if architecture in ("jumprelu", "batchtopk"):
            threshold = t["threshold"] if architecture == "jumprelu" else t["topk_threshold"]
            return pre.relu() * (pre > threshold)
        return pre.relu()

    def decode(f):
        if cfg.get("finetuning_scaling_factor"):
            f = f * t["finetuning_scaling_factor"]
        return (f / norms) @ t["W_dec"] + t["b_dec"]

    return encode, decode


def write_saelens(folder, architecture="topk", **cfg_extra):
    t = {"W_enc": rnd(D, N), "b_enc": rnd(N), "W_dec": rnd(N, D), "b_dec": rnd(D)}
    if architecture == "jumprelu":
        t["threshold"] = rnd(N).abs()
    if architecture == "batchtopk":
        t["topk_threshold"] = torch.tensor(0.7)
    if cfg_extra.get("finetuning_scaling_factor"):
        t["finetuning_scaling_factor"] = rnd(N).abs() + 0.5
    cfg = {"architecture": architecture, "d_in": D, "d_sae": N, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "dtype": "float32", "device": "cpu",
           "metadata": {"model_name": "flux", "hook_name": "transformer_blocks.3"}, **cfg_extra}
    if architecture in ("topk", "batchtopk") and "activation_fn_kwargs" not in cfg:
        cfg["k"] = K
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "sae_weights.safetensors"))
    write_json(folder / "cfg.json", cfg)
    return t, cfg


@pytest.mark.parametrize("architecture, options", [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {}),
    ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
    ("batchtopk", {"rescale_acts_by_decoder_norm": True}),
    ("standard", {"finetuning_scaling_factor": True}),
])
def test_saelens_folder_computes_the_saelens_formula(tmp_path, architecture, options):
    t, cfg = write_saelens(tmp_path, architecture, **options)
    sae = load_dictionary(tmp_path)
    assert sae.site.extra == {"source": "saelens", "model_name": "flux", "hook_name": "transformer_blocks.3"}
    assert_same_function(sae, *saelens_reference(t, cfg), rnd(9, D))


def test_saelens_5x_config_with_topk_activation_and_top_level_names(tmp_path):
    t, cfg = write_saelens(tmp_path, "standard", activation_fn_str="topk", activation_fn_kwargs={"k": K},
                           model_name="sdxl", hook_name="unet.mid_block", metadata=None)
    del cfg["apply_b_dec_to_input"]  # absent: SAELens' default, True
    write_json(tmp_path / "cfg.json", cfg)
    sae = load_dictionary(tmp_path)
    assert sae.kind == "topk" and sae.k == K and sae.site.extra["hook_name"] == "unet.mid_block"
    assert_same_function(sae, *saelens_reference(t, cfg), rnd(9, D))


@pytest.mark.parametrize("cfg, message", [
    ({"architecture": "gated"}, "architecture 'gated' is unsupported: a gated SAE has a separate gate"),
    ({"architecture": "matryoshka_xyz"}, "architecture 'matryoshka_xyz' is unsupported"),
    ({"normalize_activations": "expected_average_only_in"},
     "normalize_activations='expected_average_only_in' is unsupported \\(its scaling factor is a dataset statistic"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm' is unsupported"),
    ({"activation_fn_str": "tanh-relu"}, "activation_fn 'tanh-relu' is unsupported"),
    ({"architecture": "topk", "k": None}, "a topk SAE needs 'k'"),
    ({"architecture": "topk", "k": 999}, "k=999 must be between 1 and the 40 latents"),
])
def test_saelens_unsupported_options_are_named(tmp_path, cfg, message):
    write_saelens(tmp_path, "standard")
    write_json(tmp_path / "cfg.json", {"architecture": "standard", **cfg})
    with pytest.raises(DictionaryError, match=message):
        load_dictionary(tmp_path)


def test_saelens_missing_threshold_and_nan_weights_are_named(tmp_path):
    t, cfg = write_saelens(tmp_path, "jumprelu")
    del t["threshold"]
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(DictionaryError, match="has no tensor 'threshold' \\(found: W_dec, W_enc, b_dec, b_enc\\)"):
        load_dictionary(tmp_path)
    t["threshold"] = rnd(N).abs()
    t["W_dec"][3, 1] = float("nan")
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(DictionaryError, match="tensor 'W_dec' contains NaN"):
        load_dictionary(tmp_path)


# --- sparsify --------------------------------------------------------------------------------


def write_sparsify(folder, **cfg_overrides):
    t = {"encoder.weight": rnd(N, D), "encoder.bias": rnd(N), "W_dec": rnd(N, D), "b_dec": rnd(D)}
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": 0, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **cfg_overrides}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "sae.safetensors"))
    write_json(folder / "cfg.json", cfg)
    return t


def test_sparsify_folder_computes_topk_of_relu(tmp_path):
    # num_latents=0 with expansion_factor=32 would mean 384 latents: the weights (40) win
    t = write_sparsify(tmp_path / "layers.6")
    sae = load_dictionary(tmp_path / "layers.6")
    assert sae.n_latents == N and sae.site.extra == {"source": "sparsify", "hookpoint": "layers.6"}

    def encode(x):
        return topk_relu(((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]).relu(), K)

    assert_same_function(sae, encode, lambda f: f @ t["W_dec"] + t["b_dec"], rnd(9, D))


@pytest.mark.parametrize("option, message", [
    ({"skip_connection": True}, "skip_connection=true is unsupported"),
    ({"transcode": True}, "transcode=true is unsupported"),
    ({"activation": "groupmax"}, "activation='groupmax' is unsupported"),
])
def test_sparsify_unsupported_options_are_named(tmp_path, option, message):
    write_sparsify(tmp_path, **option)
    with pytest.raises(DictionaryError, match=message):
        load_dictionary(tmp_path)


def test_sparsify_skip_weights_are_refused_even_if_the_cfg_forgets_them(tmp_path):
    t = write_sparsify(tmp_path)
    save_file({**t, "W_skip": torch.zeros(D, D)}, str(tmp_path / "sae.safetensors"))
    with pytest.raises(DictionaryError, match="skip_connection=true is unsupported"):
        load_dictionary(tmp_path)


# --- SDLens ----------------------------------------------------------------------------------


def write_sdlens(folder, mean=None, std=None, wrap=True):
    state = {"encoder.weight": rnd(N, D), "decoder.weight": rnd(D, N), "pre_bias": rnd(D), "latent_bias": rnd(N),
             "stats_last_nonzero": torch.zeros(N, dtype=torch.long)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state} if wrap else state, folder / "state_dict.pth")
    write_json(folder / "config.json", {"n_dirs_local": N, "d_model": D, "k": K, "auxk": 16, "dead_steps_threshold": 100})
    for name, value in (("mean", mean), ("std", std)):
        if value is not None:
            torch.save(value, folder / f"{name}.pt")
    return state


def sdlens_reference(s, mean=None, std=None):
    """SDLens: relu(topk(encoder(x - pre_bias) + latent_bias)); decoder(f) + pre_bias;
    with input standardisation around both when mean/std have the input's width."""
    mean = torch.zeros(D) if mean is None else mean
    std = torch.ones(D) if std is None else std

    def encode(x):
        return topk_relu(((x - mean) / std - s["pre_bias"]) @ s["encoder.weight"].T + s["latent_bias"], K)

    def decode(f):
        return (f @ s["decoder.weight"].T + s["pre_bias"]) * std + mean

    return encode, decode


def test_sdlens_mean_of_feature_width_is_the_mean_activation(tmp_path):
    feature_mean, feature_std = rnd(N).abs(), rnd(N).abs()
    s = write_sdlens(tmp_path, mean=feature_mean, std=feature_std)
    sae = load_dictionary(tmp_path)
    assert_same_function(sae, *sdlens_reference(s), rnd(9, D))
    torch.testing.assert_close(sae.mean_activation, feature_mean)
    assert sae.standardizer.is_identity


def test_sdlens_mean_and_std_of_input_width_standardise_the_input(tmp_path):
    mean, std = rnd(D), rnd(D).abs() + 0.5
    s = write_sdlens(tmp_path, mean=mean, std=std, wrap=False)
    sae = load_dictionary(tmp_path / "state_dict.pth")  # a file picker hands over the .pth: its folder loads
    assert_same_function(sae, *sdlens_reference(s, mean, std), rnd(9, D) * 3)
    assert not bool(sae.mean_activation.any())


def test_sdlens_encoder_with_its_own_bias(tmp_path):
    s = write_sdlens(tmp_path)
    s["encoder.bias"] = rnd(N)
    torch.save({"state_dict": s}, tmp_path / "state_dict.pth")
    reference = {**s, "latent_bias": s["latent_bias"] + s["encoder.bias"]}
    assert_same_function(load_dictionary(tmp_path), *sdlens_reference(reference), rnd(9, D))


def test_sdlens_statistics_of_another_width_are_refused(tmp_path):
    write_sdlens(tmp_path, mean=rnd(7))
    with pytest.raises(DictionaryError, match="mean.pt holds \\(7,\\); expected a tensor of length 40 .* or 12"):
        load_dictionary(tmp_path)


class Payload:
    """Stands for any object whose unpickling would run code."""


@pytest.mark.parametrize("payload", [Payload(), os.system], ids=["class-instance", "function"])
def test_pickles_with_objects_are_refused_not_unpickled(tmp_path, payload):
    write_sdlens(tmp_path)
    torch.save({"state_dict": {"encoder.weight": payload}}, tmp_path / "state_dict.pth")
    with pytest.raises(DictionaryError, match="refusing to unpickle arbitrary objects, which can run code: re-save it as tensors"):
        load_dictionary(tmp_path)


def test_pickled_statistics_with_objects_are_refused_too(tmp_path):
    write_sdlens(tmp_path)
    torch.save(Payload(), tmp_path / "mean.pt")
    with pytest.raises(DictionaryError, match="mean.pt holds pickled Python objects besides tensors \\(or is damaged\\); refusing to unpickle"):
        load_dictionary(tmp_path)


def test_truncated_pth_is_reported_as_such(tmp_path):
    write_sdlens(tmp_path)
    data = (tmp_path / "state_dict.pth").read_bytes()
    (tmp_path / "state_dict.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(DictionaryError, match="state_dict.pth is truncated or not a PyTorch tensor file"):
        load_dictionary(tmp_path)


# --- seed-A ITDA -----------------------------------------------------------------------------


def seed_itda_reference(xs, mean_x, target_l0, std=None):
    """Seed A's gradient pursuit over the atoms, on x - mean_x (dense weights)."""
    std = torch.ones(D) if std is None else std

    def encode(x):
        x = (x - mean_x) / std
        weights = torch.zeros(x.shape[0], xs.shape[0])
        for _ in range(target_l0):
            residual = x - weights @ xs
            inner = residual @ xs.T
            selected = (weights != 0).scatter(1, inner.argmax(1, keepdim=True), True)
            grad = selected * inner
            c = grad @ xs
            step = (c * residual).sum(-1) / (c * c).sum(-1).clamp_min(1e-3)
            weights = (weights + step[:, None] * grad).relu()
        return weights

    return encode, lambda w: (w @ xs) * std + mean_x


def write_seed_itda(folder, size=6, capacity=16, std_x=None, **cfg_overrides):
    xs = torch.full((capacity, D), float("nan"))  # rows past `size`: uninitialised growth room
    xs[:size] = torch.linalg.qr(rnd(D, size))[0].T  # orthonormal atoms: every pursuit is exact
    mean_x = rnd(D)
    tensors = {"xs": xs, "ys": xs.clone(), "mean_x": mean_x, "mean_y": mean_x.clone(), "weight": torch.empty(D, D)}
    if std_x is not None:
        tensors["std_x"] = std_x
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "sae.safetensors"))
    cfg = {"d_model": D, "target_l0": 3, "loss_threshold": 0.4, "add_error": False, "subtract_mean": True,
           "fvu_loss": True, "start_size": 0, "error_k": None, "skip_connection": False, "preprocessing_steps": 1,
           "dictionary_size": size, "steps": 10, **cfg_overrides}
    write_json(folder / "cfg.json", cfg)
    return xs[:size], mean_x


def sparse_mixtures(atoms, mean):
    """Inputs made of 1-3 atoms with positive weights, plus the mean: what ITDA reconstructs."""
    weights = torch.zeros(8, atoms.shape[0])
    for row in range(8):
        chosen = torch.randperm(atoms.shape[0], generator=g)[: 1 + row % 3]
        weights[row, chosen] = torch.rand(len(chosen), generator=g) * 2 + 0.5
    return weights @ atoms + mean


@pytest.mark.parametrize("with_std", [False, True])
def test_seed_itda_folder_ignores_padding_rows_and_matches_gradient_pursuit(tmp_path, with_std):
    std = rnd(D).abs() + 0.5 if with_std else None
    atoms, mean_x = write_seed_itda(tmp_path, std_x=std)
    itda = load_dictionary(tmp_path)
    assert isinstance(itda, ITDA) and itda.n_latents == 6 and itda.k == 3 and itda.loss_threshold == 0.4
    torch.testing.assert_close(itda.atoms, atoms)
    x = sparse_mixtures(atoms * (1 if std is None else std), mean_x)
    encode, decode = seed_itda_reference(atoms, mean_x, 3, std)
    assert_same_function(itda, encode, decode, x)
    torch.testing.assert_close(itda(x), x, atol=1e-4, rtol=1e-4)


def test_seed_itda_atoms_are_renormalised_and_mean_kept_only_when_subtracted(tmp_path):
    write_seed_itda(tmp_path, subtract_mean=False)
    tensors = load_file(str(tmp_path / "sae.safetensors"))
    tensors["xs"][:6] *= 3.0
    tensors["ys"][:6] *= 3.0
    save_file(tensors, str(tmp_path / "sae.safetensors"))
    itda = load_dictionary(tmp_path)
    torch.testing.assert_close(itda.atoms.norm(dim=-1), torch.ones(6))
    assert itda.standardizer.is_identity


@pytest.mark.parametrize("change, message", [
    ({"add_error": True}, "add_error=true is unsupported"),
    ({"skip_connection": True}, "skip_connection=true is unsupported"),
    ({"dictionary_size": 99}, "dictionary_size=99 but xs has 16 rows"),
])
def test_seed_itda_unsupported_options_are_named(tmp_path, change, message):
    write_seed_itda(tmp_path, **change)
    with pytest.raises(DictionaryError, match=message):
        load_dictionary(tmp_path)


@pytest.mark.parametrize("name", ["ys", "mean_y"])
def test_seed_itda_transcoder_is_refused(tmp_path, name):
    write_seed_itda(tmp_path)
    tensors = load_file(str(tmp_path / "sae.safetensors"))
    tensors[name][:6] += 1.0
    save_file(tensors, str(tmp_path / "sae.safetensors"))
    with pytest.raises(DictionaryError, match=f"ITDA files whose {name} differ from .* a transcoder, not an autoencoder"):
        load_dictionary(tmp_path)


# --- export to SAELens -----------------------------------------------------------------------


def normalised_sae(kind):
    std = Standardizer(D, mean=rnd(D) * 3, std=rnd(D).abs() + 0.5)
    sae = SparseAutoencoder(D, N, K, kind, standardizer=std, seed=1,
                            site=Site(family="flux", block="double_blocks.18", stream="image"))
    with torch.no_grad():
        sae.b_dec.copy_(rnd(D))
        sae.b_enc.copy_(rnd(N) * 0.1)
        sae.threshold.copy_(rnd(N).abs() * 0.3 if kind == "jumprelu" else torch.full((N,), 0.2))
    return sae


@pytest.mark.parametrize("kind, architecture", [("topk", "topk"), ("batchtopk", "jumprelu"), ("jumprelu", "jumprelu")])
def test_export_to_saelens_folds_normalisation_and_round_trips(tmp_path, kind, architecture):
    sae = normalised_sae(kind)
    assert export_saelens(sae, tmp_path / "export") == tmp_path / "export"
    x = rnd(20, D) * 4 + 1

    # SAELens' own formula on the exported tensors gives our codes and reconstructions
    t = load_file(str(tmp_path / "export" / "sae_weights.safetensors"))
    cfg = json.loads((tmp_path / "export" / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["apply_b_dec_to_input"] is False
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"], cfg["dtype"]) == (D, N, "none", "float32")
    assert (cfg["model_name"], cfg["hook_name"]) == ("flux", "double_blocks.18.image")
    assert cfg["metadata"]["hook_name"] == "double_blocks.18.image"
    encode, decode = saelens_reference(t, cfg)
    torch.testing.assert_close(encode(x), sae.dense_codes(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decode(encode(x)), sae(x), atol=1e-4, rtol=1e-4)

    back = load_saelens(tmp_path / "export")
    assert back.site == sae.site and back.standardizer.is_identity
    torch.testing.assert_close(back.dense_codes(x), sae.dense_codes(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back(x), sae(x), atol=1e-4, rtol=1e-4)


def test_relu_sae_exports_as_standard(tmp_path):
    sae = normalised_sae("relu")
    with torch.no_grad():
        sae.threshold.zero_()
    export_saelens(sae, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "standard"
    x = rnd(10, D)
    torch.testing.assert_close(load_dictionary(tmp_path)(x), sae(x), atol=1e-4, rtol=1e-4)


def test_itda_cannot_be_exported_to_saelens(tmp_path):
    with pytest.raises(DictionaryError, match="itda dictionaries are not representable in SAELens"):
        export_saelens(ITDA(D, 3), tmp_path)
    assert not any(tmp_path.iterdir())


# --- settings and tensors are read exactly or refused ------------------------------------------


@pytest.mark.parametrize("write, cfg_name, change, message", [
    (write_saelens, "cfg.json", {"k": 3.7}, "cfg.json: k=3.7 is not a whole number"),
    (write_saelens, "cfg.json", {"k": True}, "cfg.json: k=True is not a whole number"),
    (write_saelens, "cfg.json", {"apply_b_dec_to_input": "false"}, "apply_b_dec_to_input='false' is not true or false"),
    (write_saelens, "cfg.json", {"metadata": "flux"}, "metadata='flux' is not a JSON object"),
    (write_saelens, "cfg.json", {"d_sae": 41}, "cfg.json: d_sae=41 but the weights have 40"),
    (write_sparsify, "cfg.json", {"k": "5"}, "cfg.json: k='5' is not a whole number"),
    (write_sparsify, "cfg.json", {"num_latents": 64}, "num_latents=64 but the weights have 40"),
    (write_sdlens, "config.json", {"k": 0}, "config.json: k=0 must be between 1 and"),
    (write_sdlens, "config.json", {"d_model": 13}, "d_model=13 but the weights have 12"),
    (write_seed_itda, "cfg.json", {"dictionary_size": 2.0}, "dictionary_size=2.0 is not a whole number"),
    (write_seed_itda, "cfg.json", {"target_l0": None}, "has no 'target_l0' setting"),
    (write_seed_itda, "cfg.json", {"loss_threshold": 1.5}, "loss_threshold=1.5 must be in \\(0, 1\\]"),
    (write_seed_itda, "cfg.json", {"subtract_mean": 1}, "subtract_mean=1 is not true or false"),
])
def test_foreign_settings_of_the_wrong_type_or_size_are_refused_not_coerced(tmp_path, write, cfg_name, change, message):
    write(tmp_path)
    cfg = json.loads((tmp_path / cfg_name).read_text())
    write_json(tmp_path / cfg_name, {**cfg, **change})
    with pytest.raises(DictionaryError, match=message) as raised:
        load_dictionary(tmp_path)
    assert "\n" not in str(raised.value)


def rewrite_safetensors(path, **changes):
    tensors = load_file(str(path))
    tensors.update(changes)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


@pytest.mark.parametrize("write, weights, change, message", [
    (write_saelens, "sae_weights.safetensors", {"b_dec": torch.zeros(1)}, "inconsistent shapes .*decoder bias \\(1,\\)"),
    (write_saelens, "sae_weights.safetensors", {"W_enc": torch.zeros(1, D, N)}, "tensor 'W_enc' has shape \\(1, 12, 40\\) but must have 2 dimension"),
    (write_saelens, "sae_weights.safetensors", {"b_enc": torch.zeros(N, dtype=torch.int64)}, "tensor 'b_enc' holds torch.int64 values, not weights"),
    (write_sparsify, "sae.safetensors", {"encoder.bias": torch.zeros(1)}, "inconsistent shapes .*encoder bias \\(1,\\)"),
    (write_seed_itda, "sae.safetensors", {"mean_x": torch.zeros(1), "mean_y": torch.zeros(1)}, "tensor 'mean_x' has shape \\(1,\\) for inputs of width 12"),
    (write_seed_itda, "sae.safetensors", {"std_x": -torch.ones(D)}, "the input statistics have 12 zero, negative or non-finite std entries"),
])
def test_foreign_tensors_of_another_rank_or_a_broadcasting_shape_are_refused(tmp_path, write, weights, change, message):
    write(tmp_path)
    rewrite_safetensors(tmp_path / weights, **change)
    with pytest.raises(DictionaryError, match=message):
        load_dictionary(tmp_path)


def test_saelens_jumprelu_threshold_must_have_one_value_per_latent(tmp_path):
    write_saelens(tmp_path, "jumprelu")
    rewrite_safetensors(tmp_path / "sae_weights.safetensors", threshold=torch.tensor([0.5]))
    with pytest.raises(DictionaryError, match="threshold has shape \\(1,\\) for 40 latents"):
        load_dictionary(tmp_path)


@pytest.mark.parametrize("name, value, message", [
    ("encoder.bias", torch.zeros(1), "encoder.bias has shape \\(1,\\) but latent_bias \\(40,\\)"),
    ("latent_bias", torch.zeros(N, 1), "tensor 'latent_bias' has shape \\(40, 1\\) but must have 1 dimension"),
])
def test_sdlens_biases_must_have_their_exact_shape(tmp_path, name, value, message):
    state = write_sdlens(tmp_path)
    torch.save({"state_dict": {**state, name: value}}, tmp_path / "state_dict.pth")
    with pytest.raises(DictionaryError, match=message):
        load_dictionary(tmp_path)


def test_sdlens_input_std_that_is_zero_is_refused(tmp_path):
    std = rnd(D).abs() + 0.5
    std[4] = 0.0
    write_sdlens(tmp_path, mean=rnd(D), std=std)
    with pytest.raises(DictionaryError, match="the input statistics have 1 zero, negative or non-finite std entries"):
        load_dictionary(tmp_path)


def test_deeply_nested_config_json_is_refused(tmp_path):
    write_sparsify(tmp_path)
    (tmp_path / "cfg.json").write_text('{"k": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DictionaryError, match="cfg.json: cannot read this JSON config \\(maximum recursion depth"):
        load_dictionary(tmp_path)
