"""Every relative link in README.md and docs/*.md reaches a file, and every
``#anchor`` a heading of it: moving a section cannot strand a link."""

from __future__ import annotations

from pathlib import Path

from tests.docs.markdown import ROOT, anchors, links, markdown_files

#: Pages another branch adds (the web dashboard, clients in other languages):
#: links to them may run ahead of the pages until that branch is merged.
PENDING = {ROOT / "docs" / "web.md", ROOT / "docs" / "other-languages.md"}


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """``FILE:LINE: TARGET: why`` for each link of ``path`` that leads nowhere."""
    out: list[str] = []
    for line, target in links(path):
        file, _, fragment = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        where = f"{path.relative_to(root)}:{line}: {target}"
        if not dest.exists():
            if dest not in PENDING:
                out.append(f"{where}: no such file")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            out.append(f"{where}: no heading #{fragment} in {dest.relative_to(root)}")
    return out


def test_every_relative_link_in_the_docs_resolves() -> None:
    failures = [f for path in markdown_files() for f in broken_links(path)]
    assert not failures, "\n".join(failures)


def test_the_readme_links_every_docs_page() -> None:
    readme_links = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(ROOT / "README.md")}
    pages = set((ROOT / "docs").glob("*.md")) | PENDING
    assert not pages - readme_links, sorted(str(p) for p in pages - readme_links)


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    page = tmp_path.resolve() / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page.write_text(
        "# Page\n\n[ok](other.md#a-section) [bad](other.md#nope) [gone](missing.md)\n"
        "```sh\n[not a link](nowhere.md)\n```\n"
    )
    assert [f.split(": ", 1)[1] for f in broken_links(page, tmp_path.resolve())] == [
        "other.md#nope: no heading #nope in other.md",
        "missing.md: no such file",
    ]
