"""User errors: one type per kind of mistake, all of them SAEErrors (ValueErrors), each raised where that
kind of mistake is found, and each turned into one line and exit code 2 by the command line."""
import inspect
import math

import pytest
import torch

import sae_core
import sae_core.errors
import training.__main__ as cli
from organism.errors import OrganismError
from sae_core import (ActivationBuffer, ConfigError, DictionaryConfig, DictionaryError, InputError, SAEError,
                      ScheduleError, ShardError, ShardReader, SiteError, SparseAutoencoder, Steer, SteerError,
                      TrainConfig, TrainingError, WriteError, check_site_width, load_dictionary, save_dictionary,
                      train_dictionary)
from sae_core.recording import Recorder
from sae_core.sites import SiteContext, parse_site, transformer_catalogue
from sae_core.timesteps import in_window, validate_sigma_range, validate_window
from training.prompts import read_prompts

ERROR_TYPES = [cls for _, cls in inspect.getmembers(sae_core.errors, inspect.isclass)
               if issubclass(cls, sae_core.errors.SAEError)]


def test_every_error_type_is_an_sae_error_and_a_value_error_exported_by_the_engine():
    assert {cls.__name__ for cls in ERROR_TYPES} == {
        "SAEError", "DictionaryError", "SiteError", "ScheduleError", "SteerError", "ShardError", "ConfigError",
        "InputError", "WriteError", "TrainingError"}
    for cls in ERROR_TYPES:
        assert issubclass(cls, SAEError) and issubclass(cls, ValueError), cls
        assert cls.__name__ in sae_core.__all__ and getattr(sae_core, cls.__name__) is cls


def test_the_specific_types_are_distinct_kinds_not_one_another():
    specific = [cls for cls in ERROR_TYPES if cls is not SAEError]
    for cls in specific:
        assert [other for other in specific if issubclass(cls, other)] == [cls], cls


def _bad_prompts(tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"\x89PNG\x00binary")
    read_prompts(tmp_path / "prompts.txt")


def _write_below_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file where a folder should be")
    save_dictionary(SparseAutoencoder(8, 16, 2), tmp_path / "taken" / "d.safetensors")


@pytest.mark.parametrize("error, message, fail", [
    (DictionaryError, "no such file or folder", lambda tmp: load_dictionary(tmp / "missing.safetensors")),
    (DictionaryError, "has d_in=8 but site",
     lambda tmp: check_site_width(SparseAutoencoder(8, 16, 2), 12, "flux:double_blocks.1:image")),
    (SiteError, "available sites",
     lambda tmp: transformer_catalogue("flux", {"double_blocks": 2, "single_blocks": 2}, 8).resolve("double_blocks.7:image")),
    (SiteError, "not 'block:stream'", lambda tmp: parse_site("double_blocks.1")),
    (ScheduleError, "swap start and end", lambda tmp: validate_window((0.8, 0.2))),
    (ScheduleError, "swap low and high", lambda tmp: validate_sigma_range((3.0, 1.0))),
    (ScheduleError, "use a sigma range instead",
     lambda tmp: in_window(SiteContext(sigma=1.0, progress=None, cond=None, grid=None), window=(0.0, 0.5))),
    (SteerError, "unknown steering mode", lambda tmp: Steer((3,), (1.0,), mode="boost")),
    (SteerError, "the mask is empty", lambda tmp: Steer((3,), (1.0,), mask=torch.zeros(4, 4))),
    (ShardError, "does not exist: run capture first", lambda tmp: ShardReader(tmp / "nowhere", batch_size=8)),
    (ShardError, "capture buffer is full",
     lambda tmp: ActivationBuffer(4).append(torch.ones(5, 2), sample_id=0, token=None, timestep=1.0)),
    (ConfigError, "training option total_steps=0", lambda tmp: TrainConfig(total_steps=0)),
    (ConfigError, "keep='middle'", lambda tmp: Recorder(keep="middle")),
    (InputError, "is a binary file", _bad_prompts),
    (WriteError, "could not write", _write_below_a_file),
    (TrainingError, "no finite activations",
     lambda tmp: train_dictionary(iter([torch.full((32, 8), math.nan)]),
                                  TrainConfig(DictionaryConfig(k=2, n_latents=16), total_steps=2, batch_size=32))),
])
def test_each_kind_of_mistake_raises_the_type_that_names_it(error, message, fail, tmp_path):
    with pytest.raises(SAEError, match=message) as raised:
        fail(tmp_path)
    assert type(raised.value) is error
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("error", [*ERROR_TYPES, OrganismError], ids=lambda cls: cls.__name__)
def test_the_command_line_prints_any_user_error_as_one_line_and_exits_with_2(error, monkeypatch, capsys):
    def failing(args):
        raise error("the folder runs/x holds no shards: run capture first")

    monkeypatch.setattr(cli, "cmd_synthetic", failing)
    assert cli.main(["synthetic"]) == 2
    assert capsys.readouterr().err == "error: the folder runs/x holds no shards: run capture first\n"


def test_the_command_line_lets_a_program_error_show_its_traceback(monkeypatch):
    def failing(args):
        raise RuntimeError("a bug, not a user's mistake")

    monkeypatch.setattr(cli, "cmd_synthetic", failing)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["synthetic"])
