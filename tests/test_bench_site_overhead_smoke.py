"""The capture/steer overhead benchmark runs end to end on a tiny CPU model and reports every row."""
import comfyui_harness
from bench.site_overhead import main


def test_site_overhead_benchmark_reports_unpatched_capture_and_steering(tmp_path):
    comfyui_harness.apply_torchvision_workaround()  # diffusers imports torchvision in the test venv
    rows = main(["--small", "--device", "cpu", "--dtype", "float32", "--warmup", "1", "--iters", "2"])
    assert [r["name"] for r in rows][0] == "unpatched" and len(rows) == 4
    assert all(r["seconds"] > 0 for r in rows)
