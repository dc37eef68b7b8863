"""Training options are declared once (sae_core/config.py): the command line and the Train Dictionary node
take their defaults, ranges, choices and help from the dataclasses, old flat configs still load, and a bad
value is refused when the config is built."""
from __future__ import annotations

import math
import sys
from dataclasses import fields

import pytest

from sae_core import DictionaryConfig, TrainConfig
from sae_core.config import options
from sae_core.errors import ConfigError
from training.__main__ import _train_config, build_parser

TRAIN_OPTIONS = list(options(TrainConfig))
RENAMED_FLAGS = {"n_latents": "--latents", "expansion_factor": "--expansion", "total_steps": "--train-steps"}
"""The train command's flags named otherwise than their option (the names in use before the options were generated)."""
SHARED_FLAGS = {"seed", "device"}
"""Options set by flags that other subcommands share (``--seed`` on all of them, ``--device`` with the model options)."""
NODE_INPUTS = {"kind": "kind", "k": "k", "expansion": "expansion_factor", "steps": "total_steps", "lr": "lr",
               "batch_size": "batch_size"}
"""Train Dictionary's config inputs (their names are in saved workflows) -> the option each one sets."""


def flag(option) -> str:
    return RENAMED_FLAGS.get(option.name, "--" + option.name.replace("_", "-"))


def train_parser():
    return build_parser()[1]["train"]


# ----------------------------------------------------------------------------- the declaration


def test_every_option_of_both_configs_has_a_docstring_that_becomes_its_help():
    declared = [f.name for f in fields(DictionaryConfig)] + [f.name for f in fields(TrainConfig) if f.name != "dictionary"]
    assert [o.name for o in TRAIN_OPTIONS] == declared
    for option in TRAIN_OPTIONS:
        assert len(option.help) > 30 and "\n" not in option.help, option.name


def test_the_options_say_what_front_ends_need_to_know():
    by_name = {o.name: o for o in TRAIN_OPTIONS}
    assert by_name["kind"].choices == ("topk", "batchtopk", "itda", "matryoshka_batchtopk") and by_name["kind"].owner is DictionaryConfig
    assert (by_name["k"].type, by_name["k"].min, by_name["k"].default) == (int, 1, 32)
    lr = by_name["lr"]
    assert (lr.optional, lr.min, lr.min_open, lr.default) == (True, 0, True, None)
    betas = by_name["betas"]
    assert (betas.type, betas.length, betas.max, betas.max_open) == (float, 2, 1, True)
    assert {o.name for o in TRAIN_OPTIONS if o.resumable} == {"total_steps", "warmup_steps", "log_every",
                                                            "checkpoint_every", "device"}


def test_one_warmup_rule_a_tenth_of_the_run_within_1_to_100_steps_unless_set():
    assert TrainConfig().warmup() == 100
    assert TrainConfig(total_steps=40).warmup() == 4
    assert TrainConfig(total_steps=5).warmup() == 1
    assert TrainConfig(total_steps=50_000).warmup() == 100
    assert TrainConfig(total_steps=40, warmup_steps=0).warmup() == 0
    assert TrainConfig(total_steps=40, warmup_steps=30).warmup() == 30
    schedule = [TrainConfig(total_steps=40).lr_factor(step) for step in range(40)]
    assert schedule[:4] == [0.25, 0.5, 0.75, 1.0] and schedule[31] == 1.0 and schedule[39] == pytest.approx(1 / 8)


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("build, option", [
    (lambda: DictionaryConfig(k=0), "k=0"),
    (lambda: DictionaryConfig(k=True), "k=True"),
    (lambda: DictionaryConfig(k=3.7), "k=3.7"),
    (lambda: DictionaryConfig(kind="pca"), "kind='pca'"),
    (lambda: DictionaryConfig(normalization="l2"), "normalization='l2'"),
    (lambda: DictionaryConfig(k=64, n_latents=32), "k=64"),
    (lambda: TrainConfig(total_steps=0), "total_steps=0"),
    (lambda: TrainConfig(lr=math.nan), "lr=nan"),
    (lambda: TrainConfig(lr=0.0), "lr=0.0"),
    (lambda: TrainConfig(checkpoint_every=0), "checkpoint_every=0"),
    (lambda: TrainConfig(betas=(0.9, 1.0)), "betas=(0.9, 1.0)"),
    (lambda: TrainConfig(warmup_steps=-1), "warmup_steps=-1"),
    (lambda: TrainConfig(device="gpu"), "device='gpu'"),
    (lambda: TrainConfig(compute_dtype="int8"), "compute_dtype='int8'"),
    (lambda: TrainConfig.from_dict({"k": "many"}), "k='many'"),
])
def test_a_bad_value_is_refused_when_the_config_is_built_with_one_line_naming_the_option(build, option):
    with pytest.raises(ConfigError) as refused:
        build()
    message = str(refused.value)
    assert message.startswith(f"training option {option}:") and "\n" not in message, message


def test_accepted_values_are_stored_in_their_declared_types():
    config = TrainConfig.from_dict({"lr": 1, "betas": [0.5, 0.6], "k": 8})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.betas == (0.5, 0.6)
    with pytest.raises(AttributeError):
        config.total_steps = 0  # frozen: a config cannot skip its checks by assignment


# ----------------------------------------------------------------------------- stored configs


CLI_HEADER_CONFIG = {
    "kind": "itda", "k": 8, "n_latents": None, "expansion_factor": 16, "normalization": "scale",
    "b_dec_init": "geometric_median", "total_steps": 2000, "batch_size": 4096, "lr": None, "betas": [0.9, 0.999],
    "warmup_steps": 100, "decay_fraction": 0.2, "grad_clip": 1.0, "auxk": None, "auxk_coef": 0.03125,
    "dead_tokens": 1000000, "threshold_momentum": 0.99, "loss_threshold": 0.25, "max_atoms": 50000,
    "init_tokens": 16384, "seed": 3, "log_every": 50, "checkpoint_every": 500, "device": "cuda",
    "compute_dtype": "float32",
}
"""``metadata.training.config`` of a dictionary header as ``python -m training train`` wrote it before the split."""


def test_the_flat_config_of_older_checkpoints_and_headers_loads():
    config = TrainConfig.from_dict(CLI_HEADER_CONFIG)
    assert config.dictionary == DictionaryConfig(kind="itda", k=8)
    assert (config.total_steps, config.warmup_steps, config.loss_threshold, config.seed, config.device) == \
        (2000, 100, 0.25, 3, "cuda")
    assert config.betas == (0.9, 0.999)
    assert config.flat() == {**CLI_HEADER_CONFIG, "betas": (0.9, 0.999), "matryoshka_levels": 5}  # added since: its default
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["dictionary"] == {"kind": "itda", "k": 8, "n_latents": None, "expansion_factor": 16,
                                              "normalization": "scale", "matryoshka_levels": 5}


def test_unknown_options_are_named_with_the_valid_ones_flat_or_nested():
    with pytest.raises(ConfigError, match=r"unknown training option\(s\) learning_rate; valid: .*expansion_factor.*lr"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"unknown training option\(s\) width; valid: "):
        TrainConfig.from_dict({"dictionary": {"width": 8}})
    with pytest.raises(ConfigError, match=r"option\(s\) k given twice"):
        TrainConfig.from_dict({"k": 8, "dictionary": {"k": 4}})


# ----------------------------------------------------------------------------- the command line


def test_the_train_command_has_a_flag_per_option_with_the_dataclass_default_choices_and_help():
    actions = {s: a for a in train_parser()._actions for s in a.option_strings}
    for option in TRAIN_OPTIONS:
        if option.name in SHARED_FLAGS:
            continue
        action = actions[flag(option)]
        assert action.default == option.default, option.name
        assert action.help.replace("%%", "%") == option.help, option.name
        assert tuple(action.choices) == option.choices if option.choices else action.choices is None, option.name
        if option.choices is None:  # the flag reads its option's type: the default, or 1 for an unset one
            example = option.default[0] if option.length else 1 if option.default is None else option.default
            assert action.type(str(example)) == example and type(action.type(str(example))) is option.type, option.name
        assert action.nargs == option.length, option.name
    assert actions["--seed"].default == TrainConfig().seed


@pytest.mark.parametrize("option", [o for o in TRAIN_OPTIONS if o.min is not None and o.name not in SHARED_FLAGS],
                         ids=lambda o: o.name)
def test_a_train_flag_below_its_option_s_bound_is_refused_while_parsing(option, capsys):
    from training.__main__ import main

    below = option.min if option.min_open else option.min - 1
    value = str(int(below) if option.type is int else below)
    assert main(["train", flag(option), *[value] * (option.length or 1)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: python -m training train: argument {flag(option)}: must be") and err.count("\n") == 1, err


def test_the_train_command_without_flags_trains_with_the_dataclass_defaults():
    args = build_parser()[0].parse_args(["train"])
    assert _train_config(args, "cpu") == TrainConfig()


def test_every_train_flag_of_earlier_versions_still_sets_its_option():
    args = build_parser()[0].parse_args([
        "train", "--kind", "batchtopk", "--k", "8", "--latents", "128", "--expansion", "4", "--normalization", "none",
        "--train-steps", "30", "--batch-size", "64", "--lr", "0.001", "--loss-threshold", "0.2", "--dead-tokens", "500",
        "--checkpoint-every", "10", "--log-every", "5", "--seed", "3", "--betas", "0.8", "0.99", "--warmup-steps", "2",
    ])
    assert _train_config(args, "cpu") == TrainConfig(
        DictionaryConfig(kind="batchtopk", k=8, n_latents=128, expansion_factor=4, normalization="none"),
        total_steps=30, batch_size=64, lr=0.001, loss_threshold=0.2, dead_tokens=500, checkpoint_every=10,
        log_every=5, seed=3, betas=(0.8, 0.99), warmup_steps=2)


# ----------------------------------------------------------------------------- the node


@pytest.fixture(scope="module")
def plugin(comfyui):
    """Our plugin as ComfyUI loaded it: its Train Dictionary class and its own copy of sae_core."""
    comfyui.load_plugin_nodes()
    import nodes

    name = comfyui.plugin_module().__name__
    return nodes.NODE_CLASS_MAPPINGS["SAETrainDictionary"], sys.modules[name + ".sae_core"], \
        sys.modules[name + ".nodes.dictionary_nodes"]


def test_the_train_node_inputs_take_default_range_and_tooltip_from_the_dataclass(plugin):
    node, core, _ = plugin
    from comfy_api.latest import io

    by_name = {o.name: o for o in core.config.options(core.TrainConfig)}
    inputs = node.define_schema().inputs
    assert [i.id for i in inputs[:len(NODE_INPUTS)]] == list(NODE_INPUTS)  # saved workflows list widgets in this order
    for spec in inputs[:len(NODE_INPUTS)]:
        option = by_name[NODE_INPUTS[spec.id]]
        assert spec.tooltip == option.help and not spec.optional, spec.id
        if option.choices:
            assert isinstance(spec, io.Combo.Input), spec.id
            assert (tuple(spec.options), spec.default) == (option.choices, option.default), spec.id
            continue
        assert isinstance(spec, {int: io.Int.Input, float: io.Float.Input}[option.type]), spec.id
        assert spec.default == (0 if option.default is None else option.default), spec.id
        assert spec.min == (0 if option.optional else option.min), spec.id
        assert spec.max == (option.max if option.max is not None else
                            0xFFFFFFFFFFFFFFFF if option.type is int else sys.float_info.max), spec.id


def test_the_train_node_describes_itself_and_every_input(plugin):
    node, _, _ = plugin
    schema = node.define_schema()
    assert len(schema.description) > 40
    for spec in schema.inputs:
        assert spec.tooltip, spec.id


def test_the_train_node_at_its_defaults_trains_with_the_dataclass_defaults(plugin):
    node, core, module = plugin
    defaults = {spec.id: spec.default for spec in node.define_schema().inputs if spec.id in NODE_INPUTS}
    config = module.train_config(defaults, "cpu")
    assert config == core.TrainConfig(log_every=config.total_steps // 100)
    assert module.train_config({**defaults, "lr": 3e-4}, "cpu").lr == 3e-4
