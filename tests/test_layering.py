"""The package's layers import downwards only (issue 20): `rl/` never imports the run config, the component
builders or the entry points (it receives its own config objects), and `evaluation/` never imports the
`evaluate` CLI. Read from the source (module-level and in-function imports alike)."""
from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "masa_jax"


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _violations(package: str, forbidden: tuple[str, ...], root: pathlib.Path = PKG) -> dict[str, list[str]]:
    bad = {}
    for path in sorted((root / package).rglob("*.py")):
        hits = sorted(m for m in _imports(path) if m in forbidden)
        if hits:
            bad[str(path.relative_to(root))] = hits
    return bad


def test_rl_imports_neither_the_run_config_nor_the_entry_points():
    forbidden = tuple(f"masa_jax.{m}" for m in ("components", "config", "train", "evaluate", "export", "dry_run"))
    assert _violations("rl", forbidden) == {}


def test_evaluation_does_not_import_the_evaluate_cli():
    assert _violations("evaluation", ("masa_jax.evaluate", "masa_jax.train")) == {}


def test_the_check_sees_an_upward_import(tmp_path):
    """The scan finds both import forms (so the two tests above can fail)."""
    rl = tmp_path / "rl"
    rl.mkdir()
    (rl / "bad.py").write_text("def f():\n    from masa_jax import components\n    import masa_jax.train\n")
    assert _violations("rl", ("masa_jax.components", "masa_jax.train"), root=tmp_path) == {
        "rl/bad.py": ["masa_jax.components", "masa_jax.train"]}
