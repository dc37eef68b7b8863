"""Who may import whom. The plugin stands alone: ``sae_core`` (the engine) knows neither ComfyUI nor
diffusers; the plugin (``__init__.py``, ``nodes/``) never reaches ``training/``; ``organism/`` is shared by
both sides, so it imports neither ``sae_core`` nor ``training`` and, outside its pipelines, no diffusers.

Static checks read the files with ``ast``; dynamic ones import in a fresh interpreter, so ``sys.modules``
holds only what the imports under test pulled in.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SUBPROCESS_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- helpers


def imported_names(path: Path) -> Iterator[tuple[int, int, str]]:
    """``(line, level, dotted name)`` for every import in ``path``, relative ones resolved from the repo root.

    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule). A relative import that climbs
    above the repo root yields a name starting with ``^``.
    """
    package = list(path.relative_to(REPO).parent.parts)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            elif node.level - 1 > len(package):
                base = "^" + (node.module or "")
            else:
                base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            if base:
                yield node.lineno, node.level, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, node.level, f"{base}.{alias.name}" if base else alias.name


def top(name: str) -> str:
    return name.split(".")[0]


def run_python(code: str, out: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter from the repo root; it writes JSON to ``sys.argv[1]``, returned here."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT_S, env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"the subprocess failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())


def modules_named(modules: dict[str, str | None], roots: set[str]) -> list[str]:
    return sorted(name for name in modules if top(name) in roots)


def plugin_files() -> list[Path]:
    return [REPO / "__init__.py", *sorted((REPO / "nodes").rglob("*.py"))]


# ----------------------------------------------------------------------------- sae_core


def test_importing_every_sae_core_module_imports_neither_comfyui_nor_diffusers(tmp_path):
    modules = run_python("""
        import importlib, json, pkgutil, sys
        import sae_core
        names = [m.name for m in pkgutil.walk_packages(sae_core.__path__, "sae_core.")]
        for name in names:
            importlib.import_module(name)
        json.dump({"imported": names, "modules": {n: getattr(m, "__file__", None) for n, m in sys.modules.items()}},
                  open(sys.argv[1], "w"))
    """, tmp_path / "out.json")
    assert "sae_core.sae" in modules["imported"]  # the walk found the package's modules
    assert modules_named(modules["modules"], {"comfy", "nodes", "diffusers", "training"}) == []


# ----------------------------------------------------------------------------- the plugin


def test_no_plugin_file_imports_training():
    offenders = [f"{path.relative_to(REPO)}:{line}: {name}" for path in plugin_files()
                 for line, _, name in imported_names(path) if top(name) == "training"]
    assert offenders == []


@pytest.fixture(scope="module")
def plugin_load(comfyui, tmp_path_factory) -> dict:
    """What ComfyUI's own loader leaves in ``sys.modules`` after loading the plugin, in a fresh interpreter."""
    base = tmp_path_factory.mktemp("boundaries-comfyui")
    return run_python(f"""
        import json, sys
        sys.path.insert(0, {str(TESTS)!r})
        import comfyui_harness as harness
        harness.prepare_comfyui({str(base)!r})
        harness.load_plugin_nodes()
        json.dump({{"plugin": harness.plugin_module().__name__,
                   "modules": {{n: getattr(m, "__file__", None) for n, m in sys.modules.items()}}}},
                  open(sys.argv[1], "w"))
    """, base / "out.json", env={"COMFYUI_DIR": str(comfyui.find_comfyui_dir())})


def test_comfyui_loads_the_plugin_without_importing_training(plugin_load):
    plugin, modules = plugin_load["plugin"], plugin_load["modules"]
    assert f"{plugin}.nodes.organism_nodes" in modules and f"{plugin}.organism.comfy" in modules

    def is_training(name: str, file: str | None) -> bool:
        relative = name[len(plugin) + 1:] if name.startswith(plugin + ".") else name
        return top(relative) == "training" or (file is not None and (REPO / "training") in Path(file).resolve().parents)

    assert sorted(name for name, file in modules.items() if is_training(name, file)) == []


def test_comfyui_loads_the_plugin_without_importing_diffusers(plugin_load):
    assert modules_named(plugin_load["modules"], {"diffusers"}) == []


# ----------------------------------------------------------------------------- organism


def test_organism_imports_neither_sae_core_nor_training_and_itself_only_relatively():
    offenders = []
    for path in sorted((REPO / "organism").rglob("*.py")):
        for line, level, name in imported_names(path):
            outside = level > 0 and top(name) != "organism"  # a relative import that leaves the package
            absolute_self = level == 0 and top(name) == "organism"  # breaks as diffusion_sae.organism in ComfyUI
            if outside or absolute_self or top(name) in {"sae_core", "training", "nodes"}:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {'.' * level}{name}")
    assert offenders == []


def test_importing_organism_and_encoding_a_prompt_imports_no_diffusers_comfyui_sae_core_or_training(tmp_path):
    """Everything but the diffusers pipelines, and the plugin's runtime path (a prompt's conditioning)."""
    modules = run_python("""
        import importlib, json, pkgutil, sys
        import organism
        names = [m.name for m in pkgutil.iter_modules(organism.__path__, "organism.") if m.name != "organism.pipelines"]
        for name in names:
            importlib.import_module(name)
        from organism.comfy import conditioning
        [[tokens, extra]] = conditioning("a handwritten seven")
        assert tuple(tokens.shape) == (1, 16, 384), tokens.shape
        json.dump({"imported": names, "modules": {n: getattr(m, "__file__", None) for n, m in sys.modules.items()}},
                  open(sys.argv[1], "w"))
    """, tmp_path / "out.json")
    assert {"organism.comfy", "organism.text", "organism.models"} <= set(modules["imported"])
    assert modules_named(modules["modules"], {"diffusers", "comfy", "sae_core", "training"}) == []


def test_every_package_of_ours_is_listed_for_installation():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    ours = {".".join(init.parent.relative_to(REPO).parts)
            for top in ("sae_core", "organism", "training", "nodes") for init in (REPO / top).rglob("__init__.py")}
    assert ours == listed
