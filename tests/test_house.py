"""The package's shape: modules import only those below them, the model files stand alone for
`trust_remote_code`, and functions stay short enough to read."""

import ast

from conftest import REPO

PACKAGE = REPO / "moe_reason"
# what save_pretrained copies next to a model for trust_remote_code: these may import only each other
MODEL_FILES = {"configuration_moe_reason", "configuration_recursive", "modeling_moe_reason", "modeling_recursive",
               "expert_kernels", "chunked_loss"}
MAX_FUNCTION_LINES = 80


def package_imports() -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its file (top level or inside functions)}."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_reason."):
                found.add(node.module.split(".")[1])
        graph[path.stem] = found - {"__init__"}
    return graph


def test_no_import_cycle_among_the_modules():
    graph, order, visiting = package_imports(), [], set()

    def visit(module, path):
        assert module not in visiting, f"import cycle: {' -> '.join(path + [module])}"
        if module in order:
            return
        visiting.add(module)
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        visiting.discard(module)
        order.append(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_model_files_import_only_each_other():
    graph = package_imports()
    for module in MODEL_FILES:
        assert graph[module] <= MODEL_FILES, (module, graph[module] - MODEL_FILES)


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
