"""Architecture rules of the product code (DESIGN.md "Layout"), checked on the source with ``ast``.

Scope: every module of the packages ``pipeline``, ``models`` and ``flows``, sub-packages
included (``tests/`` and ``benchmarks/`` are tools around the product and may reach into it).
Every ``import`` statement counts, at module level and inside functions alike (a function-level
import is still a dependency; it only hides a circle until the function runs), and relative
imports are resolved against the importing module's package.

- No import circle: the graph "module A imports module B" has no cycle. ``from pkg import name``
  points at the sub-module ``pkg.name`` when there is one, else at ``pkg`` itself; a module is not
  taken to import its parent packages (``pkg/__init__.py`` re-exporting its own sub-modules is
  not a circle).
- No private name crosses a module boundary: ``from x import _y`` and ``x._y`` (attribute access
  on a name bound to a project module by an import) are refused, where ``_y`` has one leading
  underscore (dunders such as ``__version__`` are public). A helper two modules share is public,
  or lives in a module both import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "models", "flows", "phantom")


def _project_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of PACKAGES (``__init__`` as the package)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = _project_modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name ``from <node.module>`` refers to inside ``module``."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owning_module(name: str) -> str | None:
    """The longest project module that ``name`` (a dotted module path) is or lies in."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of attribute accesses on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _analyse(module: str, source: str, where: str) -> tuple[set[str], list[str]]:
    """(project modules imported by ``module``, private names it takes from other modules)."""
    tree = ast.parse(source, filename=where)
    imports: set[str] = set()
    private: list[str] = []
    bound: dict[str, str] = {}  # local name -> project module it is bound to by an import
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _owning_module(alias.name)
                if target is None:
                    continue
                imports.add(target)
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:  # `import a.b.c` binds `a`; accesses are spelled a.b.c.x
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:
                    imports.add(submodule)
                    bound[alias.asname or alias.name] = submodule
                    continue
                target = _owning_module(source)
                if target is None:
                    continue
                imports.add(target)
                if _is_private(alias.name):
                    private.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        chain = _dotted(node.value)
        if chain is None:
            continue
        head, _, rest = chain.partition(".")
        if head not in bound:
            continue
        target = ".".join(filter(None, [bound[head], rest]))
        if target in MODULES and target != module:
            private.append(f"{where}:{node.lineno}: {chain}.{node.attr}")
    imports.discard(module)
    return imports, private


GRAPH: dict[str, set[str]] = {}
PRIVATE: list[str] = []
for _module, _path in MODULES.items():
    GRAPH[_module], _found = _analyse(_module, _path.read_text(encoding="utf-8"), str(_path.relative_to(ROOT)))
    PRIVATE.extend(_found)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_path(graph, set(component)) for component in components]


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle through the first module of a strongly connected component."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    path = [start]
                    while node != start:
                        path.insert(1, node)
                        node = previous[node]
                    return path + [start]
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"no circle through {start}")


def test_the_scan_sees_the_packages_and_their_imports():
    # Guards the test itself: a scan that found nothing would pass vacuously.
    assert {"pipeline.measurement.study", "pipeline.imaging.registration", "models.infer", "flows.assess"} <= set(MODULES)
    assert "phantom.export" in MODULES and "pipeline.review.app" in MODULES
    assert "pipeline.core.config" in GRAPH["pipeline.measurement.study"]
    assert "pipeline.measurement.study" in GRAPH["flows.assess"] or any(m.startswith("pipeline") for m in GRAPH["flows.assess"])


def test_the_checks_catch_a_circle_and_a_private_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _is_private("_helper") and not _is_private("__version__") and not _is_private("helper")
    source = (
        "import numpy as np\n"
        "from ..segmentation import classical as sc\n"
        "import pipeline.imaging.registration\n"
        "def f():\n"
        "    from ..core.config import _load, load_config\n"
        "    from ...models import infer\n"
        "    return sc._focus(), pipeline.imaging.registration._pyramid(), infer._x, np._private, sc.__name__\n"
    )
    imports, private = _analyse("pipeline.measurement.study", source, "pipeline/measurement/study.py")
    assert imports == {"pipeline.segmentation.classical", "pipeline.imaging.registration", "pipeline.core.config", "models.infer"}
    assert sorted(p.split(": ", 1)[1] for p in private) == [
        "from pipeline.core.config import _load", "infer._x", "pipeline.imaging.registration._pyramid", "sc._focus"]


def test_no_import_circle_among_project_modules():
    cycles = _cycles(GRAPH)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_private_name_imported_from_another_module():
    assert not PRIVATE, "private names taken from another module:\n" + "\n".join(PRIVATE)


# --------------------------------------------------------------------------- stage order
# DESIGN.md's one-way flow, as pipeline's sub-packages (issue 17): a module may import its own
# stage, any earlier stage and the shared core; never a later stage. ``models`` (the network)
# never imports pipeline, flows or phantom; ``phantom`` (the synthetic-export generator, a test
# and demo tool) may use pipeline, never the reverse except the CLI's ``demo`` command.
STAGES = ("core", "ingest", "imaging", "segmentation", "measurement", "longitudinal", "outputs", "review", "run")


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    return parts[1]  # a stage, or "cli": the command line, above every stage


def _rank(module: str) -> int:
    stage = _stage(module)
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


def test_every_pipeline_module_lies_in_a_stage_package():
    loose = sorted(m for m in MODULES if m.startswith("pipeline.") and _stage(m) not in STAGES
                   and m not in ("pipeline.cli",))
    assert not loose, f"modules outside the stage packages of {STAGES}: {loose}"


def test_stages_import_only_earlier_stages():
    wrong = []
    for module, imported in GRAPH.items():
        if not module.startswith("pipeline.") or module == "pipeline.cli":
            continue
        for target in sorted(imported):
            if target == "pipeline":
                continue  # the package itself: __version__, SCHEMA_VERSION
            if target.startswith("pipeline.") and _rank(target) > _rank(module):
                wrong.append(f"{module} ({_stage(module)}) imports {target} ({_stage(target)})")
            if target.split(".")[0] in ("flows", "phantom"):
                wrong.append(f"{module} imports {target}: only the command line may")
    assert not wrong, "imports against the flow ingest -> ... -> run:\n" + "\n".join(wrong)



def test_models_never_import_the_pipeline():
    wrong = [f"{module} imports {target}" for module, imported in GRAPH.items() if module.split(".")[0] == "models"
             for target in sorted(imported) if target.split(".")[0] in ("pipeline", "flows", "phantom")]
    assert not wrong, "models/ holds only the network:\n" + "\n".join(wrong)


# The modules that may hold the whole PipelineConfig: the drivers that hand each stage function
# its own section (docs/architecture.md, "Configuration"). Every other stage function takes the
# sections it reads, so what a stage depends on is visible in its signature.
CONFIG_DRIVERS = ("pipeline.core", "pipeline.measurement.study", "pipeline.run", "pipeline.cli", "flows", "phantom")


def _names_whole_config(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and node.id == "PipelineConfig":
            return True
        if isinstance(node, ast.alias) and node.name == "PipelineConfig":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "PipelineConfig":
            return True
    return False


def test_the_check_sees_the_whole_config_named():
    assert _names_whole_config("from pipeline.core.config import PipelineConfig\n")
    assert _names_whole_config("def f(cfg: PipelineConfig): pass\n")
    assert _names_whole_config("import pipeline.core.config as c\ndef f(cfg: c.PipelineConfig): pass\n")
    assert not _names_whole_config('"""The PipelineConfig in words only."""\nfrom x import RulesConfig\n')


def test_only_the_drivers_take_the_whole_config():
    wrong = sorted(module for module, path in MODULES.items()
                   if not any(module == d or module.startswith(d + ".") for d in CONFIG_DRIVERS)
                   and _names_whole_config(path.read_text(encoding="utf-8")))
    assert not wrong, f"stage functions take their own config sections, not PipelineConfig: {wrong}"
