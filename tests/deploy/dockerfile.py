"""A small Dockerfile reader: instructions by stage, enough for the tests' checks."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.files import DOCKERFILE


@dataclass(frozen=True)
class Instruction:
    """``KEYWORD args`` with continuation lines joined."""

    keyword: str
    args: str

    def words(self) -> list[str]:
        """The arguments: the JSON (exec) form as given, the shell form split."""
        if self.args.startswith("["):
            parsed = json.loads(self.args)
            assert isinstance(parsed, list)
            return [str(w) for w in parsed]
        return shlex.split(self.args)

    def flags(self) -> dict[str, str]:
        """Leading ``--name=value`` flags (COPY --from=..., --chmod=...)."""
        return dict(
            w.removeprefix("--").partition("=")[::2] for w in self.words() if w.startswith("--")
        )

    def operands(self) -> list[str]:
        """The words after the flags."""
        return [w for w in self.words() if not w.startswith("--")]


@dataclass
class Stage:
    """One ``FROM`` and what follows it."""

    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """This stage's instructions of one kind."""
        return [i for i in self.instructions if i.keyword == keyword]


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The Dockerfile's stages in order (parser directives and comments dropped)."""
    found: list[Stage] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        pending = ""
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            words = instruction.operands()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(words[0], name))
        else:
            assert found, f"{path}: {instruction.keyword} before FROM"
            found[-1].instructions.append(instruction)
    return found
