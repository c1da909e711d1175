"""Exit 0 when the virtual environment needs `pip install -e '.[test]'`, 1 when it is up to date.

Up to date means: every requirement of pyproject.toml (run and test extras) is installed at a
version it accepts, and dpfl is installed in editable mode from this checkout. `make setup` runs
pip only when this says so, so a dependency added to pyproject.toml (or a clone in another
folder) is installed on the next `make`, and a `make` that changes nothing does not reinstall
dpfl under processes that are importing it (tests run `make` while others run).
"""

from __future__ import annotations

import json
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def missing() -> list[str]:
    from packaging.requirements import Requirement  # in a fresh venv: ImportError -> install

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project.get("optional-dependencies", {}).get("test", [])
    out = []
    for text in wanted:
        req = Requirement(text)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(text)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            out.append(f"{text} (have {version})")
            continue
        for extra in req.extras:  # e.g. flwr[simulation]: what that extra pulls in
            for dep_text in metadata.requires(req.name) or []:
                dep = Requirement(dep_text)
                if dep.marker is None or not dep.marker.evaluate({"extra": extra}):
                    continue
                try:
                    have = metadata.version(dep.name)
                except metadata.PackageNotFoundError:
                    out.append(f"{dep.name} (for {req.name}[{extra}])")
                    continue
                if dep.specifier and not dep.specifier.contains(have, prereleases=True):
                    out.append(f"{dep_text} (have {have}, for {req.name}[{extra}])")
    try:
        url = json.loads(metadata.distribution("dpfl").read_text("direct_url.json") or "{}")
    except metadata.PackageNotFoundError:
        url = {}
    if url.get("url") != ROOT.as_uri() or not url.get("dir_info", {}).get("editable"):
        out.append(f"dpfl (editable from {ROOT})")
    return out


if __name__ == "__main__":
    try:
        need = missing()
    except Exception as err:  # anything unreadable: let pip decide
        need = [f"({type(err).__name__}: {err})"]
    if need:
        print("setup: installing " + ", ".join(need), file=sys.stderr)
    sys.exit(0 if need else 1)
