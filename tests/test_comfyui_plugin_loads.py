"""ComfyUI loads Diffusion SAE as a custom node package, through its V3 entry point: in-process and as a
running server."""
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
    assert sorted(plugin_nodes) == sorted(node.GET_SCHEMA().node_id for node in comfyui.plugin_module().nodes.NODES)


def test_comfyui_registers_the_v3_nodes_of_the_entry_point_with_their_display_names(comfyui):
    """The loader takes the V1 route whenever the plugin has NODE_CLASS_MAPPINGS; ours has only the V3 entry."""
    import asyncio

    import nodes
    from comfy_api.latest import ComfyExtension, io

    plugin = comfyui.plugin_module()
    assert not hasattr(plugin, "NODE_CLASS_MAPPINGS")
    extension = asyncio.run(plugin.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    listed = asyncio.run(extension.get_node_list())
    assert listed == plugin.nodes.NODES and len(listed) == 17
    for node in listed:
        schema = node.GET_SCHEMA()
        assert nodes.NODE_CLASS_MAPPINGS[schema.node_id] is node and issubclass(node, io.ComfyNode)
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] == schema.display_name


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
