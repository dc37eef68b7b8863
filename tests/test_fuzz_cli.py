"""Fuzzing `python -m training`: every option of every subcommand, given on the command line or in a config
file, with values of the wrong type, out of range, NaN/inf, empty, huge or negative.

The contract each case is held to: the command either stops with exit code 2 and exactly one stderr line
``error: ...`` before any work (no model loaded, nothing trained or generated), or it starts its work with
the value exactly as given. Never another exception, never a hang. The work itself is replaced by a
sentinel, so a case costs milliseconds. ``DIFFUSION_SAE_FUZZ=long`` runs ten times as many random cases.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from PIL import Image

from sae_core import ConfigError, DictionaryConfig, InputError, Site, SparseAutoencoder, TrainConfig, save_dictionary
from sae_core.config import INT_MAX, options
from sae_core.shards import ShardWriter
from training.compat import apply_torchvision_workaround

apply_torchvision_workaround()
import training.__main__ as cli  # noqa: E402
from training.config import Device, Number, OutputPath, Span, Text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SITE = Site("flux", "double_blocks.1", "image")
LONG = os.environ.get("DIFFUSION_SAE_FUZZ") == "long"
RANDOM_CASES = 200 if LONG else 20
"""Random cases of several options at once per subcommand (flags, config files) and, times five, for TrainConfig."""
CASE_SECONDS = 10
"""Longer than any case needs by far: a case that takes it is a hang."""
SEED = 20240611


class WorkStarted(BaseException):
    """Raised where a command would start its real work: loading a model, training, generating.

    A BaseException, so that no ``except Exception`` on the way can mistake it for a user's error."""


class Hang(BaseException):
    pass


@dataclass
class Tally:
    """Cases per (area, outcome), and every broken promise with its case."""

    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, kind: str, case: str, detail: str) -> None:
        self.outcomes[("broken", kind)] += 1
        self.failures.append(f"{kind}: {case}: {detail}")

    def report(self, title: str, seconds: float) -> str:
        areas = sorted({area for area, _ in self.outcomes if area != "broken"})
        lines = [f"{title}: {sum(n for (a, _), n in self.outcomes.items() if a != 'broken')} cases in {seconds:.1f} s"]
        for area in areas:
            lines.append(f"  {area:<22} " + ", ".join(f"{self.outcomes[(area, o)]} {o}"
                                                       for o in ("refused", "started", "built")
                                                       if self.outcomes[(area, o)]))
        broken = {kind: n for (a, kind), n in self.outcomes.items() if a == "broken"}
        lines.append("  other exceptions {}, hangs {}, silent changes {}, work before the error {}, not one line {}".format(
            broken.get("exception", 0), broken.get("hang", 0), broken.get("changed", 0), broken.get("worked", 0),
            broken.get("lines", 0)))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- a workspace and the sentinels


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Inputs that the commands accept: prompts, a dictionary of 64 features, shards, a folder with an image."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "prompts.txt").write_text("a handwritten seven\na silhouette of a cat\n")
    save_dictionary(SparseAutoencoder(128, 64, 4, site=SITE), root / "dictionary.safetensors")
    with ShardWriter(root / "shards", SITE, shard_tokens=8192, dtype=torch.float32) as writer:  # one default batch
        writer.add(torch.randn(8192, 16, generator=torch.Generator().manual_seed(0)), 0, torch.arange(8192), 0.5)
    (root / "images").mkdir()
    Image.new("L", (32, 32)).save(root / "images" / "one.png")
    (root / "a_file.txt").write_text("a file, not a folder")
    (root / "a_folder").mkdir()
    return root


@pytest.fixture()
def sentinels(monkeypatch, tmp_path: Path) -> dict[str, argparse.Namespace]:
    """Every point where a command starts real work raises WorkStarted; returns where the parsed args land.
    Runs in a scratch folder, since relative outputs (a fuzzed ``--out``, the defaults) are made there."""
    import training.demo
    import training.organism_build
    import training.runner
    import training.shipped

    monkeypatch.chdir(tmp_path)
    seen: dict[str, argparse.Namespace] = {}

    def start(*args, **kwargs):
        raise WorkStarted()

    for module, name in [(training.runner, "load_runner"), (cli, "train_dictionary"), (cli, "superposition_data"),
                         (cli, "evaluate"), (training.organism_build, "build_denoiser"), (training.demo, "run_demo"),
                         (training.shipped, "build_shipped")]:
        monkeypatch.setattr(module, name, start)
    for name in [n for n in vars(cli) if n.startswith("cmd_")]:
        monkeypatch.setattr(cli, name, _recording(getattr(cli, name), seen))
    return seen


def _recording(command: Callable, seen: dict) -> Callable:
    def record(args: argparse.Namespace) -> int:
        seen["args"] = args
        return command(args)

    return record


def _alarm(signum, frame):
    raise Hang()


@dataclass
class Outcome:
    started: bool
    code: Optional[int] = None
    stderr: str = ""
    args: Optional[argparse.Namespace] = None


def run_main(argv: list[str], seen: dict) -> Outcome:
    """``main(argv)`` in this process, its stderr captured, within CASE_SECONDS."""
    seen.clear()
    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(argv)
    except WorkStarted:
        return Outcome(True, args=seen.get("args"), stderr=err.getvalue())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return Outcome(False, code, err.getvalue())


REFUSED, EITHER = "refused", "either"
"""A case's expectation: refused for sure, or either refused (by a later check) or started with the value as given."""


def judge(tally: Tally, area: str, case: str, argv: list[str], seen: dict, expectation: str,
          expected: dict[str, Any]) -> Outcome:
    """Run one case and hold it to the contract; ``expected``: dest -> the value the args must carry if it starts."""
    try:
        outcome = run_main(argv, seen)
    except Hang:
        tally.fail("hang", case, f"still running after {CASE_SECONDS} s")
        return Outcome(False)
    except Exception as err:  # noqa: BLE001 - the point: any exception here breaks the contract
        tally.fail("exception", case, f"{type(err).__name__}: {err}")
        return Outcome(False)
    if outcome.started:
        if expectation == REFUSED:
            tally.fail("worked", case, "the command started its work instead of refusing")
        for dest, value in expected.items():
            got = getattr(outcome.args, dest)
            if got != value or type(got) is not type(value):
                tally.fail("changed", case, f"{dest} arrived as {got!r}, not {value!r}")
        tally.outcomes[(area, "started")] += 1
        return outcome
    lines = outcome.stderr.split("\n")
    if outcome.code != 2 or len(lines) != 2 or lines[1] or not lines[0].startswith("error: "):
        tally.fail("lines", case, f"exit code {outcome.code}, stderr {outcome.stderr[:300]!r}")
    tally.outcomes[(area, "refused")] += 1
    return outcome


def assert_kept(tally: Tally, title: str, seconds: float, capsys) -> None:
    with capsys.disabled():
        print("\n" + tally.report(title, seconds))
    assert not tally.failures, "\n".join(tally.failures[:20])


# ----------------------------------------------------------------------------- the subcommands' valid runs


def base_argv(command: str, ws: Path, out: Path) -> list[str]:
    """A valid run of ``command`` that reaches its work (where the sentinel stops it)."""
    dictionary, prompts = str(ws / "dictionary.safetensors"), str(ws / "prompts.txt")
    return {
        "synthetic": ["synthetic", "--out", str(out)],
        "organism": ["organism", "--out", str(out), "--work-dir", str(out / "work")],
        "capture": ["capture", "--prompts", prompts, "--sites", "double_blocks.1:image", "--out", str(out)],
        "train": ["train", "--shards", str(ws / "shards"), "--out", str(out / "d.safetensors")],
        "eval": ["eval", "--dictionary", dictionary, "--model", "organism-flux", "--prompts", prompts,
                 "--out", str(out)],
        "atlas": ["atlas", "--dictionary", dictionary, "--prompts", prompts, "--out", str(out)],
        "steer": ["steer", "--dictionary", dictionary, "--prompt", "a cat", "--features", "1",
                  "--out", str(out / "s.png")],
        "demo": ["demo", "--out", str(out)],
        "probe": ["probe", "--out", str(out)],
        "steer-lab": ["steer-lab", "--out", str(out)],
        "organism-dictionaries": ["organism-dictionaries", "--out", str(out)],
    }[command]


COMMANDS = ("synthetic", "organism", "capture", "train", "eval", "atlas", "steer", "demo", "probe",
            "organism-dictionaries", "steer-lab")


def flags_of(command: str) -> dict[str, argparse.Action]:
    """The subcommand's options by flag (``--config`` has its own tests)."""
    sub = cli.build_parser()[1][command]
    return {a.option_strings[-1]: a for a in sub._actions if a.option_strings and a.dest not in ("help", "config")}


# ----------------------------------------------------------------------------- values and what each must do


NUMBER_TEXTS = ["", "abc", "nan", "inf", "3.7", "-1", "0", "1", "7", str(INT_MAX + 1)]
"""For number options: empty, not a number, NaN/inf, a fraction, negative, zero, small, too large."""
MORE_NUMBER_TEXTS = [" ", "NaN", "-inf", "1e999", "2", "-0", "0.5", "1.0", "1e3", "0x10", "1_000", str(INT_MAX),
                     "9" * 40, "1" + "0" * 400, "1e-320", "12", "\u0661"]
TEXT_TEXTS = ["", "a\x00b", "a name"]
MORE_TEXT_TEXTS = [" ", "tab\there", "new\nline", "\x1b[0m", "\u65e5\u672c\u8a9e", "-dash", "x" * 5000]
DEVICE_TEXTS = ["cpu", "cuda", "cuda:0", "cuda:99", "mps", "meta", "banana", "", "CPU", "cpu:0", "cuda:-1"]
SPAN_TEXTS = ["all", "0-1", "0-0.5", "0.5-0.2", "1-2", "a-b", "0.5", "", "nan-1", "0-inf", "0.25-0.75", "-0.5-1"]


def number_oracle(number: Number, text: str) -> tuple[str, Any]:
    """What a Number flag must do with ``text``, worked out independently of training.config."""
    try:
        value = number.kind(text)
    except ValueError:
        return REFUSED, None
    if isinstance(value, float) and not math.isfinite(value):
        return REFUSED, None
    high = number.max if number.max is not None else (INT_MAX if number.kind is int else math.inf)
    low = number.min if number.min is not None else -math.inf
    too_low = value <= low if number.min_open else value < low
    too_high = value >= high if number.max_open else value > high
    return (REFUSED, None) if too_low or too_high else (EITHER, value)


def text_oracle(text_type: Text, text: str) -> tuple[str, Any]:
    if (not text.strip() and not text_type.empty) or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):
        return REFUSED, None
    return EITHER, text


def device_oracle(text: str) -> tuple[str, Any]:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        return REFUSED, None
    usable = {"cpu": True, "mps": torch.backends.mps.is_available(),
              "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()}
    return (EITHER, text) if usable.get(device.type, False) else (REFUSED, None)


def span_oracle(text: str) -> tuple[str, Any]:
    if text == "all":
        return EITHER, None
    parts = text.split("-")
    try:
        start, end = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        return REFUSED, None
    return (EITHER, (start, end)) if 0 <= start <= end <= 1 else (REFUSED, None)


def output_texts(ws: Path, out: OutputPath) -> list[tuple[str, str]]:
    """(value, expectation) for an output option: new places are fine, the wrong kind of place is not."""
    good = ws / "new_outputs" / ("run" if out.folder else "run" + (out.suffixes[0] if out.suffixes else ""))
    cases = [(str(good), EITHER), ("", REFUSED), (str(ws / "a_file.txt" / "below"), REFUSED),
             (str(ws / ("a_file.txt" if out.folder else "a_folder")), REFUSED)]
    if out.suffixes:
        cases.append((str(ws / "new_outputs" / "run.txt"), REFUSED))
    return cases


def sampled(rng: random.Random, main: list, more: list, random_value: Callable[[], Any]) -> list:
    """Values to try: by default two of the main table, one of the rest and one random value; everything and ten
    random values with DIFFUSION_SAE_FUZZ=long."""
    if LONG:
        return main + more + [random_value() for _ in range(10)]
    return rng.sample(main, min(2, len(main))) + rng.sample(more, min(1, len(more))) + [random_value()]


def element_cases(action: argparse.Action, ws: Path, rng: random.Random) -> list[tuple[str, str, Any]]:
    """(text, expectation, parsed value) for one value of ``action``, drawn from its kind's table."""
    kind = action.type
    if isinstance(kind, Number):
        texts = sampled(rng, NUMBER_TEXTS, MORE_NUMBER_TEXTS, lambda: random_number_text(rng))
        return [(t, *number_oracle(kind, t)) for t in texts]
    if isinstance(kind, Device):
        return [(t, *device_oracle(t)) for t in sampled(rng, DEVICE_TEXTS[:4], DEVICE_TEXTS[4:], lambda: random_text(rng))]
    if isinstance(kind, Span):
        return [(t, *span_oracle(t)) for t in sampled(rng, SPAN_TEXTS[:5], SPAN_TEXTS[5:], lambda: random_text(rng))]
    if isinstance(kind, OutputPath):
        return [(t, e, t if e == EITHER else None) for t, e in output_texts(ws, kind)]
    if isinstance(kind, Text):
        more = MORE_TEXT_TEXTS + [str(ws / "prompts.txt"), str(ws / "a_folder")]
        return [(t, *text_oracle(kind, t)) for t in sampled(rng, TEXT_TEXTS, more, lambda: random_text(rng))]
    if action.choices is not None:
        chosen = [(c, EITHER, c) for c in action.choices]
        return chosen + [(t, REFUSED, None) for t in ("bogus", "", str(list(action.choices)[0]).upper())]
    raise AssertionError(f"{action.option_strings}: no value generator for type {kind!r}")


def random_number_text(rng: random.Random) -> str:
    magnitude = 10 ** rng.randint(-6, 24)
    value = rng.choice([rng.randint(-3, 3) * magnitude, rng.uniform(-1, 1) * magnitude, rng.randint(0, 2**64)])
    return rng.choice([str(value), repr(float(value)), f"{value:e}" if isinstance(value, float) else str(value)])


def random_text(rng: random.Random) -> str:
    alphabet = "abc xyz-_./:0123456789\u00e9\u4e2d\t\x00\x7f\u200b"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def flag_cases(action: argparse.Action, ws: Path, rng: random.Random) -> list[tuple[list[str], str, Any]]:
    """(argv tail, expectation, the value args must carry) for one option, from its element cases."""
    flag = action.option_strings[-1]
    if action.nargs == 0:  # a switch
        return [([flag], EITHER, True), ([f"{flag}=1"], REFUSED, None)]
    elements = element_cases(action, ws, rng)
    if action.nargs is None:
        return [([f"{flag}={text}"], expectation, value) for text, expectation, value in elements]
    count = action.nargs if isinstance(action.nargs, int) else None
    cases: list[tuple[list[str], str, Any]] = [([flag], REFUSED, None)]  # no value at all
    for _ in range(len(elements) if LONG else 3):
        picked = rng.sample(elements, count or rng.randint(1, 3)) if count != 1 else [rng.choice(elements)]
        if count and rng.random() < 0.15:
            picked = picked[:-1] or picked * 3  # the wrong number of values
        whole = count is None or len(picked) == count
        expectation = EITHER if whole and all(e == EITHER for _, e, _ in picked) else REFUSED
        values = [v for _, _, v in picked]
        if flag == "--window" and expectation == EITHER and values[0] > values[1]:
            expectation = REFUSED
        cases.append(([flag, *[t for t, _, _ in picked]], expectation, values))
    return cases


def default_cases(action: argparse.Action) -> list[tuple[list[str], str, Any]]:
    """The option given its own default explicitly, which must arrive as that value: every subcommand's fuzz then
    reaches its work, however few drawn values it takes (probe runs on the organisms alone)."""
    if action.nargs == 0 or action.default is None:
        return []
    texts = ["all" if d is None else str(d) for d in
             (action.default if isinstance(action.default, (list, tuple)) else [action.default])]
    values = [default_value(action.type, text) for text in texts]
    flag = action.option_strings[-1]
    if action.nargs is None:
        return [([f"{flag}={texts[0]}"], EITHER, values[0])]
    return [([flag, *texts], EITHER, values)]


def default_value(kind: Any, text: str) -> Any:
    if isinstance(kind, Number):
        return kind.kind(text)
    return span_oracle(text)[1] if isinstance(kind, Span) else text


# ----------------------------------------------------------------------------- flags


def test_the_fuzz_covers_every_subcommand():
    """A new subcommand needs its base run here and a sentinel where its work starts, or the fuzz would skip it."""
    assert sorted(cli.build_parser()[1]) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_the_base_run_of_each_subcommand_reaches_its_work(command: str, workspace: Path, sentinels, tmp_path: Path):
    outcome = run_main(base_argv(command, workspace, tmp_path / "out"), sentinels)
    assert outcome.started, outcome.stderr


def test_every_flag_value_is_refused_in_one_line_before_any_work_or_arrives_unchanged(workspace: Path, sentinels,
                                                                                      tmp_path: Path, capsys):
    rng, tally, started = random.Random(SEED), Tally(), time.perf_counter()
    for command in COMMANDS:
        flags = flags_of(command)
        table = [(case, action) for action in flags.values()
                 for case in flag_cases(action, workspace, rng) + default_cases(action)]
        for n, ((tail, expectation, value), action) in enumerate(table):
            out = tmp_path / f"{command}-{n}"
            argv = base_argv(command, workspace, out) + tail
            outcome = judge(tally, command, " ".join(argv)[:300], argv, sentinels, expectation, {action.dest: value}
                            if expectation == EITHER else {})
            if not outcome.started and tail[0].split("=")[0] != "--out" and out.exists():
                tally.fail("worked", " ".join(argv)[:300], f"{out} was created before the error")
        for _ in range(RANDOM_CASES):  # several options at once
            picked = rng.sample(sorted(flags), rng.randint(2, min(4, len(flags))))
            tails = [rng.choice(flag_cases(flags[f], workspace, rng)) for f in picked]
            argv = base_argv(command, workspace, tmp_path / "random") + [t for tail, _, _ in tails for t in tail]
            expectation = EITHER if all(e == EITHER for _, e, _ in tails) else REFUSED
            expected = {flags[f].dest: v for f, (_, _, v) in zip(picked, tails)} if expectation == EITHER else {}
            judge(tally, command, " ".join(argv)[:300], argv, sentinels, expectation, expected)
    assert_kept(tally, "fuzz: command-line flags", time.perf_counter() - started, capsys)
    for command in COMMANDS:  # the fuzz reached the work of every subcommand, not only its refusals
        assert tally.outcomes[(command, "started")] >= 5 and tally.outcomes[(command, "refused")] >= 5, command


@pytest.mark.parametrize("command, flags, message", [
    ("capture", ["--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),
    ("capture", ["--sample-steps", "0"], "argument --sample-steps: must be at least 1"),
    ("capture", ["--tokens-per-image", "-4"], "argument --tokens-per-image: must be at least 1, not -4"),
    ("capture", ["--guidance", "nan"], "argument --guidance: must be a finite number, not nan"),
    ("capture", ["--device", "banana"], "'banana' is not a torch device"),
    ("capture", ["--window", "0.6", "0.2"], "swap start and end"),
    ("capture", ["--images", "somewhere"], "either --prompts FILE (generate) or --images FOLDER"),
    ("train", ["--lr", "nan"], "argument --lr: must be a finite number"),
    ("train", ["--checkpoint-every", "0"], "argument --checkpoint-every: must be at least 1"),
    ("train", ["--k", "3.7"], "argument --k: '3.7' is not a whole number"),
    ("train", ["--k", "64", "--latents", "32"], "training option k=64: must be at most n_latents=32"),
    ("train", ["--out", "runs/d.pt"], "the file name must end in .safetensors"),
    ("train", ["--site", "double_blocks.1:image"], "not both"),
    ("eval", ["--samples", "-1"], "argument --samples: must be at least 1, not -1"),
    ("eval", ["--model", "./no/such/folder"], "no such folder: ./no/such/folder"),
    ("atlas", ["--at", "5"], "argument --at: must be at most 1, not 5"),
    ("atlas", ["--features", "-1"], "argument --features: must be at least 1, not -1"),
    ("steer", ["--out", "steer.txt"], "'steer.txt' cannot be written as asked: the file name must end in .png"),
    ("steer", ["--features", "64"], "feature 64 does not exist: the dictionary has 64 features (0 to 63)"),
    ("steer", ["--strengths", "inf"], "argument --strengths: must be a finite number, not inf"),
    ("synthetic", ["--samples", "5"], "argument --samples: must be at least 10"),
    ("organism", ["--lr", "0"], "argument --lr: must be above 0, not 0"),
    ("demo", ["--seed", "-3"], "argument --seed: must be at least 0, not -3"),
    ("probe", ["--per-class", "1"], "argument --per-class: must be at least 2, not 1"),
    ("probe", ["--test-fraction", "1"], "argument --test-fraction: must be below 1, not 1"),
    ("probe", ["--levels", "0.5", "nan"], "argument --levels: must be a finite number, not nan"),
    ("probe", ["--levels", "0.5", "0.5"], "--levels: each value once, please (got 0.5 0.5)"),
    ("probe", ["--sites", "all", "double_blocks.0:image"], "--sites: give 'all' alone"),
    ("probe", ["--model", "someone/a-pipeline"], "probe runs on the organism pipelines"),
    ("probe", ["--dictionary", "missing.safetensors"], "missing.safetensors: no such file or folder"),
    ("organism-dictionaries", ["--seed", "x"], "argument --seed: 'x' is not a whole number"),
])
def test_named_mistakes_say_what_is_wrong_in_one_line(command, flags, message, workspace, sentinels, tmp_path):
    outcome = run_main(base_argv(command, workspace, tmp_path / "out") + flags, sentinels)
    assert not outcome.started and outcome.code == 2
    assert outcome.stderr.startswith("error: ") and outcome.stderr.count("\n") == 1 and message in outcome.stderr, \
        outcome.stderr


def test_probe_refuses_a_pipeline_that_is_not_an_organism_and_reads_its_dictionary_before_the_model(
        workspace, sentinels, tmp_path):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for flags, message in ((["--model", str(flux)], f"not {flux}: other pipelines are not supported yet"),
                           (["--dictionary", str(workspace / "prompts.txt")], "is not a dictionary layout"),
                           (["--dictionary", str(workspace / "a_folder")], "no dictionary layout recognised")):
        outcome = run_main(base_argv("probe", workspace, tmp_path / "out") + flags, sentinels)
        assert not outcome.started and outcome.code == 2, flags
        assert outcome.stderr.count("\n") == 1 and message in outcome.stderr, outcome.stderr
    outcome = run_main(base_argv("probe", workspace, tmp_path / "out") + ["--model", "organism-unet", "--dictionary",
                                                                           str(workspace / "dictionary.safetensors")],
                       sentinels)
    assert outcome.started and outcome.args.model == "organism-unet"


def test_capture_from_real_images_reads_the_folder_before_the_model(workspace, sentinels, tmp_path):
    argv = ["capture", "--sites", "double_blocks.1:image", "--image-levels", "0", "1", "--out", str(tmp_path / "out")]
    outcome = run_main(argv + ["--images", str(workspace / "images")], sentinels)
    assert outcome.started and outcome.args.images == str(workspace / "images")
    assert outcome.args.image_levels == [0.0, 1.0]
    outcome = run_main(argv + ["--images", str(workspace / "a_folder")], sentinels)
    assert not outcome.started and "holds no images" in outcome.stderr and outcome.stderr.count("\n") == 1


def test_a_cuda_device_on_a_machine_without_one_is_refused_by_name(workspace, sentinels, tmp_path):
    outcome = run_main(base_argv("capture", workspace, tmp_path / "out") + ["--device", "cuda:7"], sentinels)
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert not outcome.started and "CUDA device" in outcome.stderr and outcome.stderr.count("\n") == 1


def test_an_output_folder_without_write_permission_is_refused_before_any_work(workspace, sentinels, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user may write anywhere (root)")
        outcome = run_main(base_argv("atlas", workspace, locked / "atlas"), sentinels)
    finally:
        locked.chmod(0o700)
    assert not outcome.started and f"no permission to write in {locked}" in outcome.stderr


# ----------------------------------------------------------------------------- config files


def toml_value(value: Any) -> str:
    """``value`` as TOML (enough for the fuzz: scalars, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


FILE_VALUES = [True, 3.7, math.nan, "8", [], {"k": 1}]
"""Tried on every option in a config file: a switch, a fraction, NaN, a number as a string, a list, a table."""
MORE_FILE_VALUES = [False, 0, 1, 2, -1, 7, 2.0, 0.5, 1e300, math.inf, -math.inf, "", "0.5", "a name", "all", "0-0.5",
                    "a\x07b", [1], [0.1, 0.2], ["a", "b"], [0.6, 0.2], {}, INT_MAX, None, 10**30]


def file_oracle(action: argparse.Action, value: Any, ws: Path) -> tuple[str, Any]:
    """What a config file value must do, worked out independently of training.config."""
    if action.nargs == 0:
        return (EITHER, value) if isinstance(value, bool) else (REFUSED, None)
    if value is None:
        return (EITHER, None) if action.default is None else (REFUSED, None)
    if action.nargs is not None:
        values = value if isinstance(value, list) else [value]
        if not values or (isinstance(action.nargs, int) and len(values) != action.nargs):
            return REFUSED, None
        judged = [file_oracle_one(action, v) for v in values]
        if any(e == REFUSED for e, _ in judged):
            return REFUSED, None
        parsed = [v for _, v in judged]
        if action.dest == "window" and parsed[0] > parsed[1]:
            return REFUSED, None
        return EITHER, parsed
    if isinstance(value, (list, dict)):
        return REFUSED, None
    return file_oracle_one(action, value)


def file_oracle_one(action: argparse.Action, value: Any) -> tuple[str, Any]:
    kind = action.type
    if isinstance(kind, Number):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return REFUSED, None
        if kind.kind is int and isinstance(value, float) and not value.is_integer():
            return REFUSED, None
        if kind.kind is float and isinstance(value, int) and abs(value) > 1e308:
            return REFUSED, None
        return number_oracle(kind, repr(int(value) if kind.kind is int else float(value)))
    if not isinstance(value, str):
        return REFUSED, None
    if isinstance(kind, Device):
        return device_oracle(value)
    if isinstance(kind, Span):
        return span_oracle(value)
    if isinstance(kind, OutputPath):
        if kind.suffixes and Path(value).suffix.lower() not in kind.suffixes:
            return REFUSED, None
        return text_oracle(Text(), value)
    if isinstance(kind, Text):
        return text_oracle(kind, value)
    if action.choices is not None:
        return (EITHER, value) if value in action.choices else (REFUSED, None)
    raise AssertionError(f"{action.option_strings}: no oracle for {kind!r}")


def write_config(path: Path, data: dict[str, Any], language: str) -> Path:
    if language == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(data))
    else:
        path = path.with_suffix(".toml")
        tables = {k: v for k, v in data.items() if isinstance(v, dict)}
        lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in data.items() if k not in tables]
        for name, table in tables.items():
            lines.append(f"[{name}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
        path.write_text("\n".join(lines) + "\n")
    return path


def _toml_can_hold(value: Any) -> bool:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX):
        return False
    if isinstance(value, list):
        return all(_toml_can_hold(v) for v in value)
    if isinstance(value, dict):
        return all(_toml_can_hold(v) for v in value.values())
    return True


def test_every_config_file_value_is_refused_in_one_line_before_any_work_or_arrives_unchanged(
        workspace: Path, sentinels, tmp_path: Path, capsys):
    rng, tally, started = random.Random(SEED + 1), Tally(), time.perf_counter()
    n = 0
    for command in COMMANDS:
        flags = flags_of(command)
        values = [(action, v) for action in flags.values()
                  for v in sampled(rng, FILE_VALUES, MORE_FILE_VALUES, lambda: random_file_value(rng))]
        values += [(flags[rng.choice(sorted(flags))], random_file_value(rng)) for _ in range(RANDOM_CASES)]
        for action, value in values:
            n += 1
            key = rng.choice([action.dest, action.dest.replace("_", "-")])
            where = rng.choice(["table", "top"])
            data = {command: {key: value}} if where == "table" else {key: value}
            language = rng.choice(["json", "toml"]) if _toml_can_hold(value) else "json"
            path = write_config(tmp_path / f"c{n}", data, language)
            expectation, parsed = file_oracle(action, value, workspace)
            argv = base_argv(command, workspace, tmp_path / f"out{n}")
            if action.dest in _dests_in(argv, flags):
                argv = _without(argv, action)  # the flag would win over the file
            argv += ["--config", str(path)]
            case = f"{command} {path.name}: {key} = {value!r}"[:300]
            judge(tally, f"{command}", case, argv, sentinels, expectation,
                  {action.dest: parsed} if expectation == EITHER else {})
    assert_kept(tally, "fuzz: config file values", time.perf_counter() - started, capsys)


def _dests_in(argv: list[str], flags: dict[str, argparse.Action]) -> set[str]:
    return {flags[a].dest for a in argv if a in flags}


def _without(argv: list[str], action: argparse.Action) -> list[str]:
    """``argv`` without ``action``'s flag and its values."""
    flag = action.option_strings[-1]
    start = argv.index(flag)
    end = start + 1
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return argv[:start] + argv[end:]


def random_file_value(rng: random.Random) -> Any:
    scalar = rng.choice([lambda: rng.randint(-10, 10**6), lambda: rng.uniform(-2, 2), lambda: rng.random() < 0.5,
                         lambda: random_text(rng), lambda: rng.choice(["topk", "cpu", "all", "0-1", "float16"])])
    shape = rng.random()
    if shape < 0.6:
        return scalar()
    if shape < 0.85:
        return [scalar() for _ in range(rng.randint(0, 3))]
    return {random_text(rng) or "x": scalar()}


def test_bad_config_files_and_tables_are_refused_in_one_line(workspace: Path, sentinels, tmp_path: Path, capsys):
    folder = tmp_path / "a_folder.toml"
    folder.mkdir()
    cases: list[tuple[str, bytes, str]] = [
        ("binary.toml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
        ("utf16.json", '{"k": 8}'.encode("utf-16"), "is a binary file"),
        ("latin1.toml", "k = \"caf\u00e9\"".encode("latin-1"), "is a binary file"),
        ("broken.toml", b"[train\nk = 8", "is not valid TOML"),
        ("broken.json", b'{"train": {"k": 8}', "is not valid JSON"),
        ("list.json", b"[1, 2, 3]", "must hold a table of options, not a list"),
        ("string.json", b'"k = 8"', "must hold a table of options"),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),
        ("typo_table.toml", b"[trian]\nk = 8\n", "[trian] is not a subcommand"),
        ("typo_key.toml", b"kk = 8\n", "no subcommand has an option 'kk'"),
        ("wrong_command.toml", b"[train]\nprompt = \"a cat\"\n", "`train` has no option 'prompt'"),
        ("nested.toml", b"[train.k]\nvalue = 8\n", "option 'k' = {'value': 8}: must be one value, not a table"),
        ("bool.toml", b"[train]\nk = true\n", "option 'k' = True: must be a whole number, not true/false"),
        ("float.toml", b"[train]\nk = 3.7\n", "option 'k' = 3.7: must be a whole number, not 3.7"),
        ("string.toml", b"[train]\nk = \"8\"\n", "must be a whole number, not a string ('8')"),
        ("nan.toml", b"[train]\nlr = nan\n", "option 'lr' = nan: must be a finite number"),
        ("date.toml", b"[train]\nseed = 1979-05-27\n", "option 'seed'"),
        ("betas.toml", b"[train]\nbetas = [0.9]\n", "must be a list of 2 values"),
        ("switch.toml", b"[train]\nlist-sites = 1\n", "`train` has no option 'list-sites'"),
        ("switch2.toml", b"[capture]\nlist-sites = 1\n", "is a switch: set it to true or false"),
    ]
    tally, started = Tally(), time.perf_counter()
    for name, content, message in cases:
        path = tmp_path / name
        path.write_bytes(content)
        command = "capture" if name == "switch2.toml" else "train"
        outcome = judge(tally, "files", name, base_argv(command, workspace, tmp_path / "out") + ["--config", str(path)],
                        sentinels, REFUSED, {})
        if message not in outcome.stderr:
            tally.fail("lines", name, f"{outcome.stderr!r} does not say {message!r}")
    for path, message in ((folder, "is a folder"), (tmp_path / "missing.toml", "does not exist"),
                          (Path(os.devnull), "is not a regular file"), ("", "argument --config: must not be empty")):
        outcome = judge(tally, "files", str(path), ["train", "--config", str(path)], sentinels, REFUSED, {})
        if message not in outcome.stderr:
            tally.fail("lines", str(path), f"{outcome.stderr!r} does not say {message!r}")
    assert_kept(tally, "config files", time.perf_counter() - started, capsys)


def test_a_config_file_may_give_the_required_options(workspace: Path, sentinels, tmp_path: Path):
    config = tmp_path / "steer.toml"
    config.write_text(f'[steer]\ndictionary = "{workspace / "dictionary.safetensors"}"\nprompt = "a cat"\n'
                      f'features = [3, 5]\nwindows = ["all", "0-0.3"]\nout = "{tmp_path / "s.png"}"\n')
    outcome = run_main(["steer", "--config", str(config)], sentinels)
    assert outcome.started, outcome.stderr
    assert outcome.args.features == [3, 5] and outcome.args.windows == [None, (0.0, 0.3)]
    assert outcome.args.prompt == "a cat"


def test_an_empty_or_bom_config_file_changes_nothing(workspace: Path, sentinels, tmp_path: Path):
    for content in (b"", b"\xef\xbb\xbf[train]\nk = 8\n"):
        path = tmp_path / "c.toml"
        path.write_bytes(content)
        outcome = run_main(base_argv("train", workspace, tmp_path / "out") + ["--config", str(path)], sentinels)
        assert outcome.started and outcome.args.k == (8 if content else 32), outcome.stderr


# ----------------------------------------------------------------------------- TrainConfig values


def test_train_config_from_any_mapping_is_a_config_or_one_line_naming_the_option(capsys):
    """The dictionaries of checkpoints, headers and the node go through TrainConfig.from_dict: any value either
    builds a config holding exactly that value, or is a ConfigError of one line."""
    rng, tally, started = random.Random(SEED + 2), Tally(), time.perf_counter()
    types = {o.name: o.type for o in options(TrainConfig)}
    names = list(types)
    junk = FILE_VALUES + MORE_FILE_VALUES + [(0.9, 0.99), "topk", "itda", "scale", "cpu", "cuda:0", "float32", "zeros",
                                             10**19]
    cases = [{name: value} for name in names for value in junk]
    cases += [{rng.choice(names): rng.choice(junk) for _ in range(rng.randint(1, 4))} for _ in range(RANDOM_CASES * 5)]
    cases += [{"dictionary": []}, {"dictionary": 0}, {"dictionary": {"width": 8}}, {1: 2, "x": 3},
              {"k": 8, "dictionary": {"k": 4}}]
    for data in cases:
        case = repr(data)[:200]
        try:
            config = TrainConfig.from_dict(data)
        except ConfigError as err:
            tally.outcomes[("TrainConfig", "refused")] += 1
            if "\n" in str(err):
                tally.fail("lines", case, repr(str(err)))
            continue
        except Exception as err:  # noqa: BLE001
            tally.fail("exception", case, f"{type(err).__name__}: {err}")
            continue
        tally.outcomes[("TrainConfig", "built")] += 1
        flat = config.flat()
        for name, value in data.items():
            if name == "dictionary":
                continue
            kept = tuple(value) if isinstance(value, (list, tuple)) else value
            if types[name] is float and isinstance(kept, int) and not isinstance(kept, bool):
                kept = float(kept)  # a float option stores a whole number as the nearest float
            if flat[name] != kept or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
                tally.fail("changed", case, f"{name} became {flat[name]!r}")
    for data in ({"dictionary": []}, {"dictionary": 0}):
        with pytest.raises(ConfigError, match="must be a table of"):
            TrainConfig.from_dict(data)
    assert_kept(tally, "fuzz: TrainConfig.from_dict", time.perf_counter() - started, capsys)
    assert tally.outcomes[("TrainConfig", "built")] > 20


def test_whole_number_options_stop_at_64_bits():
    assert DictionaryConfig(expansion_factor=INT_MAX).expansion_factor == INT_MAX
    with pytest.raises(ConfigError, match=f"training option expansion_factor={INT_MAX + 1}: must be at most {INT_MAX}"):
        DictionaryConfig(expansion_factor=INT_MAX + 1)


# ----------------------------------------------------------------------------- pipeline folders


@pytest.mark.parametrize("index, message", [
    (None, "has no model_index.json"),
    (b"{not json", "model_index.json is not valid JSON"),
    (b"\xff\xfe binary", "model_index.json is not valid JSON"),
    (b"[1, 2]", "names no pipeline class"),
    (b'{"_class_name": 7}', "names no pipeline class"),
    (b'{"_class_name": "FluxPipelin"}', "names the pipeline class 'FluxPipelin', which neither diffusers nor"),
    (b'{"_class_name": "OrganismGanPipeline"}', "names the pipeline class 'OrganismGanPipeline'"),
])
def test_a_bad_model_index_json_is_an_input_error_before_anything_loads(index, message, workspace, sentinels, tmp_path):
    from training.runner import check_model

    folder = tmp_path / "pipeline"
    folder.mkdir()
    if index is not None:
        (folder / "model_index.json").write_bytes(index)
    with pytest.raises(InputError, match=message.replace("(", r"\(")) as refused:
        check_model(str(folder))
    assert "\n" not in str(refused.value)
    outcome = run_main(base_argv("atlas", workspace, tmp_path / "out") + ["--model", str(folder)], sentinels)
    assert not outcome.started and outcome.code == 2 and message in outcome.stderr


def test_a_pipeline_folder_with_a_known_class_but_missing_parts_is_one_input_error(tmp_path):
    from training.runner import load_runner

    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "OrganismFluxPipeline",
                                                         "transformer": ["organism.models", "OrganismFlux"]}))
    with pytest.raises(InputError, match="could not load the pipeline folder") as refused:
        load_runner(str(folder))
    assert "\n" not in str(refused.value)


# ----------------------------------------------------------------------------- a real process


def test_training_on_all_nan_shards_exits_2_with_one_line_within_seconds(tmp_path: Path):
    with ShardWriter(tmp_path / "nan", SITE, shard_tokens=256, dtype=torch.float32) as writer:
        for sample in range(4):
            writer.add(torch.full((64, 16), math.nan), sample, torch.arange(64), 0.5)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "training", "train", "--shards", str(tmp_path / "nan"),
                             "--batch-size", "64", "--out", str(tmp_path / "d.safetensors")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 30
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "NaN" in result.stderr
    assert not (tmp_path / "d.safetensors").exists()
