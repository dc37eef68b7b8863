"""The GPU benchmark script runs end to end (on a tiny CPU problem here) and reports every row."""
import json

from bench.train_step import main


def test_train_step_benchmark_reports_floor_ours_naive_and_peer(tmp_path):
    rows = main(["--small", "--device", "cpu", "--dtype", "float32", "--warmup", "1", "--iters", "2",
                 "--json", str(tmp_path / "rows.json")])
    names = [r["name"] for r in rows]
    assert names == ["matmul floor", "sae_core", "naive", "eai-sparsify"]
    assert all(r["seconds"] > 0 for r in rows if "seconds" in r)
    assert "note" in rows[-1] or rows[-1]["seconds"] > 0  # the peer is reported even when missing
    assert json.loads((tmp_path / "rows.json").read_text())["rows"][1]["name"] == "sae_core"
