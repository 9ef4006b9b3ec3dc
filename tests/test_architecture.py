"""The package's layers import one way (docs/architecture.md).

Every ``import mmvae...`` in the package, module-level or inside a function, must go to
the same layer or one below. The walk is over the source (``ast``), so an upward
import hidden in a function body fails as well.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import mmvae

ROOT = Path(mmvae.__file__).parent

# Lower number = lower layer. A module may import its own layer and any lower one.
LAYERS = {
    "mmvae": 0, "mmvae.errors": 0, "mmvae.progress": 0, "mmvae.atomic": 0, "mmvae.sharding": 0,
    "mmvae.data": 1,
    "mmvae.config": 2,
    "mmvae.models": 3,
    "mmvae.objectives": 4,
    "mmvae.runs": 5,
    "mmvae.retrieval": 6,
    "mmvae.pacs": 7,
    "mmvae.serve": 8,
    "mmvae.train": 9,
    "mmvae.quickstart": 10,
    "mmvae.experiments": 11,
    "mmvae.cli": 12,
}


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name, LAYERS[name]
    raise AssertionError(f"module {module} is in no layer: add it to LAYERS and docs/architecture.md")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import of an ``mmvae`` module in the file."""
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mmvae"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "mmvae":
                continue
            for a in node.names:    # `from mmvae.models import fusion` imports the module mmvae.models.fusion
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() else base))
    return out


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        src_layer, src_rank = layer_of(module_name(path))
        for line, target in package_imports(path):
            dst_layer, dst_rank = layer_of(target)
            if dst_rank > src_rank:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {src_layer} (layer {src_rank}) imports "
                           f"{target} ({dst_layer}, layer {dst_rank})")
    return bad


def test_layers_import_one_way():
    assert upward_imports() == []


def test_walker_sees_an_upward_import_inside_a_function(tmp_path, monkeypatch):
    """The check itself can fail: a function-local upward import is found."""
    fake = tmp_path / "mmvae"
    (fake / "models").mkdir(parents=True)
    (fake / "train").mkdir()
    for p in (fake / "__init__.py", fake / "models" / "__init__.py", fake / "train" / "__init__.py",
              fake / "train" / "loop.py"):
        p.write_text("")
    (fake / "models" / "mvae.py").write_text("def f():\n    from mmvae.train.loop import x\n    return x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    bad = upward_imports()
    assert len(bad) == 1 and "mmvae/models/mvae.py:2" in bad[0] and "mmvae.train.loop" in bad[0]


def test_every_module_is_in_a_layer_and_the_package_has_no_cycle():
    """Each module imports on its own (a cycle between layers would need a lazy import to load)."""
    import importlib
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        layer_of(name)
        importlib.import_module(name)
