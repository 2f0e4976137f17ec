"""Lay out the import package ``edgekeeper`` as symlinks, for tools that cannot follow
``[tool.setuptools.package-dir]``.

The repository keeps its stages as top-level folders (device/, cloud/, protocol/, models/) that
install as ``edgekeeper.device`` and so on. mypy and import-linter find packages on disk by
their dotted path, so ``mypy -p edgekeeper.device`` finds nothing in the repository itself. This
script reads the mapping from pyproject.toml (never a second copy of it) and builds
``<dest>/edgekeeper/...`` whose files are symlinks to the real ones, so the tools see exactly
the package that pip installs and a change to a file is seen at once.

Usage: ``python scripts/package_tree.py DEST`` (prints DEST); ``scripts/check`` calls it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10: tomli is a dependency there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def build(dest: Path) -> Path:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mapping: dict[str, str] = pyproject["tool"]["setuptools"]["package-dir"]
    if dest.exists():
        shutil.rmtree(dest)
    for package, folder in sorted(mapping.items()):
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / folder).glob("*.py")):
            (target / source.name).symlink_to(source)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: package_tree.py DEST")
    print(build(Path(sys.argv[1]).resolve()))
