"""Pure cores import no IO, clock, network or global randomness (docs/architecture.md,
"Never-arrows"). This reads each module's own imports; tests/unit/test_fences.py
checks what a fresh interpreter really loads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE_MODULES = [
    "pqueue/core/machine.py",
    "pqueue/core/browse.py",
    "pqueue/core/transitions.py",
    "pqueue/core/tenancy.py",
    "pqueue/core/job_commands.py",
    "pqueue/core/queue_commands.py",
    "pqueue/core/queue_table.py",
    "pqueue/core/commands.py",
    "pqueue/core/schedules.py",
    "pqueue/node/access.py",
    "pqueue/node/principal.py",
    "pqueue/node/mixing.py",
    "pqueue/wire/keys.py",
    "pqueue/wire/sizes.py",
    "pqueue/wire/channels.py",
    "pqueue/core/jobs.py",
    "pqueue/core/limits.py",
    "pqueue/core/snapshot.py",
    "pqueue/errors.py",
    "pqueue/core/features.py",
    "consensus/messages.py",
    "consensus/replica.py",
    "balancer/picker.py",
    "balancer/pool.py",
    "balancer/routes.py",
    "balancer/framing.py",
    "pqueue/wire/protowire.py",
]
FORBIDDEN = {
    "asyncio",
    "grpc",
    "time",
    "random",
    "os",
    "socket",
    "sqlite3",
    "asyncpg",
    "threading",
    "subprocess",
    "datetime",
    "psutil",
    "uvloop",
    "pathlib",
}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (type-only imports)."""
    out: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        out.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_core_has_no_io_imports(module: str) -> None:
    assert _imports(ROOT / module) & FORBIDDEN == set()


def test_the_scan_would_see_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import time\nfrom asyncio import sleep\nif TYPE_CHECKING:\n    from random import Random\n"
    )
    assert _imports(bad) & FORBIDDEN == {"time", "asyncio"}


def test_consensus_and_balancer_keep_their_boundaries() -> None:
    for path in (ROOT / "consensus").rglob("*.py"):
        assert not _imports(path) & {"pqueue", "balancer"}, path
    for path in (ROOT / "balancer").rglob("*.py"):
        assert "consensus" not in _imports(path), path


def _modules(path: Path) -> set[str]:
    """The full names a module imports at run time (``from a.b import c``: ``a.b``)."""
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _inside(name: str, rooms: tuple[str, ...]) -> bool:
    return any(name == room or name.startswith(room + ".") for room in rooms)


def test_the_kernel_and_the_balancer_import_no_server_room() -> None:
    server_rooms = ("consensus", "pqueue.node", "pqueue.core", "pqueue.storage", "pqueue.cli")
    for path in (ROOT / "pqueue" / "wire").rglob("*.py"):
        assert not {m for m in _modules(path) if _inside(m, (*server_rooms, "balancer"))}, path
    for path in (ROOT / "balancer").rglob("*.py"):
        ours = {m for m in _modules(path) if _inside(m, ("pqueue",))}
        assert all(_inside(m, ("pqueue.wire", "pqueue.errors", "pqueue.v1")) for m in ours), path
