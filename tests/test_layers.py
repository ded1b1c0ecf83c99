"""The package's layering, checked from the source alone (nothing is imported, so this runs in well under a second).

Every `import` and `from ... import` of a module counts, wherever it stands: at the top, inside a function
(a lazy import is still a dependency, only a later one), and inside `if TYPE_CHECKING:` blocks (an
annotation-only import is a design dependency too: the lower layer would have to know the higher one's
types). A call `importlib.import_module("literal")` counts as well. Relative imports are resolved, and
`from pkg import name` is an import of the submodule `pkg.name` when there is one, else of `pkg`.

Checked: (a) the import graph of ddm_node/, router/ and proto/ has no cycle; (b) every import respects
LAYERS: a module imports modules of its own folder (or of a folder in its group, GROUP) and of lower
levels only; (c) LAYERS places every folder there is.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("ddm_node", "router", "proto")

# Folder (relative to the repository root) -> level. Higher levels may import lower ones, never the reverse;
# folders on the same level do not import each other, unless GROUP puts them together.
LAYERS: dict[str, int] = {
    "ddm_node": 0,  # ddm_node/__init__.py only (the version)
    "ddm_node/core": 0,  # errors, config, identity, manifest, model, workdir, events, placement
    "ddm_node/data": 1,
    "router": 1,  # pure math; router and ddm_node.data must not import each other
    "ddm_node/train": 2,
    "ddm_node/swarm": 2,
    "ddm_node/transfer": 2,
    "proto": 2,  # generated gRPC code: part of transfer
    "ddm_node/exchange": 3,
    "ddm_node/ensemble": 3,  # bundle, generate, metrics
    "ddm_node/node": 4,
    "ddm_node/clients": 4,  # assemble, status
    "ddm_node/export": 4,  # a bundle as a diffusers pipeline directory; push to the hub
    "ddm_node/export/remote": 4,  # code that runs inside diffusers (copied into the export; imports none of ours)
    "ddm_node/observe": 5,  # metrics, dashboard server and view, tensorboard (reads node and clients)
    "ddm_node/cli": 6,  # main, demo, localnet
}
# Folders that count as one: they may import each other although they share a level.
GROUP: dict[str, str] = {"ddm_node": "ground", "ddm_node/core": "ground", "proto": "transfer",
                         "ddm_node/transfer": "transfer",
         "ddm_node/export": "export", "ddm_node/export/remote": "export"}


@dataclass(frozen=True, order=True)
class Import:
    importer: str  # dotted module names
    imported: str
    path: str  # the importer's file, relative to the root scanned
    line: int


def module_files(root: Path, roots: tuple[str, ...] = ROOTS) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `roots` (a package is named by its __init__.py)."""
    found: dict[str, Path] = {}
    for top in roots:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_from(module: str, path: Path, level: int, target: str | None) -> str:
    """The absolute module a `from <dots><target> import ...` in `module` names."""
    if level == 0:
        return target or ""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, target] if target else base)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing `name` loads last (itself, or its longest known prefix)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path], root: Path) -> list[Import]:
    """Every import of one of `modules` in the file, wherever it stands (see the module docstring)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = str(path.relative_to(root))
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, path, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                names.append((sub if sub in modules else base, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append((node.args[0].value, node.lineno))
    found = []
    for name, line in names:
        target = _owner(name, modules)
        if target is not None and target != module:
            found.append(Import(module, target, rel, line))
    return found


def import_graph(root: Path = REPO, roots: tuple[str, ...] = ROOTS) -> list[Import]:
    modules = module_files(root, roots)
    return sorted({imp for module, path in modules.items() for imp in imports_of(module, path, modules, root)})


def folder_of(module: str, root: Path = REPO) -> str:
    """The folder a module belongs to: that of its file (a package's own __init__.py belongs to the package)."""
    parts = module.split(".")
    is_package = (root.joinpath(*parts) / "__init__.py").is_file()
    return "/".join(parts if is_package else parts[:-1])


def _graph(edges: list[Import]) -> dict[str, list[str]]:
    graph: dict[str, list[str]] = {}
    for e in sorted(edges):
        graph.setdefault(e.importer, [])
        graph.setdefault(e.imported, [])
        if e.imported not in graph[e.importer]:
            graph[e.importer].append(e.imported)
    return graph


def find_cycles(edges: list[Import]) -> list[list[str]]:
    """One cycle [a, b, ..., a] for every group of modules that import each other (a strongly connected
    component), shortest from the component's first module; sorted, deterministic."""
    graph = _graph(edges)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in sorted(graph):  # Tarjan's algorithm, iterative
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    cycles = []
    for component in sorted(components):
        members, first = set(component), component[0]
        came_from: dict[str, str] = {}
        frontier = [first]
        while first not in came_from:  # breadth first from `first` back to itself, inside the component
            nxt = []
            for node in frontier:
                for child in graph[node]:
                    if child in members and child not in came_from:
                        came_from[child] = node
                        nxt.append(child)
            frontier = nxt
        path = [first]
        while len(path) == 1 or path[-1] != first:
            path.append(came_from[path[-1]])
        cycles.append(path[::-1])
    return cycles


def layer_violations(edges: list[Import], layers: dict[str, int] = LAYERS, group: dict[str, str] = GROUP,
                     root: Path = REPO) -> list[str]:
    """One line per import that goes up a level or sideways to another folder of the same level."""
    out = []
    for e in edges:
        src, dst = folder_of(e.importer, root), folder_of(e.imported, root)
        if src == dst or group.get(src, src) == group.get(dst, dst):
            continue
        if src not in layers or dst not in layers:
            out.append(f"{e.path}:{e.line}: {e.importer} ({src}) imports {e.imported} ({dst}): folder not in LAYERS")
        elif layers[dst] >= layers[src]:
            how = "a higher" if layers[dst] > layers[src] else "another folder of the same"
            out.append(f"{e.path}:{e.line}: {e.importer} ({src}, level {layers[src]}) imports {e.imported} "
                       f"({dst}, level {layers[dst]}): {how} level")
    return out


def unplaced_folders(root: Path = REPO, roots: tuple[str, ...] = ROOTS,
                     layers: dict[str, int] = LAYERS) -> tuple[list[str], list[str]]:
    """(folders with Python modules that LAYERS lacks, LAYERS entries with no such folder)."""
    folders = {folder_of(m, root) for m in module_files(root, roots)}
    return sorted(folders - set(layers)), sorted(set(layers) - folders)


# ---------------------------------------------------------------------------------------------------- the repo


def test_layer_table_places_every_folder():
    missing, stale = unplaced_folders()
    assert not missing, f"folders not placed in tests/test_layers.py LAYERS (give each a level): {missing}"
    assert not stale, f"LAYERS names folders that hold no modules (moved or removed?): {stale}"
    loose = sorted(m for m in module_files(REPO) if m.startswith("ddm_node.") and folder_of(m) == "ddm_node")
    assert not loose, f"modules directly in ddm_node/ (only __init__.py belongs there; use a folder): {loose}"


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_respect_the_layers():
    bad = layer_violations(import_graph())
    assert not bad, f"{len(bad)} import(s) against the layer table in tests/test_layers.py:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------------- the checker


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_upward_sideways_lazy_and_type_checking_imports(tmp_path):
    root = _package(tmp_path, {
        "ddm_node/__init__.py": "",
        "ddm_node/core/__init__.py": "",
        "ddm_node/core/errors.py": "from ddm_node.core import config\n",  # same folder: fine
        "ddm_node/core/config.py": ("from typing import TYPE_CHECKING\n"
                                    "if TYPE_CHECKING:\n    from ddm_node.swarm.dht import Swarm\n"),
        "ddm_node/swarm/__init__.py": "",
        "ddm_node/swarm/dht.py": ("from ..core.errors import DDMError\n"  # relative, down: fine
                                  "def f():\n    from .. import train\n"),  # lazy, sideways
        "ddm_node/train/__init__.py": "import importlib\nM = importlib.import_module('ddm_node.cli.main')\n",
        "ddm_node/cli/__init__.py": "",
        "ddm_node/cli/main.py": "import ddm_node.swarm.dht as d\nimport os\n",  # down: fine
        "router/__init__.py": "from ddm_node.data import plan\n",  # sideways (level 1 to level 1)
        "ddm_node/data/__init__.py": "",
        "ddm_node/data/plan.py": "",
        "proto/__init__.py": "from ddm_node.transfer import x\n",  # the same group
        "ddm_node/transfer/__init__.py": "from proto import ddm_pb2\n",
        "proto/ddm_pb2.py": "",
    })
    edges = import_graph(root)
    assert Import("ddm_node.swarm.dht", "ddm_node.core.errors", "ddm_node/swarm/dht.py", 1) in edges
    assert Import("proto", "ddm_node.transfer", "proto/__init__.py", 1) in edges  # `x` is no module: the package
    bad = layer_violations(edges, root=root)
    assert [b.split(":")[0] for b in bad] == ["ddm_node/core/config.py", "ddm_node/swarm/dht.py",
                                              "ddm_node/train/__init__.py", "router/__init__.py"], bad
    assert bad[0] == ("ddm_node/core/config.py:3: ddm_node.core.config (ddm_node/core, level 0) imports "
                      "ddm_node.swarm.dht (ddm_node/swarm, level 2): a higher level")
    assert "ddm_node.train (ddm_node/train, level 2): another folder of the same level" in bad[1]
    assert "ddm_node.cli.main (ddm_node/cli, level 6)" in bad[2]
    assert "ddm_node.data.plan (ddm_node/data, level 1): another folder of the same level" in bad[3]
    # The upward imports close cycles (config -> dht -> errors -> config through TYPE_CHECKING, and the one
    # below): the modules on them form one component, reported by one shortest cycle through its first module.
    assert find_cycles(edges) == [["ddm_node.cli.main", "ddm_node.swarm.dht", "ddm_node.train", "ddm_node.cli.main"]]


def test_checker_finds_cycles_and_unplaced_folders(tmp_path):
    root = _package(tmp_path, {
        "ddm_node/__init__.py": "",
        "ddm_node/core/__init__.py": "",
        "ddm_node/core/a.py": "from ddm_node.core import b\n",
        "ddm_node/core/b.py": "import ddm_node.core.d\n",
        "ddm_node/core/d.py": "def f():\n    from . import a\n",
        "ddm_node/newthing/__init__.py": "",
        "router/__init__.py": "",
        "proto/__init__.py": "",
    })
    assert find_cycles(import_graph(root)) == [["ddm_node.core.a", "ddm_node.core.b", "ddm_node.core.d",
                                                "ddm_node.core.a"]]
    missing, stale = unplaced_folders(root)
    assert missing == ["ddm_node/newthing"]
    assert "ddm_node/swarm" in stale


def test_no_module_over_450_lines_and_no_class_over_250():
    """The size bounds of docs/ARCHITECTURE.md (generated protobuf code aside)."""
    too_big = []
    for root in ("ddm_node", "router"):
        for path in sorted((REPO / root).rglob("*.py")):
            text = path.read_text()
            if len(text.splitlines()) > 450:
                too_big.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250:
                    too_big.append(f"{path.relative_to(REPO)}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, too_big
