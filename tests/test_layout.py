"""The package's shape: imports point one way (DESIGN.md), from the pure core up to the edges
where names become objects; the public API is importable from the top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS: dict[str, int] = {
    # 0: pure core, nothing of ours below it
    "dpfl.api": 0,
    "dpfl.privacy": 0,
    "dpfl.models": 0,
    "dpfl.profiling": 0,
    # 1: one client's step, the server's step
    "dpfl.client": 1,
    "dpfl.server": 1,
    # 2: the run config, the round loop, federated datasets
    "dpfl.config": 2,
    "dpfl.loop": 2,
    "dpfl.data": 2,
    # 3: engines, the Flower strategy, its node discovery, the nodes' own state, and secure
    # aggregation (flwr's SecAgg+ driven for distributed DP)
    "dpfl.engines": 3,
    "dpfl.flower.strategy": 3,
    "dpfl.flower.secagg": 3,
    "dpfl.flower.nodes": 3,
    "dpfl.flower.node_state": 3,
    # 4: the edges, where names become objects: recipes (the resolver), the Flower apps, the
    # CLI, the tools, the public simulate()
    "dpfl.flower": 4,
    "dpfl.recipes": 4,
    "dpfl.cli": 4,
    "dpfl.tools": 4,
    "dpfl.simulation": 4,
    "dpfl": 5,
    "dpfl.__main__": 5,
}


def layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in LAYERS:
            return LAYERS[name], name
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    """Every dpfl module ``path`` imports, at the top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dpfl":
                out += [f"dpfl.{a.name}" for a in node.names]
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m == "dpfl" or m.startswith("dpfl.")]


def upward_imports() -> list[str]:
    found = []
    for path in sorted((ROOT / "dpfl").rglob("*.py")):
        me = module_name(path)
        mine, _ = layer(me)
        for target in imports(path):
            theirs, _ = layer(target)
            if theirs > mine:
                found.append(f"{me} (layer {mine}) imports {target} (layer {theirs})")
    return found


def test_imports_point_one_way():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check is real: a core module that imports the loop is reported."""
    fake = ROOT / "dpfl" / "privacy" / "_layout_probe.py"
    fake.write_text("from dpfl.loop.run import FederatedRun\n")
    try:
        assert upward_imports() == [
            "dpfl.privacy._layout_probe (layer 0) imports dpfl.loop.run (layer 2)"
        ]
    finally:
        fake.unlink()


def test_no_task_name_dispatch_outside_recipes():
    """No ``if task == ...`` (or a lookup by task name) outside dpfl/recipes."""
    offenders = []
    for path in sorted((ROOT / "dpfl").rglob("*.py")):
        if "recipes" in path.parts:
            continue
        text = path.read_text()
        for needle in ('task == "', "task == '", 'task != "', "task != '", ".get(self.task"):
            if needle in text:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == []


def test_public_api_is_importable_from_the_top():
    import dpfl
    import dpfl.data
    import dpfl.flower

    assert callable(dpfl.simulate)
    for name in ("from_arrays", "from_torch_dataset", "from_hf"):
        assert callable(getattr(dpfl.data, name))
    for name in ("server_app", "client_app", "make_server_app", "make_client_app"):
        assert hasattr(dpfl.flower, name)
