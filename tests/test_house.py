"""The package's shape: sub-packages in layers whose imports point down only, model files that stand alone for
`trust_remote_code`, a small package root, no argv round-trips or private Accelerate API inside the package,
console scripts that exist, and functions short enough to read."""

import ast
import functools
import re
import tomllib

from conftest import REPO

PACKAGE = REPO / "moe_reason"
# lowest first: a module may import its own sub-package and the layers below it, never one above
LAYERS = ["(root)", "models", "parallel", "tasks", "data", "evaluation", "training", "runners"]
ROOT_UTILITIES = {"errors", "atomic", "locks", "layout", "safe_loading"}  # the root's helpers, below every sub-package
# what save_pretrained copies next to a model for trust_remote_code: these may import only each other
MODEL_FILES = {"models.configuration_moe_reason", "models.configuration_recursive", "models.modeling_moe_reason",
               "models.modeling_recursive", "models.expert_kernels", "models.chunked_loss"}
MAX_FUNCTION_LINES = 80
MAX_ROOT_MODULES = 8


@functools.cache
def modules() -> dict[str, ast.Module]:
    """{dotted name under moe_reason: its parsed source}."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts)] = ast.parse(path.read_text())
    return found


def package_imports() -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its file (top level or inside functions)}."""
    graph = {}
    for name, tree in modules().items():
        package = name.split(".")[:-1]  # a module's package; an __init__'s is its own
        found = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package[:len(package) - node.level + 1]
                targets = [".".join(base + node.module.split("."))] if node.module else \
                    [".".join(base + [alias.name]) for alias in node.names]
            elif (node.module or "").startswith("moe_reason."):
                targets = [node.module.removeprefix("moe_reason.")]
            else:
                continue
            found |= set(targets)
        graph[name] = {t for t in found if t in modules() or f"{t}.__init__" in modules()} - {name}
    return graph


def layer(module: str) -> int:
    """The remote-code model files lowest (they import nothing else), then the root's helpers, then the
    sub-packages in LAYERS' order, then the console scripts."""
    if module in MODEL_FILES:
        return 0
    if module == "cli":
        return len(LAYERS)
    head = module.split(".")[0]
    return 1 + (LAYERS.index(head) if head in LAYERS else 0)


def test_sub_packages_import_only_their_own_and_the_layers_below():
    upward = [f"{m} -> {t}" for m, targets in package_imports().items() for t in targets
              if layer(t) > layer(m) and m != "__init__"]
    assert not upward, upward
    assert len([p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]) >= 5
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root
    assert set(root) - {"__init__", "cli"} <= ROOT_UTILITIES, root


def test_no_import_cycle_among_the_modules():
    graph, order, visiting = package_imports(), [], set()

    def visit(module, path):
        assert module not in visiting, f"import cycle: {' -> '.join(path + [module])}"
        if module in order:
            return
        visiting.add(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])
        visiting.discard(module)
        order.append(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_model_files_import_only_each_other():
    graph = package_imports()
    for module in MODEL_FILES:
        assert graph[module] <= MODEL_FILES, (module, graph[module] - MODEL_FILES)


def test_no_argv_round_trip_and_no_private_accelerate_api_inside_the_package():
    text = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for banned in ("_reset_state", "to_argv", "config_file_to_argv"):
        assert banned not in text, banned


def test_every_console_script_exists_and_every_documented_command_is_one():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    import moe_reason.cli as cli
    for name, target in scripts.items():
        module, function = target.split(":")
        assert module == "moe_reason.cli" and callable(getattr(cli, function)), name
    documents = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "experiments").glob("*.yaml")]
    used = {m for path in documents for m in re.findall(r"\bmoe-reason-[a-z-]+", path.read_text())}
    assert used and used <= set(scripts), used - set(scripts)


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
