"""Dictionaries from SAELens, sparsify, SDLens and seed-A ITDA compute their published formulas."""
import json

import pytest
import torch
from safetensors.torch import save_file

from sae_core import DictionaryError, SparseAutoencoder, Standardizer, export_saelens, load_dictionary

D, N, K = 12, 40, 5
g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


def topk_dense(pre, k):
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.clamp_min(0))


def assert_same_function(sae, encode_ref, decode_ref, x):
    codes = sae.dense_codes(x)
    torch.testing.assert_close(codes, encode_ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), decode_ref(encode_ref(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_saelens_folder(tmp_path, architecture):
    w_enc, b_enc, w_dec, b_dec, thr = rnd(D, N), rnd(N), rnd(N, D), rnd(D), rnd(N).abs()
    tensors = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    cfg = {"architecture": architecture, "d_in": D, "d_sae": N, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"model_name": "flux", "hook_name": "blocks.3"}}
    if architecture == "jumprelu":
        tensors["threshold"] = thr
    if architecture == "topk":
        cfg["activation_fn_kwargs"] = {"k": K}
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))

    def encode(x):
        pre = (x - b_dec) @ w_enc + b_enc
        if architecture == "topk":
            return topk_dense(pre, K)
        if architecture == "jumprelu":
            return pre * (pre > thr)
        return pre.relu()

    sae = load_dictionary(tmp_path)
    assert sae.site.family == "flux" and sae.site.block == "blocks.3"
    assert_same_function(sae, encode, lambda f: f @ w_dec + b_dec, rnd(9, D))


def test_saelens_unsupported_options_are_named(tmp_path):
    save_file({"W_enc": rnd(D, N), "b_enc": rnd(N), "W_dec": rnd(N, D), "b_dec": rnd(D)}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated"}))
    with pytest.raises(DictionaryError, match="architecture 'gated' is unsupported"):
        load_dictionary(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "standard", "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(DictionaryError, match="normalize_activations='expected_average_only_in' is unsupported"):
        load_dictionary(tmp_path)


def test_sparsify_folder(tmp_path):
    enc_w, enc_b, w_dec, b_dec = rnd(N, D), rnd(N), rnd(N, D), rnd(D)
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec}, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"expansion_factor": 4, "normalize_decoder": True, "num_latents": 0,
                                                   "k": K, "multi_topk": False, "skip_connection": False, "d_in": D}))
    encode = lambda x: topk_dense(((x - b_dec) @ enc_w.T + enc_b).relu(), K)  # noqa: E731
    assert_same_function(load_dictionary(tmp_path / "sae.safetensors"), encode, lambda f: f @ w_dec + b_dec, rnd(9, D))


def test_sparsify_skip_connection_is_refused(tmp_path):
    save_file({"encoder.weight": rnd(N, D), "encoder.bias": rnd(N), "W_dec": rnd(N, D), "b_dec": rnd(D)}, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"k": K, "skip_connection": True}))
    with pytest.raises(DictionaryError, match="skip_connection=true is unsupported"):
        load_dictionary(tmp_path)


def write_sdlens(folder, mean=None, std=None, wrap=True):
    state = {"encoder.weight": rnd(N, D), "decoder.weight": rnd(D, N), "pre_bias": rnd(D), "latent_bias": rnd(N),
             "stats_last_nonzero": torch.zeros(N, dtype=torch.long)}
    torch.save({"state_dict": state} if wrap else state, folder / "state_dict.pth")
    (folder / "config.json").write_text(json.dumps({"n_dirs_local": N, "d_model": D, "k": K, "auxk": 16, "dead_steps_threshold": 100}))
    if mean is not None:
        torch.save(mean, folder / "mean.pt")
    if std is not None:
        torch.save(std, folder / "std.pt")
    return state


def test_sdlens_folder_with_per_feature_statistics(tmp_path):
    feature_mean = rnd(N).abs()
    s = write_sdlens(tmp_path, mean=feature_mean, std=rnd(N).abs())
    encode = lambda x: topk_dense((x - s["pre_bias"]) @ s["encoder.weight"].T + s["latent_bias"], K)  # noqa: E731
    sae = load_dictionary(tmp_path)
    assert_same_function(sae, encode, lambda f: f @ s["decoder.weight"].T + s["pre_bias"], rnd(9, D))
    torch.testing.assert_close(sae.mean_activation, feature_mean)


def test_sdlens_folder_with_input_standardisation(tmp_path):
    mean, std = rnd(D), rnd(D).abs() + 0.5
    s = write_sdlens(tmp_path, mean=mean, std=std, wrap=False)
    encode = lambda x: topk_dense(((x - mean) / std - s["pre_bias"]) @ s["encoder.weight"].T + s["latent_bias"], K)  # noqa: E731
    decode = lambda f: (f @ s["decoder.weight"].T + s["pre_bias"]) * std + mean  # noqa: E731
    assert_same_function(load_dictionary(tmp_path), encode, decode, rnd(9, D) * 3)


class NotATensor:
    pass


def test_pickles_with_objects_are_refused_not_unpickled(tmp_path):
    write_sdlens(tmp_path)
    torch.save({"state_dict": {"encoder.weight": NotATensor()}}, tmp_path / "state_dict.pth")
    with pytest.raises(DictionaryError, match="refusing to unpickle arbitrary objects"):
        load_dictionary(tmp_path)


def write_seed_itda(folder, size=6, capacity=16, **cfg_overrides):
    xs = rnd(capacity, D)  # rows past `size` are unused capacity
    xs[:size] = torch.linalg.qr(rnd(D, size))[0].T  # orthonormal atoms: pursuit is exact
    mean_x = rnd(D)
    save_file({"xs": xs, "ys": xs.clone(), "mean_x": mean_x, "mean_y": mean_x.clone(), "weight": torch.zeros(D, D)},
              str(folder / "sae.safetensors"))
    cfg = {"d_model": D, "target_l0": 3, "loss_threshold": 0.4, "add_error": False, "subtract_mean": True,
           "fvu_loss": True, "start_size": 0, "error_k": None, "skip_connection": False, "preprocessing_steps": 1,
           "dictionary_size": size, "steps": 10, **cfg_overrides}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return xs[:size], mean_x


def test_seed_itda_folder_ignores_padding_rows(tmp_path):
    atoms, mean_x = write_seed_itda(tmp_path)
    itda = load_dictionary(tmp_path)
    assert itda.kind == "itda" and itda.n_latents == 6 and itda.k == 3
    torch.testing.assert_close(itda.atoms, atoms)
    x = mean_x + 2.0 * atoms[4] + 0.5 * atoms[1]
    torch.testing.assert_close(itda(x[None])[0], x, atol=1e-4, rtol=1e-4)


def test_seed_itda_add_error_is_refused(tmp_path):
    write_seed_itda(tmp_path, add_error=True)
    with pytest.raises(DictionaryError, match="add_error=true is unsupported"):
        load_dictionary(tmp_path)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_export_to_saelens_folds_normalisation_and_round_trips(tmp_path, kind):
    std = Standardizer(D, mean=rnd(D) * 3, std=rnd(D).abs() + 0.5)
    sae = SparseAutoencoder(D, N, K, kind, standardizer=std, seed=1)
    with torch.no_grad():
        sae.b_dec.copy_(rnd(D))
        sae.b_enc.copy_(rnd(N) * 0.1)
        sae.threshold.fill_(0.2)
    export_saelens(sae, tmp_path / "export")
    back = load_dictionary(tmp_path / "export")
    x = rnd(20, D) * 4 + 1
    torch.testing.assert_close(back.dense_codes(x), sae.dense_codes(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(back(x), sae(x), atol=1e-4, rtol=1e-4)
    cfg = json.loads((tmp_path / "export" / "cfg.json").read_text())
    assert cfg["d_in"] == D and cfg["d_sae"] == N and cfg["apply_b_dec_to_input"] is False
