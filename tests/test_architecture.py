"""The package's import graph keeps the design card's rules.

    apps (cli, demo, web)  ->  evaluation  ->  user API (viscpm/*.py), adapters, conversion  ->  modeling

Every import in the source (at module level or inside a function) of a module of the package is an edge. The
rules: no cycles; ``modeling`` imports nothing of viscpm (it ships to the Hub as remote code); nothing outside
``apps`` imports ``apps``; ``conversion`` imports only ``conversion`` and ``modeling``.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"viscpm": REPO / "viscpm", "viscpm.modeling": REPO / "modeling", "viscpm.conversion": REPO / "conversion"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # `from pkg import submodule` or `from module import name`
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                # the longest known module the target names (``viscpm.modeling.X`` -> that file)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _layer(module: str) -> str:
    for layer in ("viscpm.modeling", "viscpm.conversion", "viscpm.apps", "viscpm.adapters", "viscpm.evaluation"):
        if module == layer or module.startswith(layer + "."):
            return layer.split(".")[1]
    return "api"


def test_the_graph_sees_every_layer():
    graph = _graph()
    assert {_layer(module) for module in graph} == {"modeling", "conversion", "apps", "adapters", "api", "evaluation"}
    assert "viscpm.modeling.modeling_cpmbee" in graph["viscpm.modeling.modeling_viscpm_chat"]
    assert "viscpm.conversion.common" in graph["viscpm.conversion.convert_cpmbee"]


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []


def test_imports_point_down():
    allowed = {  # layer -> the layers it may import
        "modeling": {"modeling"},
        "conversion": {"conversion", "modeling"},
        "adapters": {"adapters", "api", "conversion", "modeling"},
        "api": {"api", "adapters", "conversion", "modeling"},
        "evaluation": {"evaluation", "api", "adapters", "conversion", "modeling"},
        "apps": {"apps", "evaluation", "api", "adapters", "conversion", "modeling"},
    }
    wrong = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) not in allowed[_layer(module)]
    ]
    assert wrong == []


def test_modeling_imports_only_what_remote_code_has():
    """The model files ship to the Hub: they import torch/transformers/diffusers/PIL/numpy and each other only."""
    third_party = {"torch", "transformers", "diffusers", "PIL", "numpy", "safetensors", "huggingface_hub"}
    found = set()
    for path in FOLDERS["viscpm.modeling"].glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {(path.name, alias.name.split(".")[0]) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add((path.name, node.module.split(".")[0]))
    import sys

    outside = sorted((name, top) for name, top in found if top not in third_party | sys.stdlib_module_names)
    assert outside == []
