"""The README and the pages in docs/ link only to files and headings that exist.

Checks every relative markdown link ``[text](target)`` and image ``![alt](target)`` outside code
blocks: the file must exist, and an anchor (``page.md#section``, or ``#section`` in the same
page) must be the GitHub-style slug of one of that page's headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

# notes-*.md are merge notes that the maintainers fold into the pages, not pages themselves.
PAGES = [REPO / "README.md"] + sorted(p for p in (REPO / "docs").glob("*.md") if not p.name.startswith("notes-"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links():
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if not re.match(r"^[a-z]+:", target):  # http:, https:, mailto: are not checked here
                yield pytest.param(page, target, id=f"{page.relative_to(REPO)}->{target}")


@pytest.mark.parametrize("page,target", list(links()))
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.relative_to(REPO)} links to {target}, which does not exist"
    if anchor:
        assert dest.suffix == ".md", f"{target}: an anchor into a file that is not markdown"
        assert anchor in anchors(dest), f"{page.relative_to(REPO)} links to {target}: no such heading in {dest.name}"


def test_slugs_follow_github():
    assert slug("I/O and streaming") == "io-and-streaming"
    assert slug("Recipes: `n2n apply`") == "recipes-n2n-apply"
    assert slug("The coupled walk and its maps") == "the-coupled-walk-and-its-maps"


def test_the_package_readme_exists():
    """pyproject.toml names README.md as the package's long description."""
    assert re.search(r'^readme = "README.md"$', (REPO / "pyproject.toml").read_text(), re.M)
    assert (REPO / "README.md").is_file()


def cited():
    """Every ``docs/<page>.md#<anchor>`` a comment or docstring in src/ or tests/ points to."""
    found = set()
    for path in sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "tests").glob("*.py")):
        for m in re.finditer(r"docs/([\w.-]+\.md)(?:#([\w-]+))?", path.read_text()):
            found.add((path.relative_to(REPO).as_posix(), m.group(1), m.group(2)))
    return sorted(found)


@pytest.mark.parametrize("source,page,anchor", cited(), ids=lambda v: str(v))
def test_code_cites_existing_docs(source, page, anchor):
    """Comments cite docs/ pages (never notes outside the repository); the citations must resolve."""
    dest = REPO / "docs" / page
    assert dest.exists(), f"{source} cites docs/{page}, which does not exist"
    if anchor:
        assert anchor in anchors(dest), f"{source} cites docs/{page}#{anchor}: no such heading"
