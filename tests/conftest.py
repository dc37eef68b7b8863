"""Session fixtures for tests that need real ComfyUI (see tests/comfyui_harness.py)."""
import os
from pathlib import Path

import pytest

import comfyui_harness


class _RepoRootIsNotATestPackage:
    """Collect the repo root as a plain folder.

    Its ``__init__.py`` is the ComfyUI entry; as a pytest Package it would be imported under the
    clone's folder name, with the folder's parent put on sys.path, before ComfyUI is importable.
    Tests reach the plugin the way ComfyUI does: ``comfyui.load_plugin_nodes()``.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path).resolve() == comfyui_harness.REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # Registered as a plugin (not a conftest hook) so that it also sees the folder above tests/.
    config.pluginmanager.register(_RepoRootIsNotATestPackage(), "diffusion_sae_repo_root")


def _comfyui_missing(error: Exception):
    """Under CI a missing ComfyUI is a broken install, not a reason to skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but {error}", pytrace=False)
    pytest.skip(str(error))


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """ComfyUI imported in this process, our plugin linked into its custom_nodes.

    Returns the harness module: ``comfyui.load_plugin_nodes()``, ``comfyui.execute_graph(prompt)``,
    ``comfyui.plugin_module()``; ``import nodes`` / ``import comfy`` now give ComfyUI's.
    """
    try:
        comfyui_harness.prepare_comfyui(tmp_path_factory.mktemp("comfyui"))
    except comfyui_harness.ComfyUINotFound as error:
        _comfyui_missing(error)
    return comfyui_harness


@pytest.fixture(scope="session")
def comfyui_server(tmp_path_factory):
    """Base URL of a real ComfyUI server (main.py, CPU) with our plugin in its custom_nodes."""
    try:
        comfyui_harness.find_comfyui_dir()
    except comfyui_harness.ComfyUINotFound as error:
        _comfyui_missing(error)
    with comfyui_harness.comfyui_server(tmp_path_factory.mktemp("comfyui-server")) as url:
        yield url


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models' maths is smaller than the cost of a second intra-op thread: on a busy 2-core machine the
    two threads' waiting made each sampling up to ten times slower. For a module of tiny-model samplings
    that compare only with each other; restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
