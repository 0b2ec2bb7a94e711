"""The installed package's shape and the layer rule, checked from the sources.

Layers: ctrloop.core <- ctrloop.io <- ctrloop.trainer, ctrloop.service, ctrloop.sim, ctrloop.dev
<- ctrloop.cli. A module may import its own layer and the ones to its left; nothing but the CLI
imports ctrloop.dev. Tests and benchmarks may import anything public.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"ctrloop": ROOT / "ctrloop", "ctrloop.service": ROOT / "service",
           "ctrloop.trainer": ROOT / "trainer"}
FOLDER_NAMES = {path.name for path in FOLDERS.values()}

# What each layer may import (besides itself).
ALLOWED = {
    "ctrloop.core": set(),
    "ctrloop.io": {"ctrloop.core"},
    "ctrloop.sim": {"ctrloop.core"},
    "ctrloop.trainer": {"ctrloop.core", "ctrloop.io"},
    "ctrloop.service": {"ctrloop.core", "ctrloop.io"},
    "ctrloop.dev": {"ctrloop.core", "ctrloop.io", "ctrloop.sim", "ctrloop.trainer",
                    "ctrloop.service"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "ctrloop" and parts and parts[0] in ("service", "trainer"):
                continue
            out[name] = path
    return out


def _layer(module: str) -> str | None:
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = module.split(".")[: -node.level if path.name != "__init__.py"
                                          else len(module.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return out


def test_every_package_folder_is_installed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert found == listed, f"pyproject.toml [tool.setuptools] packages is out of date: " \
                            f"missing {sorted(found - listed)}, extra {sorted(listed - found)}"


def test_no_import_runs_back_up_the_layers() -> None:
    bad = []
    for module, path in _modules().items():
        layer = _layer(module)
        for name in _imports(path, module):
            if not name.startswith("ctrloop.") and name != "ctrloop":
                if name in ("service", "trainer") or name.startswith(("service.", "trainer.")):
                    bad.append(f"{module} imports top-level {name} (use ctrloop.{name})")
                continue
            target = _layer(name)
            if layer is None:  # ctrloop/__init__.py and cli.py: the composition root
                continue
            if target is None:
                if name not in ("ctrloop", "ctrloop.__version__"):
                    bad.append(f"{module} ({layer}) imports {name}")
            elif target != layer and target not in ALLOWED[layer]:
                bad.append(f"{module} ({layer}) imports {name} ({target})")
    assert not bad, "\n".join(sorted(bad))


def test_wheel_installs_service_and_trainer_under_ctrloop(tmp_path: Path) -> None:
    # Built from a copy of the tracked files: setuptools writes build/ beside the sources.
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if name.split("/")[0] in {"pyproject.toml", "README.md", *FOLDER_NAMES}:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(src)], check=True, timeout=300)
    wheel = next(tmp_path.glob("ctrloop-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"ctrloop"}, tops
    assert "ctrloop/service/app.py" in names and "ctrloop/trainer/pipeline.py" in names
    assert any(n.startswith("ctrloop/service/static/swagger-ui/") for n in names)
