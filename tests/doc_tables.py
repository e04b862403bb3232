"""Read the tables of the repository's own documents, the independent source some tests
check the code's constants against (the documents record the original's values)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def section(doc: str, heading: str) -> str:
    """The text of `doc` (a path under the repository) from `heading` to the next heading."""
    text = (ROOT / doc).read_text()
    text = text[text.index(heading) + len(heading):]
    return text[:text.index("\n#")] if "\n#" in text else text


def first_table(doc: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped; the header first, its `|---|` line dropped) of the first
    table in the section `heading` of `doc`."""
    rows = []
    for line in section(doc, heading).splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            break
    return rows
