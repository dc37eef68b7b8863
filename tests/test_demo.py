"""`python -m training demo --quick`: the README's main job runs end to end on the organism and leaves
every figure it promises."""
from __future__ import annotations

import json
from pathlib import Path

from training.compat import apply_torchvision_workaround

apply_torchvision_workaround()
from training.__main__ import main  # noqa: E402


def test_quick_demo_runs_the_whole_loop_and_writes_its_figures(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sites"] == ["double_blocks.1:image", "double_blocks.1:text"]
    image_eval = summary["eval"]["double_blocks.1:image"]
    for kind in ("topk", "itda"):
        assert image_eval[kind]["held_out"]["fvu"] < 0.5
        assert image_eval[kind]["substitution"]["substituted"]["pixel_mse"] < image_eval[kind]["substitution"]["mean_ablated"]["pixel_mse"]
    flips = summary["flip"]["double_blocks.1:text -> seven"]["rows"]
    assert {r["direction"].split(" ")[0] for r in flips} == {"topk", "itda", "diff", "random"}
    unsteered = {(r["flip_rate"], r["kept_prompt_class"]) for r in flips if r["strength"] == 0}
    assert len(unsteered) == 1  # strength 0 is the same unsteered baseline for every direction
    for name in ("flip_rates.png", "atlas/index.html", "topk_substitution.png", "topk_double_blocks.1-image.safetensors",
                 "itda_double_blocks.1-text.safetensors"):
        assert (out / name).exists(), name
    assert "[flip] at double_blocks.1:text to 'seven'" in printed
