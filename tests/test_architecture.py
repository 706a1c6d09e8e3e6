"""The package's shape: modules of a size one can read, and no module reaching into another's private names.
(The one-way imports between the stages are import-linter's contracts in pyproject.toml, run by CI.)"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lsun_ddpm

PACKAGE = Path(lsun_ddpm.__file__).parent
TESTS = Path(__file__).parent
MAX_LINES = 420  # "about 400": a module past that holds more than one concern


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def test_every_stage_is_a_sub_package_with_its_modules():
    stages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert stages == {"model", "data", "train", "sample", "evaluate", "publish", "distill"}


def test_the_tests_have_one_folder_per_stage():
    stages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    folders = {path.name for path in TESTS.iterdir() if path.is_dir() and any(path.glob("test_*.py"))}
    assert folders == stages


def test_no_module_is_longer_than_one_concern_needs():
    long = {str(path.relative_to(PACKAGE)): n for path in modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_module_imports_another_modules_private_name():
    private = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lsun_ddpm")):
                private += [f"{path.relative_to(PACKAGE)}: {alias.name}" for alias in node.names
                            if alias.name.startswith("_") and alias.name != "__future__"]
    assert private == []


def test_publishing_a_folder_imports_neither_torch_nor_diffusers():
    """`lsun-ddpm push` and `push-space` read and upload files: they start in a moment, not after torch."""
    code = ("import sys; import lsun_ddpm.publish.upload, lsun_ddpm.publish.space_upload, lsun_ddpm.publish.card; "
            "print(sorted({'torch', 'diffusers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
