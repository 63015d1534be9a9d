"""The layout's rules, read from the source: imports point down only, no two folders import each
other, go/ holds no Python, and no module grows into a drawer of concerns (~500 lines).

Layers, bottom to top: nanollama_base (shard format, atomic files, CLI errors) -> data/ and the
model library nanollama_jax/ (which reads configs/) -> export/ -> benchmarks/ and tests/."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("nanollama_base", "data", "configs", "nanollama_jax", "export", "benchmarks", "tests")

# What each folder may import of ours (its own modules aside).
ALLOWED = {
    "nanollama_base": set(),
    "data": {"nanollama_base"},
    "configs": set(),
    "nanollama_jax": {"nanollama_base", "data", "configs"},
    "export": {"nanollama_base", "data", "configs", "nanollama_jax"},
    # the Go benchmark reuses the Go tests' GGUF fixtures (tests/go_fixtures.py); tests never import benchmarks
    "benchmarks": {"nanollama_base", "data", "configs", "nanollama_jax", "export", "tests"},
    "tests": {"nanollama_base", "data", "configs", "nanollama_jax", "export"},
}
MAX_LINES = 500  # every module, tests included: split a bigger one by concern (shared fixtures: tests/*_fixtures.py)


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def our_top_level_names() -> dict[str, str]:
    """Importable top-level name -> the folder it belongs to. tests/ is on sys.path when pytest
    runs, so its helper modules (go_fixtures) import by their bare names."""
    names = {folder: folder for folder in FOLDERS}
    names.update({p.stem: "tests" for p in (ROOT / "tests").glob("*.py")})
    return names


def imported_folders(path: Path, folder: str, names: dict[str, str]) -> set[str]:
    """Our folders imported anywhere in the module (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside its own package
                modules = [folder]
            else:
                modules = [node.module]
        else:
            continue
        found.update(names[m.split(".")[0]] for m in modules if m.split(".")[0] in names)
    found.discard(folder)
    return found


def import_graph() -> dict[str, dict[str, list[str]]]:
    """folder -> imported folder -> the modules that import it."""
    names = our_top_level_names()
    graph: dict[str, dict[str, list[str]]] = {f: {} for f in FOLDERS}
    for folder in FOLDERS:
        for path in python_files(folder):
            for target in imported_folders(path, folder, names):
                graph[folder].setdefault(target, []).append(str(path.relative_to(ROOT)))
    return graph


def test_the_parser_sees_imports_of_every_kind(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import data.prepare\nfrom nanollama_base.files import atomic_path\nfrom . import sibling\n"
                      "def f():\n    from export import gguf\n    import go_fixtures\n    import numpy\n")
    names = our_top_level_names()
    assert imported_folders(module, "nanollama_jax", names) == {"data", "nanollama_base", "export", "tests"}


def test_no_two_folders_import_each_other():
    graph = import_graph()
    pairs = [(a, b, graph[a][b][0], graph[b][a][0]) for a in FOLDERS for b in graph[a]
             if a < b and a in graph[b]]
    assert not pairs, "folders importing each other: " + "; ".join(
        f"{a} <-> {b} ({ma} imports {b}, {mb} imports {a})" for a, b, ma, mb in pairs)


def test_imports_point_down_only():
    graph = import_graph()
    wrong = [f"{module} imports {target}" for folder, targets in graph.items()
             for target, modules in targets.items() if target not in ALLOWED[folder] for module in modules]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_go_holds_no_python():
    assert not list((ROOT / "go").rglob("*.py"))


def test_no_module_is_a_drawer():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for f in FOLDERS for p in python_files(f)}
    too_long = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"


def test_every_import_resolves():
    """Every `from X import Y` in the library, including the lazy ones inside functions, names a module
    and an attribute that exist: a file moved or renamed cannot leave an import that fails only when
    its command runs."""
    import importlib

    broken = []
    for folder in ("nanollama_base", "data", "nanollama_jax", "export", "benchmarks"):
        for path in python_files(folder):
            parts = path.relative_to(ROOT).with_suffix("").parts
            package = ".".join(parts if path.name == "__init__.py" else parts[:-1]).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or node.module in our_top_level_names().keys() - set(FOLDERS):
                    continue
                name = "." * node.level + (node.module or "")
                try:
                    module = importlib.import_module(name, package if node.level else None)
                except ImportError as e:
                    broken.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}: {e}")
                    continue
                for alias in node.names:
                    if alias.name != "*" and not hasattr(module, alias.name) and \
                            importlib.util.find_spec(f"{module.__name__}.{alias.name}") is None:
                        broken.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name} has no {alias.name}")
    assert not broken, "imports that fail: " + "; ".join(broken)
