"""The chapters as a reader sees them: visible code fits the page, every chapter is in the table of contents."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"
CHAPTERS = sorted(BOOK.glob("*.ipynb"))
HIDDEN = {"remove-cell", "remove-input"}
WIDTH = 80  # what a 1280 px page shows of a code cell: 84 characters at _static/d2lft.css's size


def visible_code(chapter: Path) -> list[tuple[int, str]]:
    cells = json.loads(chapter.read_text())["cells"]
    lines = []
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "code" and not HIDDEN & set(cell.get("metadata", {}).get("tags", [])):
            lines += [(index, line) for line in "".join(cell["source"]).splitlines()]
    return lines


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_visible_code_lines_fit_the_page(chapter):
    long = [f"cell {i}: {line}" for i, line in visible_code(chapter) if len(line) > WIDTH]
    assert not long, f"{chapter.name}: {len(long)} visible code lines over {WIDTH} characters:\n" + "\n".join(long)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapters_are_committed_without_outputs(chapter):
    cells = json.loads(chapter.read_text())["cells"]
    assert not [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]


def test_every_chapter_is_in_the_table_of_contents():
    toc = (BOOK.parent / "_toc.yml").read_text()
    assert [c.stem for c in CHAPTERS if f"book/{c.stem}" not in toc] == []
