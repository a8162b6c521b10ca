"""The documentation stands alone: every relative link of README.md and docs/*.md leads to a file
or folder of this repository, and nothing points at material outside it (``../shared``), which a
clone does not have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*(?:<([^>]*)>|([^)\s]*))(?:\s+[\"'(][^)]*)?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def link_targets(markdown: str) -> list[str]:
    """The targets of inline links, images and reference definitions, outside code (a bracket
    followed by a parenthesis inside a code block or span is not a link)."""
    prose = CODE_SPAN.sub("", FENCE.sub("", markdown))
    inline = [bracketed or bare for bracketed, bare in INLINE_LINK.findall(prose)]
    return inline + REFERENCE_DEFINITION.findall(prose)


def broken_links(page: Path) -> list[str]:
    """The relative targets of ``page`` that name nothing inside the repository."""
    broken = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        resolved = (page.parent / path).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(target)
    return broken


def test_pages_are_found() -> None:
    """The check below covers the README and the docs pages it links to."""
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    assert {"README.md", "docs/model.md", "docs/dpl.md", "docs/protocol.md"} <= names


def test_link_parser_reads_what_a_reader_clicks() -> None:
    """Links, images and definitions count; code, external links and anchors are not files."""
    text = (
        "See [a](a.md) and ![b](img/b.png 'title') and [c](<c d.md>).\n"
        "`[not](code.md)` and\n```\n[nor](block.md)\n```\n"
        "[e]: e.md\n[f](https://example.org) [g](#anchor) [h](h.md#part)\n"
    )
    assert link_targets(text) == ["a.md", "img/b.png", "c d.md", "https://example.org", "#anchor", "h.md#part", "e.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_the_repository(page: Path) -> None:
    assert broken_links(page) == [], f"{page.relative_to(ROOT)} links to what the repository does not hold"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_no_page_points_outside_the_repository(page: Path) -> None:
    """``../shared`` holds notes outside the repository: the facts the code relies on are written
    in docs/ (model.md, dpl.md, protocol.md) instead."""
    assert "../shared" not in page.read_text(encoding="utf-8")
