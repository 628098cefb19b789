"""The walls between the programs, checked on what a fresh interpreter loads.

``test_purity`` reads each module's own import lines; these tests import an
entry point in a new process and look at ``sys.modules``, so an indirect
import (A imports B imports the node) breaks them too. See
docs/architecture.md, "Never-arrows".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_purity import _imports, _inside, _modules

ROOT = Path(__file__).resolve().parents[2]

#: Modules of the node, the consensus core, the pure queue core and storage.
SERVER_SIDE = ("consensus", "pqueue.node", "pqueue.core", "pqueue.storage", "balancer")
#: Libraries only a server needs (token verification, PostgreSQL, process stats).
SERVER_LIBRARIES = ("jwt", "cryptography", "asyncpg", "psutil", "croniter")
#: The HTTP API (``pq web``) and its stack: loaded only by ``pq web`` itself.
WEB = ("pqueue.web", "starlette", "uvicorn", "httpx")


def files_loaded_by(*modules: str, forget: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Every module a fresh interpreter holds after importing ``modules``, with
    its file. ``forget``: modules the interpreter loads at start-up (``time``),
    dropped first so that importing them again shows."""
    code = (
        "import json, sys\n"
        f"for name in {list(forget)!r}:\n"
        "    sys.modules.pop(name, None)\n"
        f"for name in {list(modules)!r}:\n"
        "    __import__(name)\n"
        "print(json.dumps({k: getattr(m, '__file__', None) for k, m in sys.modules.items()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded: dict[str, str | None] = json.loads(out.stdout)
    return loaded


def loaded_by(*modules: str) -> set[str]:
    """Every module a fresh interpreter holds after importing ``modules``."""
    return set(files_loaded_by(*modules))


def under(loaded: set[str], prefixes: tuple[str, ...]) -> set[str]:
    """The loaded modules that are one of ``prefixes`` or inside one."""
    return {m for m in loaded if any(m == p or m.startswith(p + ".") for p in prefixes)}


def test_the_balancer_loads_only_the_kernel() -> None:
    loaded = loaded_by("balancer.runner")
    assert "balancer.server" in loaded  # the check looks at the real thing
    assert under(loaded, ("consensus", "pqueue.node", "pqueue.core", "pqueue.storage")) == set()
    assert under(loaded, ("pqueue.cli", "pqueue.client", "pqueue.worker")) == set()


@pytest.mark.parametrize(
    "entry",
    ["pqueue.client", "pqueue.worker", "pqueue.consumer", "pqueue.cli.client", "pqueue.cli.worker"],
)
def test_the_sdk_and_the_client_commands_load_no_server(entry: str) -> None:
    loaded = loaded_by(entry)
    assert entry in loaded
    assert under(loaded, SERVER_SIDE) == set()
    assert under(loaded, SERVER_LIBRARIES) == set()
    assert under(loaded, WEB) == set()


PURE_CORES = [
    "consensus.replica",
    "consensus.messages",
    "pqueue.core.machine",
    "pqueue.core.snapshot",
    "pqueue.core.jobs",
    "pqueue.core.limits",
    "pqueue.core.features",
    "pqueue.core.queue_table",
    "pqueue.node.access",
    "balancer.pool",
    "balancer.picker",
    "balancer.routes",
]


IMPURE = ("asyncio", "grpc", "time", "random")


@pytest.mark.parametrize("core", PURE_CORES)
def test_a_pure_core_loads_no_clock_network_or_randomness(core: str) -> None:
    files = files_loaded_by(core, forget=IMPURE)
    assert core in files
    # asyncio, grpc and random are loaded by nothing a pure core may use.
    assert under(set(files), ("asyncio", "grpc", "random")) == set()
    # time comes in through the standard library (threading, via protobuf), so
    # every module of ours the core pulls in is checked for its own imports.
    ours = under(set(files), ("pqueue", "consensus", "balancer")) - under(
        set(files), ("pqueue.v1",)
    )
    assert core in ours
    for name in sorted(ours):
        path = files[name]
        assert path is not None, name
        assert not _imports(Path(path)) & set(IMPURE), f"{core} loads {name}, which is not pure"


def test_the_check_sees_an_indirect_import() -> None:
    # json loads no asyncio; a module that pulls asyncio in through another does.
    assert under(loaded_by("json"), ("asyncio",)) == set()
    assert "asyncio" in loaded_by("pqueue.wire.loop")


def test_the_sdk_imports_no_server_room_even_inside_a_function() -> None:
    # The fresh interpreter above sees only what importing runs; an import in a
    # function body (a lazy import) loads the server only when that method is
    # called. The SDK's import lines, wherever they are, name only the kernel.
    allowed = (
        "pqueue.wire",
        "pqueue.errors",
        "pqueue.v1",
        "pqueue.client",
        "pqueue.batching",
        "pqueue.submitstream",
        "pqueue.consumer",
        "pqueue.hooks",
        "pqueue.heartbeats",
        "pqueue.lookaside",
    )
    for name in (
        "client.py",
        "batching.py",
        "submitstream.py",
        "consumer.py",
        "hooks.py",
        "heartbeats.py",
        "worker.py",
        "lookaside.py",
    ):
        path = ROOT / "pqueue" / name
        ours = {m for m in _modules(path) if _inside(m, ("pqueue", "consensus", "balancer"))}
        assert all(_inside(m, allowed) for m in ours), (path, ours)
        assert not {m.split(".")[0] for m in _modules(path)} & set(SERVER_LIBRARIES), path


def test_a_client_command_as_pq_parses_it_loads_no_server() -> None:
    # `pq` builds one parser for every program (node, balancer, token, dev
    # cluster, client commands): registering a program must not load it.
    code = (
        "import json, sys\n"
        "from pqueue.cli import build_parser\n"
        "build_parser().parse_args(['enqueue', 'q', 'x'])\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(out.stdout))
    assert "pqueue.cli.node" in loaded  # every program's parser was registered
    assert "pqueue.cli.web" in loaded
    assert under(loaded, SERVER_SIDE + SERVER_LIBRARIES + WEB) == set()


def test_the_web_api_loads_no_server() -> None:
    loaded = loaded_by("pqueue.web.app")
    assert "starlette" in loaded  # the check looks at the real thing
    assert under(loaded, SERVER_SIDE + SERVER_LIBRARIES) == set()


def test_only_pq_web_imports_the_web_room() -> None:
    # pqueue.web and its stack (an optional extra) are imported by
    # `pq web` alone, and only inside the function that runs it.
    allowed = {ROOT / "pqueue" / "cli" / "web.py"}
    for room in ("pqueue", "consensus", "balancer"):
        for path in sorted((ROOT / room).rglob("*.py")):
            if path in allowed or (ROOT / "pqueue" / "web") in path.parents:
                continue
            if (ROOT / "pqueue" / "v1") in path.parents:
                continue
            assert not {m for m in _modules(path) if _inside(m, WEB)}, path
