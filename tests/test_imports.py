"""scripts/package_tree.py lays out exactly the package pip installs, so mypy and import-linter
(scripts/check) see every module and nothing else."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree(dest: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "package_tree.py"), str(dest)],
                   check=True, capture_output=True, text=True)
    return dest


def test_every_module_of_the_tree_is_the_installed_module(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    files = sorted(tree.rglob("*.py"))
    names = {".".join(f.relative_to(tree).with_suffix("").parts).removesuffix(".__init__")
             for f in files}
    assert {"edgekeeper", "edgekeeper.device.gate", "edgekeeper.cloud.queue.redis_streams",
            "edgekeeper.protocol.envelope", "edgekeeper.models"} <= names
    for f in files:
        name = ".".join(f.relative_to(tree).with_suffix("").parts).removesuffix(".__init__")
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        # The symlink points at the very file the import system loads for that name.
        assert f.resolve() == Path(spec.origin).resolve(), name


def test_every_python_file_of_a_mapped_folder_is_in_the_tree(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    linked = {f.resolve() for f in tree.rglob("*.py")}
    for folder in ("edgekeeper", "device", "cloud", "protocol", "models"):
        for source in (ROOT / folder).rglob("*.py"):
            assert source.resolve() in linked, f"{source} is not in the checked package"


def test_a_second_run_replaces_the_tree(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    stray = tree / "edgekeeper" / "stale.py"
    stray.write_text("", encoding="utf-8")
    _tree(tree)
    assert not stray.exists()
