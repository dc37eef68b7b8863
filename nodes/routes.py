"""The feature browser's HTTP routes, on ComfyUI's own server (``PromptServer.instance.routes``).

A dictionary is named as ComfyUI's ``models/sae`` list names it; only files in that list, and the feature index
folder beside each (``<name>.features/``, see :func:`sae_core.feature_index.index_folder_for`), are ever read.
Anything else (a path, ``..``, a name that is not listed) is a 404 that names only what was asked for.

    GET /diffusion_sae/dictionaries                          every dictionary: header, site, has it an index
    GET /diffusion_sae/features?dictionary=&offset=&limit=&sort=&q=   one page of feature rows
    GET /diffusion_sae/feature?dictionary=&id=               one feature's full record
    GET /diffusion_sae/tile?dictionary=&id=&rank=            a top image with the feature's heatmap overlaid (PNG)
    GET /diffusion_sae/chart?dictionary=&id=&kind=           its activation histogram or timestep profile (PNG)

Errors answer ``{"error": "<one line>"}`` with 400 (a bad parameter) or 404 (no such dictionary or index).
"""
from __future__ import annotations

import io as bytes_io
import logging
import os
from pathlib import Path
from typing import Any, Callable

from ..sae_core import SAEError
from ..sae_core.feature_index import (HISTOGRAM_EDGES, PAGE_SIZE, PROGRESS_BINS, FeatureIndex, index_folder_for,
                                      open_index)
from ..sae_core.fileformat import read_header
from ..sae_core.plots import histogram_chart, line_chart
from .common import SAE_FOLDER, sae_files

log = logging.getLogger(__name__)
PREFIX = "/diffusion_sae"
CHARTS = ("histogram", "timesteps")
_registered = False
_open: dict[str, tuple[float, FeatureIndex]] = {}
"""Open indexes by dictionary name, with the mtime of the index.json they were read from."""


class NotFound(Exception):
    """A dictionary or index that is not there; its message names only what the request asked for."""


class BadRequest(Exception):
    """A query parameter of the wrong type or range."""


def dictionary_path(name: str) -> Path:
    """The file of dictionary ``name``, if and only if ComfyUI lists it in ``models/sae``."""
    import folder_paths

    if not isinstance(name, str) or name not in sae_files():
        raise NotFound(f"no dictionary named {name!r} in models/sae; pick one from the list")
    path = folder_paths.get_full_path(SAE_FOLDER, name)
    roots = [os.path.realpath(root) for root in folder_paths.get_folder_paths(SAE_FOLDER)]
    if path is None or not any(os.path.realpath(path).startswith(root + os.sep) for root in roots):
        raise NotFound(f"no dictionary named {name!r} in models/sae; pick one from the list")
    return Path(path)


def feature_index(name: str) -> FeatureIndex:
    """The index beside dictionary ``name`` (reopened when it was rebuilt)."""
    folder = index_folder_for(dictionary_path(name))
    header = folder / "index.json"
    if not header.is_file():
        raise NotFound(f"{name} has no feature index yet: build it with the Build Feature Index node, or run "
                       f"python -m training atlas --dictionary <this file> --prompts <file> --beside")
    stamp = header.stat().st_mtime
    cached = _open.get(name)
    if cached is None or cached[0] != stamp:
        cached = (stamp, open_index(folder))
        _open[name] = cached
    return cached[1]


def public(message: str) -> str:
    """``message`` with the server's models/sae folders named as ``models/sae``: a damaged index's error must not
    tell a browser where the server keeps its files."""
    import folder_paths

    for root in folder_paths.get_folder_paths(SAE_FOLDER):
        for spelling in {os.path.realpath(root), os.path.abspath(root), root}:
            message = message.replace(spelling, "models/sae")
    return message


def int_param(query: dict, name: str, default: int | None = None, low: int = 0, high: int | None = None) -> int:
    text = query.get(name)
    if text is None:
        if default is None:
            raise BadRequest(f"missing parameter {name!r}")
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name}={text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        raise BadRequest(f"{name}={value} is out of range ({low}..{'' if high is None else high})")
    return value


def list_dictionaries(query: dict) -> dict[str, Any]:
    rows = []
    for name in sae_files():
        row: dict[str, Any] = {"name": name, "indexed": False}
        path = None
        try:
            path = dictionary_path(name)
            config = read_header(path)
            site = config.get("site") or {}
            row.update(kind=config.get("kind"), n_latents=config.get("n_latents"), d_in=config.get("d_in"),
                       site=f"{site.get('block')}:{site.get('stream')}" if site.get("block") else None)
            row["indexed"] = (index_folder_for(path) / "index.json").is_file()
        except (SAEError, NotFound) as err:
            row["problem"] = public(str(err).replace(str(path), name) if path is not None else str(err))
        rows.append(row)
    return {"dictionaries": rows}


def features_page(query: dict) -> dict[str, Any]:
    index = feature_index(query.get("dictionary", ""))
    return index.page(offset=int_param(query, "offset", 0), limit=int_param(query, "limit", 64, 1, PAGE_SIZE),
                      sort=query.get("sort", "frequency"), query=query.get("q") or None)


def feature_record(query: dict) -> dict[str, Any]:
    index = feature_index(query.get("dictionary", ""))
    record = index.feature(int_param(query, "id"))
    return {**record, "label": index.label(record["id"]), "n_latents": index.n_latents,
            "header": {k: index.header[k] for k in ("dictionary", "settings", "counts") if k in index.header}}


def tile_png(query: dict) -> bytes:
    index = feature_index(query.get("dictionary", ""))
    return png_bytes(index.tile(int_param(query, "id"), int_param(query, "rank", 0)))


def chart_png(query: dict) -> bytes:
    index = feature_index(query.get("dictionary", ""))
    feature, kind = int_param(query, "id"), query.get("kind", "histogram")
    if kind not in CHARTS:
        raise BadRequest(f"kind={kind!r}: use one of {', '.join(CHARTS)}")
    record = index.feature(feature)
    return png_bytes(feature_chart(index, record, kind))


def feature_chart(index: FeatureIndex, record: dict[str, Any], kind: str):
    """A feature's activation histogram, or its firing rate over sampling progress beside its cond/uncond rates."""
    name = f"feature {record['id']}"
    if kind == "histogram":
        return histogram_chart(HISTOGRAM_EDGES, record["histogram"], f"{name}: activation when firing",
                               x_label="activation", y_label="tokens", log_x=True)
    edges = (index.header.get("profile") or {}).get("edges") or [b / PROGRESS_BINS for b in range(PROGRESS_BINS + 1)]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    rates = record["timesteps"]["rate"]
    series = {"firing rate": list(zip(centres, rates))}
    cond, uncond = (record.get("guidance") or {}).get("rate", [None, None])[:2]
    for group, rate in (("cond rows (all steps)", cond), ("uncond rows (all steps)", uncond)):
        if rate:
            series[group] = [(edges[0], rate), (edges[-1], rate)]
    return line_chart(series, f"{name}: when it fires", x_label="sampling progress (0 = first step)",
                      y_label="fraction of tokens firing")


def png_bytes(image) -> bytes:
    buffer = bytes_io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def register_routes() -> bool:
    """Add the routes to ComfyUI's running server; False when there is none (ComfyUI run without its server)."""
    global _registered
    if _registered:
        return True
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None or not hasattr(instance, "routes"):
        return False
    from aiohttp import web

    def route(handler: Callable[[dict], Any], respond: Callable[[Any], Any]):
        """An aiohttp handler: ``respond(handler(query))``, or the error as one line of JSON."""
        async def answer(request):
            try:
                return respond(handler(dict(request.query)))
            except BadRequest as err:
                return web.json_response({"error": str(err)}, status=400)
            except (NotFound, SAEError) as err:
                return web.json_response({"error": public(str(err))}, status=404 if isinstance(err, NotFound) else 400)
            except Exception as err:  # a bug of ours: logged in full, answered in one line
                log.exception("diffusion_sae: the feature browser's route failed")
                return web.json_response({"error": f"internal error in diffusion_sae ({type(err).__name__}); the "
                                                   "server log has the details"}, status=500)
        return answer

    def png(body: bytes):
        return web.Response(body=body, content_type="image/png", headers={"Cache-Control": "max-age=60"})

    routes = instance.routes
    routes.get(f"{PREFIX}/dictionaries")(route(list_dictionaries, web.json_response))
    routes.get(f"{PREFIX}/features")(route(features_page, web.json_response))
    routes.get(f"{PREFIX}/feature")(route(feature_record, web.json_response))
    routes.get(f"{PREFIX}/tile")(route(tile_png, png))
    routes.get(f"{PREFIX}/chart")(route(chart_png, png))
    _registered = True
    return True
