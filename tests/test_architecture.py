"""The package graph stays one-way (docs/architecture.md, "Layers").

Read from the source (no imports run): which package of ``src`` imports which at run time. Imports
under ``if TYPE_CHECKING:`` do not count (they never run). ``src.config.events`` counts apart from
the settings: the specification puts the lifespan handlers in ``src.config``, and they sit on top
of everything, while the settings sit under everything.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Each package may import only packages listed before it (and itself).
LAYERS = [
    "src",  # src/__init__.py: the version
    "config",
    "errors",
    "security",
    "db",
    "services",
    "events",
    "users",
    "auth",
    "oauth",
    "mail",
    "app",
    "config.events",
    "cli",
    "api",
    "web",
    # The development stack (make run): its /dev/mail page renders with src.web.
    "dev",
    "main",
    "__main__",
]


def _node(module: str) -> str:
    parts = module.split(".")
    if parts[1:3] == ["config", "events"]:
        return "config.events"
    return parts[1] if len(parts) > 1 else "src"


def _type_checking_only(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def package_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        source = _node(module.removesuffix(".__init__"))
        tree = ast.parse(path.read_text())
        skipped = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src"):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.startswith("src.")]
            else:
                continue
            edges[source].update(_node(name) for name in names if _node(name) != source)
    return edges


def test_no_two_packages_import_each_other() -> None:
    edges = package_graph()
    both_ways = sorted((a, b) for a in edges for b in edges[a] if a in edges.get(b, ()) and a < b)
    assert not both_ways, f"packages importing each other: {both_ways}"


def test_every_import_points_down_the_layers() -> None:
    edges = package_graph()
    assert set(edges) <= set(LAYERS), f"a package missing from LAYERS: {set(edges) - set(LAYERS)}"
    upward = sorted(
        (source, target)
        for source, targets in edges.items()
        for target in targets
        if LAYERS.index(target) > LAYERS.index(source)
    )
    assert not upward, f"imports pointing up the layers: {upward}"
    # Accounts never depend on authentication (auth builds on users, not the reverse).
    assert "auth" not in edges["users"]
