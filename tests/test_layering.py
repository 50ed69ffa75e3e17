"""The package's layering, read from its source with `ast`: no two modules import each other (directly or round a
longer circle), and the bottom of it (`config`, `runtime`, the `rollout` package) imports nothing from `recipes` or
`train`.

1. Imports inside functions count as module-level ones do: a lazy import is a dependency all the same.
2. An import names the module it reaches: `from selfimprove.recipes import stages` reaches `selfimprove.recipes.stages`,
   `from selfimprove.recipes import name_of` the package `selfimprove.recipes`. The parent packages Python runs
   first are not edges: a package's `__init__` may import its submodules, which import each other through it.
3. Imports Python resolves at run time (`importlib.import_module(name)`) are not read.
"""

import ast
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "selfimprove"
LOW = ("config", "runtime", "rollout")  # the bottom of the package (a package: its modules too) ...
HIGH = ("recipes", "train")  # ... imports nothing from these


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at `root`, by its dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(root: Path) -> dict[str, dict[str, int]]:
    """For each module of the package at `root`, the package's modules it imports, with the line of the first such
    import."""
    known = modules(root)
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:  # `import a.b.c` of a module a.b: an attribute c
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle of imports through each group of modules that reach each other, as a path back to its start."""
    found, placed = [], set()
    for start in sorted(graph):
        if start in placed:
            continue
        path = _shortest_path(graph, start, start)
        if path:
            group = {m for m in graph if _shortest_path(graph, start, m) and _shortest_path(graph, m, start)}
            placed |= group
            found.append(path)
    return found


def _shortest_path(graph: dict[str, dict[str, int]], start: str, end: str) -> list[str] | None:
    """start -> ... -> end by imports, at least one step long; None if there is none."""
    came_from, todo = {}, deque([start])
    while todo:
        module = todo.popleft()
        for target in sorted(graph.get(module, ())):
            if target == end:
                path = [end, module]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1]
            if target not in came_from and target != start:
                came_from[target] = module
                todo.append(target)
    return None


def within(module: str, package: str, names: tuple[str, ...]) -> bool:
    """Whether `module` is one of `names` of `package`, or inside one."""
    return any(module == f"{package}.{n}" or module.startswith(f"{package}.{n}.") for n in names)


def problems(root: Path) -> list[str]:
    """What is wrong with the layering of the package at `root`, one line each, naming the modules."""
    graph, package = imports(root), root.name
    out = [f"import cycle: {' -> '.join(path)}" for path in cycles(graph)]
    for low in (module for module in sorted(graph) if within(module, package, LOW)):
        for target, line in sorted(graph[low].items()):
            if within(target, package, HIGH):
                out.append(f"{low} imports {target} (line {line}); {', '.join(LOW)} import nothing from "
                           f"{', '.join(HIGH)}")
    return out


def test_the_package_has_no_import_cycle_and_its_bottom_imports_nothing_from_recipes_or_train():
    assert problems(PACKAGE) == []


def test_the_graph_reads_every_kind_of_import_of_the_package():
    graph = imports(PACKAGE)
    assert "selfimprove.recipes.stages" in graph["selfimprove.recipes.loop"]  # from selfimprove.recipes import stages
    assert "selfimprove.train.trainer" in graph["selfimprove.recipes.stages"]  # inside a function
    assert "selfimprove.config" in graph["selfimprove.recipes"]  # from selfimprove.config import ...


def test_cycles_and_upward_imports_are_named(tmp_path):
    """A synthetic package: a and b import each other (b inside a function, relatively), c -> d -> e -> c round a
    longer circle, and config imports from train inside a function; f imports a, which is no cycle."""
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "from pkg import a\n",
        "a.py": "import pkg.b\n",
        "b.py": "def late():\n    from . import a\n",
        "c.py": "from pkg.d import thing\n",
        "d.py": "import pkg.e as e\nthing = 1\n",
        "e.py": "from .c import *\n",
        "f.py": "from pkg import a, c\n",
        "config.py": "import os\n\n\ndef check():\n    from pkg.train.loop import step\n",
        "runtime.py": "from pkg import config\n",
        "train/__init__.py": "",
        "train/loop.py": "from pkg.config import check\n\n\ndef step():\n    pass\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    assert problems(pkg) == [
        "import cycle: pkg.a -> pkg.b -> pkg.a",
        "import cycle: pkg.c -> pkg.d -> pkg.e -> pkg.c",
        "import cycle: pkg.config -> pkg.train.loop -> pkg.config",
        "pkg.config imports pkg.train.loop (line 5); config, runtime, rollout import nothing from recipes, train",
    ]
