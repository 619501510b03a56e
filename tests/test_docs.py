"""The README stays a map: short, and every relative link in it and in docs/ leads somewhere real."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:")


def _outside_code(text: str) -> list[str]:
    """The lines of a markdown file that are not inside a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes for a markdown file (lowercase, punctuation dropped, spaces to hyphens)."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _outside_code(path.read_text(encoding="utf-8")):
        match = re.match(r"#{1,6} (.+)", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[str]:
    return [m for line in _outside_code(path.read_text(encoding="utf-8")) for m in LINK.findall(line)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page):
    broken = []
    for link in _links(page):
        if link.startswith(EXTERNAL):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(f"{link}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_readme_is_a_map_with_no_links_outside_the_repository():
    readme = ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) < 400, "move the detail into a docs/ page"
    assert [link for link in _links(readme) if link.startswith(EXTERNAL)] == []


def test_every_docs_page_links_back_to_the_readme():
    for page in PAGES[1:]:
        if page.name != "benchmarks.md":
            assert "](../README.md)" in page.read_text(encoding="utf-8"), page.name
