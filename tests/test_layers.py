"""The package's structure, read from its imports (every ``from sdfsmis... import``, also those
inside functions): each area imports only from areas below it, and no module imports itself
back through others. A newcomer can then read the package from the bottom up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lib" / "sdfsmis"

#: The areas from the bottom up; an area may import from its own layer's areas only where the
#: pair is listed in SAME_LAYER_ARROWS (dicom reads volumes).
LAYERS = [
    {"memory"},  # how the process holds CPU memory
    {"config", "metrics", "io", "dicom"},  # settings sections, Dice, files
    {"methods"},  # the one-shot methods and their registry
    {"settings"},  # the settings object built from the registry
    {"samples", "pipeline"},  # generated data and tiny models; inference
    {"figures"},
    {"training"},
    {"evaluation", "bench"},
    {"cli"},  # thin commands over everything
]
SAME_LAYER_ARROWS = {("dicom", "io")}
LAYER = {area: level for level, areas in enumerate(LAYERS) for area in areas}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports (``from sdfsmis.a import b`` counts as ``sdfsmis.a.b``
    where that is a module, else ``sdfsmis.a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sdfsmis":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sdfsmis")
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def test_every_area_has_a_layer():
    areas = {area(m) for m in MODULES} - {"(root)"}
    assert areas <= set(LAYER), f"areas without a layer: {sorted(areas - set(LAYER))}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str):
    own = area(module)
    if own == "(root)":
        return  # the package's __init__: version only
    upward = [
        target
        for target in imports_of(MODULES[module])
        if area(target) != own
        and (
            LAYER[area(target)] > LAYER[own]
            or (LAYER[area(target)] == LAYER[own] and (own, area(target)) not in SAME_LAYER_ARROWS)
        )
    ]
    assert not upward, f"{module} imports from the same or a higher layer: {upward}"


def test_no_import_circle():
    graph = {module: imports_of(path) & set(MODULES) for module, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if target == module or target == module.rsplit(".", 1)[0]:
                continue  # a package's own __init__ is where its modules are found, not a circle
            if state.get(target) == "open":
                circle = trail[trail.index(target) :] + [target] if target in trail else [module, target]
                pytest.fail(f"import circle: {' -> '.join(circle)}")
            if target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_package_root_holds_no_method_of_its_own():
    """Method-specific modules live in the methods' subpackages; the root keeps what all share."""
    root_modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert root_modules == {"__init__", "config", "settings", "metrics", "memory"}
