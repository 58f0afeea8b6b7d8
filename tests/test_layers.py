"""The import direction of ../shared/ARCHITECTURE.md, checked by parsing every module (ast).

A layer may import the layers above it in LAYERS (and itself), never those below. `cli` alone may import
everything, and CLI modules never import each other (except `cli.main`, which dispatches to them by name).
"""

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "muse"
LAYERS = [
    "common", "tokenizer", "data", "tasks", "model", "checkpoint", "distributed", "train",
    "scaling", "infer", "eval", "posttrain", "server", "cli",
]


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    try:
        pkg = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    except ValueError:  # a file outside the package (the self-test below)
        pkg = "muse.common"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield node.lineno, mod
            # `from muse import train` / `from muse.cli import prepare` name a module in `names`
            for a in node.names:
                yield node.lineno, f"{mod}.{a.name}"


def _layer(module: str):
    parts = module.split(".")
    if parts[0] != "muse" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def test_every_layer_is_a_package():
    for layer in LAYERS:
        assert (SRC / layer / "__init__.py").exists(), layer


def test_imports_point_up_the_layer_list():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if len(rel.parts) < 2:
            continue  # muse/__init__.py, muse/__main__.py
        own = rel.parts[0]
        for lineno, mod in _imports(path):
            target = _layer(mod)
            if target is None:
                continue
            if own == "cli":
                parts = mod.split(".")
                if (target == "cli" and rel.name != "main.py" and len(parts) > 2
                        and parts[2] not in ("__init__",) and f"muse.cli.{rel.stem}" != ".".join(parts[:3])):
                    bad.append(f"{rel}:{lineno} imports {mod} (CLI modules never import each other)")
                continue
            if LAYERS.index(target) > LAYERS.index(own):
                bad.append(f"{rel}:{lineno} ({own}) imports {mod} ({target} is below {own})")
    assert not bad, "imports pointing the wrong way:\n" + "\n".join(bad)


def test_the_checker_catches_a_wrong_import(tmp_path):
    # The check above must be able to fail: a fake module in `common` importing `train`.
    src = "from muse.train import trainer\nimport muse.model.transformer\n"
    p = tmp_path / "x.py"
    p.write_text(src)
    mods = [m for _, m in _imports(p)]
    assert "muse.train" in mods and "muse.model.transformer" in mods
    assert LAYERS.index(_layer("muse.train.trainer")) > LAYERS.index("common")
