"""What the content hash of a dictionary file costs: save and load of a ~100 MB dictionary with and without it.

    python -m bench.hash_cost             # TopK SAE, d_in=2048, n_latents=6144: 100 MB of float32 weights
    python -m bench.hash_cost --small     # smoke run of the same code

Rows, median seconds of ``--iters`` runs after one warm-up, files in a temporary folder:

* ``hash alone``: :func:`~sae_core.fileformat.content_hash` over the config and every tensor;
* ``save with hash`` / ``save without hash``: ``save_dictionary`` as users run it, and the same
  steps (finiteness check, atomic write of the same tensors and header) minus the hash;
* ``load with hash`` / ``load without hash``: ``load_native`` of the saved file, which verifies the
  hash, and of a copy without it. Both read from the page cache (the file was just written), the
  case where the hash is the largest share of the time.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.timing import timed, write_rows
from sae_core import SparseAutoencoder
from sae_core.atomic import save_safetensors_atomic
from sae_core.fileformat import FORMAT, FORMAT_VERSION, check_finite, content_hash, load_native, save_dictionary


def unhashed_save(sae: SparseAutoencoder, path: Path) -> None:
    """What save_dictionary does (the finiteness check, the atomic write), without the content hash."""
    check_finite(sae, path)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(sae.config())}
    save_safetensors_atomic(path, sae.state_dict(), metadata)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="d_in=64, n_latents=256: a smoke run")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    d_in, n_latents = (64, 256) if args.small else (2048, 6144)
    sae = SparseAutoencoder(d_in, n_latents, 32, seed=0)
    megabytes = sum(t.numel() * t.element_size() for t in sae.state_dict().values()) / 1e6
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        hashed, plain = Path(folder) / "hashed.safetensors", Path(folder) / "plain.safetensors"
        tensors = {name: t.detach().contiguous() for name, t in sae.state_dict().items()}
        config_text = json.dumps(sae.config())
        rows = [
            {"name": "hash alone", "seconds": timed(lambda: content_hash(config_text, tensors), cpu, 1, args.iters)},
            {"name": "save with hash", "seconds": timed(lambda: save_dictionary(sae, hashed), cpu, 1, args.iters)},
            {"name": "save without hash", "seconds": timed(lambda: unhashed_save(sae, plain), cpu, 1, args.iters)},
            {"name": "load with hash", "seconds": timed(lambda: load_native(hashed), cpu, 1, args.iters)},
            {"name": "load without hash", "seconds": timed(lambda: load_native(plain), cpu, 1, args.iters)},
        ]
    print(f"dictionary: d_in={d_in}, n_latents={n_latents}, {megabytes:.1f} MB of tensors")
    for row in rows:
        print(f"{row['name']:<20} {row['seconds']:.3f} s")
    write_rows(args.json, args, rows, cpu)
    return rows


if __name__ == "__main__":
    main()
