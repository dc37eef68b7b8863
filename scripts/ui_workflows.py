"""Write the UI-format example workflows (what ComfyUI's template browser opens) from their API-format copies.

    .venv/bin/python scripts/ui_workflows.py

For each ``example_workflows/api/<name>.json`` the real frontend, in headless Chromium against a real ComfyUI
server with this plugin, loads the API graph (``app.loadApiJson``, which lays it out) and saves the graph it
shows (``app.graph.serialize()``): the organism examples, which run as they are on a clean install, as
``example_workflows/<name>.json`` (what the template browser lists); the others, which need a real model's
files, as ``example_workflows/flux/<name>.json``. The API copies stay the source: edit them, then rerun this.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import comfyui_harness  # noqa: E402  (the tests' harness starts the server)
from test_browser import ARGS, CHROMIUM  # noqa: E402


def main() -> int:
    from playwright.sync_api import sync_playwright

    sources = sorted((REPO / "example_workflows" / "api").glob("*.json"))
    with tempfile.TemporaryDirectory() as base, comfyui_harness.comfyui_server(base) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url)
        page.wait_for_function("() => window.app && window.app.graph")
        for source in sources:
            graph = json.loads(page.evaluate("""async ([api, name]) => {
                app.graph.clear();
                await app.loadApiJson(api, name);
                for (const node of app.graph._nodes) {  // examples reproduce: seeds stay as written
                    for (const w of node.widgets || []) if (w.name === "control_after_generate") w.value = "fixed";
                }
                return JSON.stringify(app.graph.serialize());  // as the frontend saves it: no undefined -> null
            }""", [json.loads(source.read_text()), source.stem]))
            folder = REPO / "example_workflows" / ("" if source.stem.startswith("organism_") else "flux")
            folder.mkdir(exist_ok=True)
            target = folder / source.name
            target.write_text(json.dumps(graph, indent=1) + "\n")
            print(f"{source.relative_to(REPO)} -> {target.relative_to(REPO)} ({len(graph['nodes'])} nodes)")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
