"""Every third-party package that masa_jax/ imports is declared in setup.py, so a plain
`pip install -e .` runs the README's first command."""
import ast
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"absl": "absl-py", "orbax": "orbax-checkpoint", "yaml": "PyYAML", "tensorflow_datasets":
                 "tensorflow-datasets", "PIL": "Pillow", "sklearn": "scikit-learn"}
# Imported only on opt-in paths, with an install hint: declared as extras instead.
OPTIONAL = {"tensorflow-datasets": "tfds", "wandb": "wandb", "lm-eval": "eval", "libtpu": "tpu"}
# Not imported by masa_jax, but needed at run time: transformers' apply_chat_template needs jinja2 and
# transformers does not require it.
INDIRECT = {"jinja2"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~; ]", name, maxsplit=1)[0]).lower()


def _setup_requirements() -> tuple[set, dict]:
    tree = ast.parse((REPO / "setup.py").read_text())
    install = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   and any(getattr(t, "id", None) == "INSTALL_REQUIRES" for t in n.targets))
    extras = next(ast.literal_eval(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                  for k in n.keywords if k.arg == "extras_require")
    return {_norm(r) for r in install}, {name: {_norm(r) for r in reqs} for name, reqs in extras.items()}


def _third_party_imports() -> dict[str, str]:
    """Distribution name -> one file that imports it (top-level names of absolute imports)."""
    found = {}
    for path in sorted((REPO / "masa_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "masa_jax" and top not in sys.stdlib_module_names:
                    found.setdefault(_norm(DISTRIBUTIONS.get(top, top)), str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared_in_setup_py():
    install, extras = _setup_requirements()
    imports = _third_party_imports()
    assert {"jax", "etils", "ml-dtypes", "pyarrow"} <= set(imports)  # the scan sees the imports at all
    missing = {dist: where for dist, where in imports.items() if dist not in install and dist not in OPTIONAL}
    assert not missing, f"imported but not in setup.py install_requires: {missing}"
    assert {_norm(d) for d in INDIRECT} <= install
    for dist, extra in OPTIONAL.items():
        assert dist in extras.get(extra, set()), f"{dist} belongs in extras_require[{extra!r}]"
