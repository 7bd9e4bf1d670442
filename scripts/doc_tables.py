"""Quote the committed results tables in the docs, so that no number is a hand copy.

A doc (README.md, docs/*.md, results/README.md) names a table by a pair of markers, each
on a line of its own:

    <!-- table: results/tables/table3_tiny-llama.md -->
    ...
    <!-- /table -->

The path is relative to the repository root; the lines between the markers are the named
file's content, with one blank line before and after it. `python scripts/doc_tables.py`
rewrites every block in place; `python scripts/doc_tables.py --check` changes nothing,
names each block that differs from its file and exits 1. A block whose file is missing is
an error in both modes (exit 2), and so is an opening marker without its closing one.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/*.md", "results/README.md")

# Markers count only at the start of a line, so a doc can show them indented as an example.
BLOCK = re.compile(
    r"^<!-- table: (?P<source>\S+) -->\n(?P<body>.*?)^<!-- /table -->$",
    re.MULTILINE | re.DOTALL,
)
OPENING = re.compile(r"^<!-- table: ", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening marker, 1-based
    source: str  # as written in the marker, relative to the root
    body: str  # what the doc holds between the markers
    expected: str | None  # what it should hold; None when the file is missing


def doc_files(root: Path) -> list[Path]:
    """The docs that may hold include blocks, in a stable order."""
    found: list[Path] = []
    for pattern in DOCS:
        found.extend(sorted(p for p in root.glob(pattern) if p.is_file()))
    return found


def body_for(table: str) -> str:
    """The text between the markers for a table file's content."""
    return "\n" + table.strip("\n") + "\n\n"


def blocks(doc: Path, root: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    out = []
    for m in BLOCK.finditer(text):
        path = root / m["source"]
        expected = body_for(path.read_text(encoding="utf-8")) if path.is_file() else None
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(doc, line, m["source"], m["body"], expected))
    return out


def refresh(text: str, root: Path) -> str:
    """`text` with every block's body replaced by its file's content (files must exist)."""

    def replace(m: re.Match[str]) -> str:
        table = (root / m["source"]).read_text(encoding="utf-8")
        return f"<!-- table: {m['source']} -->\n{body_for(table)}<!-- /table -->"

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale blocks, change nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()

    missing: list[Block] = []
    stale: list[Block] = []
    unclosed: list[str] = []
    for doc in doc_files(root):
        found = blocks(doc, root)
        if len(OPENING.findall(doc.read_text(encoding="utf-8"))) != len(found):
            unclosed.append(f"{doc.relative_to(root)}: a table marker without its <!-- /table -->")
        for block in found:
            if block.expected is None:
                missing.append(block)
            elif block.body != block.expected:
                stale.append(block)

    def where(block: Block) -> str:
        return f"{block.doc.relative_to(root)}:{block.line}: {block.source}"

    for block in missing:
        print(f"{where(block)}: no such file", file=sys.stderr)
    for message in unclosed:
        print(message, file=sys.stderr)
    if missing or unclosed:
        return 2
    if args.check:
        for block in stale:
            print(f"{where(block)}: differs from the file; run python scripts/doc_tables.py")
        return 1 if stale else 0
    for doc in sorted({block.doc for block in stale}):
        doc.write_text(refresh(doc.read_text(encoding="utf-8"), root), encoding="utf-8")
    for block in stale:
        print(f"{where(block)}: rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
