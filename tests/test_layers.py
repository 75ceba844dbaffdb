"""The shape of the code: imports point only downward through the layers, a stage never imports another stage,
no import cycles (in-function imports included), every registry entry resolves, and functions stay short."""
import ast
import inspect
from pathlib import Path

import pytest

from exocortex import registry

ROOT = Path(__file__).resolve().parent.parent / "exocortex"

# lowest first; a module may import its own layer and the ones below, never one above
LAYERS = [
    {"__init__", "errors"},  # fileio and device raise its one-line errors
    {"fileio", "memory", "device"},
    {"registry"},
    {"run"},
    {"config"},
    {"data", "tokenizer"},
    {"model"},
    {"checkpoint"},
    {"train", "infer"},
    {"tasks"},
    {"evals"},
    {"synth"},  # the data engine: tasks, models and evals' helpers below it; stages may train on what it writes
    {"stages", "apps"},
    {"cli"},
    {"__main__"},
]
SAME_LAYER_OK = {("data", "tokenizer")}  # data/tokens.py encodes with the tokenizer
# what a stage runs under apps/ is an app; another module there (guard.py) is a helper the apps may share
APPS = {s.run.split(":")[0] for s in registry.STAGES if s.run.startswith("exocortex.apps.")}
LONGEST_FUNCTION = 80
LONG_FUNCTIONS_OK: set[str] = set()  # "path:function" for a data table written as code, with the reason why


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if group(module) in names)


def imports(module: str, source: str, modules: set[str]) -> set[str]:
    """Every exocortex module `source` imports, at the top or inside a function."""
    out = set()
    is_package = module not in modules or any(m.startswith(module + ".") for m in modules)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("exocortex")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            if not base.startswith("exocortex"):
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in out if m != module}


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    modules = set(sources)
    return {m: imports(m, s, modules) for m, s in sources.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        for dep in deps:
            if dep == "exocortex" or dep.startswith(mod + "."):
                continue  # a package importing its own submodule
            g, h = group(mod), group(dep)
            if layer(dep) > layer(mod):
                bad.append(f"upward import: {mod} -> {dep}")
            elif layer(dep) == layer(mod) and g != h and (g, h) not in SAME_LAYER_OK:
                bad.append(f"sideways import between {g}/ and {h}/: {mod} -> {dep}")
            elif g == h == "stages" and mod != "exocortex.stages" and dep != "exocortex.stages":
                bad.append(f"a stage imports another stage: {mod} -> {dep}")
            elif g == h == "apps" and dep.split(".")[:3] != mod.split(".")[:3] and ".".join(dep.split(".")[:3]) in APPS:
                bad.append(f"an app imports another app: {mod} -> {dep}")
    return bad + [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                found.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def package_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in sorted(ROOT.rglob("*.py"))}


def test_imports_point_down_the_layers_without_cycles():
    assert violations(import_graph(package_sources())) == []


@pytest.mark.parametrize("module, bad_import, expected", [
    ("exocortex.model", "from exocortex.stages.pretrain import run_pretrain", "upward import"),
    ("exocortex.stages.report", "from exocortex.stages import evaluate", "a stage imports another stage"),
    ("exocortex.infer.engine", "from exocortex.train.loop import train", "sideways import"),
    ("exocortex.config", "def f():\n    from exocortex.checkpoint import load_model", "upward import"),
    ("exocortex.run", "from exocortex.config import RunConfig", "import cycle"),
    ("exocortex.apps.chat", "from exocortex.apps.serve import serve", "an app imports another app"),
])
def test_the_checker_catches_a_bad_import(module, bad_import, expected):
    sources = package_sources()
    sources[module] += "\n" + bad_import + "\n"
    assert any(v.startswith(expected) for v in violations(import_graph(sources)))


def test_every_module_has_a_layer():
    for module in package_sources():
        layer(module)  # StopIteration: a new top-level module needs a place in LAYERS


def test_registry_entries_resolve_and_take_their_options():
    from exocortex.cli import NOT_PASSED, OPTIONS

    for stage in registry.STAGES:
        assert stage.run.split(":")[0].split(".")[1] in ("stages", "apps"), stage.name
        fn = stage.load()
        params = inspect.signature(fn).parameters
        for option in stage.options:
            for _, kw in OPTIONS[option]:
                assert option in NOT_PASSED or kw["dest"] in params, (stage.name, kw["dest"])
        for parent in stage.parents:
            assert registry.BY_NAME[parent].label, (stage.name, parent)  # parents write checkpoints


def test_functions_are_short():
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{path.relative_to(ROOT.parent)}:{node.name}"
                if node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION and name not in LONG_FUNCTIONS_OK:
                    long.append(f"{name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
