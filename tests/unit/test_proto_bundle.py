"""proto-bundle/ (make proto-bundle) is whole and current: every import of
every file in it resolves inside it, and each file is the copy of its source
(proto/, or the installed googleapis-common-protos and grpcio-tools)."""

from __future__ import annotations

import re
from pathlib import Path

import google.rpc
import grpc_tools  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "proto-bundle"
_IMPORT = re.compile(r'^import\s+(?:public\s+|weak\s+)?"([^"]+)";', re.MULTILINE)


def _files() -> dict[str, Path]:
    return {p.relative_to(BUNDLE).as_posix(): p for p in BUNDLE.rglob("*.proto")}


def test_every_import_resolves_inside_the_bundle() -> None:
    files = _files()
    assert {"pqueue/v1/queue.proto", "google/rpc/status.proto"} <= files.keys()
    assert "google/rpc/error_details.proto" in files
    missing = {
        (name, imported)
        for name, path in files.items()
        for imported in _IMPORT.findall(path.read_text())
        if imported not in files
    }
    assert not missing


def test_each_file_is_the_copy_of_its_source() -> None:
    googleapis = Path(next(iter(google.rpc.__path__))).parent.parent
    well_known = Path(next(iter(grpc_tools.__path__))) / "_proto"
    ours = {p.relative_to(ROOT / "proto").as_posix() for p in ROOT.glob("proto/pqueue/v1/*.proto")}
    assert ours <= _files().keys()  # every one of ours is in it
    for name, path in _files().items():
        if name.startswith("pqueue/"):
            source = ROOT / "proto" / name
        elif name.startswith("google/protobuf/"):
            source = well_known / name  # grpcio-tools' includes, as protoc sees them
        else:
            source = googleapis / name
        assert path.read_bytes() == source.read_bytes(), f"{name}: run make proto-bundle"
    readme = (BUNDLE / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in _files())  # and says where each came from
