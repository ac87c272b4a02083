"""The whole program's import graph (every package but tests/) has no cycle, and every arrow runs one way, down
the layer order below: every import counts, at module level or inside a function (a lazy import still ties two
modules together)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model_runner", "batcher", "api", "replicas", "benchmarks", "sim", "jitney")
# The layer order, lowest first: a module may import its own layer and those below it, never one above. Each entry
# is a package or a module; a module belongs to its longest matching entry. benchmarks/ is two layers: its library
# (traces, replay, reports, cost and memory models), which the simulator builds on, and the scripts that drive the
# simulator (story_sim and its story_runs, story_report; sim_validate and cuda_check, which compare it with real
# runs; screenshots), above sim/. jitney/ is the
# composition root, above all.
LAYERS = (
    ("model_runner",),                 # the model: weights, kernels, one step
    ("batcher",),                      # the engine (EngineClient), scheduler, KV manager
    ("api",),                          # HTTP, speaking only to an EngineClient
    ("replicas",),                     # the same app over Ray Serve replicas (it builds api's app)
    ("benchmarks",),                   # traces, replay, reports
    ("sim",),                          # a step-cost model in the runner's place (sim/runner.py SimRunner)
    ("benchmarks.story_sim", "benchmarks.story_runs", "benchmarks.story_report", "benchmarks.sim_validate",
     "benchmarks.cuda_check", "benchmarks.screenshots"),
    ("jitney",),                       # the `jitney` command: wires all of the above
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project's modules that path imports (`from pkg import mod` names the module, not the package)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (as a path that returns to its start), or None: a depth-first search for a back edge."""
    state, stack = {}, []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def the_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def layer(module: str) -> int:
    """The index in LAYERS of the longest entry that is module or a package above it."""
    matches = [(len(entry), i) for i, entries in enumerate(LAYERS) for entry in entries
               if module == entry or module.startswith(entry + ".")]
    assert matches, f"{module} is in no layer: add its package to LAYERS"
    return max(matches)[1]


def test_the_import_graph_has_no_cycles():
    graph = the_graph()
    assert graph["jitney.cli"] and graph["batcher.engine"] and graph["replicas.launch"]  # the walk sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_import_runs_down_the_layers():
    graph = the_graph()
    up = sorted(f"{m} -> {n}" for m, targets in graph.items() for n in targets if layer(n) > layer(m))
    assert not up, "imports that run back up the layers:\n" + "\n".join(up)


def test_the_layer_check_sees_an_arrow_up():
    assert layer("api.app") < layer("replicas.launch") < layer("jitney.cli")
    assert layer("benchmarks.replay") < layer("sim.simulate") < layer("benchmarks.story_sim")


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
