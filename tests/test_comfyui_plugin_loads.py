"""ComfyUI loads Diffusion SAE as a custom node package: in-process and as a running server."""
import json
import re
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEB_JS = "/extensions/diffusion_sae/js/diffusion_sae.js"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200, url
        return response.read()


def test_comfyui_imports_the_plugin_without_failure(comfyui):
    plugin_nodes = comfyui.load_plugin_nodes()

    import nodes  # ComfyUI's

    assert Path(nodes.LOADED_MODULE_DIRS["diffusion_sae"]).resolve() == REPO
    assert Path(nodes.EXTENSION_WEB_DIRS["diffusion_sae"]).resolve() == REPO / "web"
    plugin = comfyui.plugin_module()
    assert sorted(plugin_nodes) == sorted(plugin.NODE_CLASS_MAPPINGS)
    assert set(plugin.NODE_DISPLAY_NAME_MAPPINGS) <= set(plugin.NODE_CLASS_MAPPINGS)


def test_server_answers_object_info_with_the_plugin_nodes(comfyui, comfyui_server):
    object_info = json.loads(_get(comfyui_server + "/object_info"))

    assert "KSampler" in object_info
    assert set(comfyui.load_plugin_nodes()) <= set(object_info)


def test_server_lists_and_serves_the_web_extension(comfyui_server):
    extensions = json.loads(_get(comfyui_server + "/extensions"))
    assert WEB_JS in extensions

    source = _get(comfyui_server + WEB_JS).decode()
    assert 'name: "diffusion_sae"' in source
    # Its `import { app } from "…/scripts/app.js"` resolves, relative to where it is served, to the app.
    (app_import,) = re.findall(r'from "([^"]*scripts/app\.js)"', source)
    assert b"export const app " in _get(urllib.parse.urljoin(comfyui_server + WEB_JS, app_import))
