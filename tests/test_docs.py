"""The docs quote committed results, their relative links resolve, and the README stays short.

Tables in README.md, docs/*.md and results/README.md are copies of files under results/,
between include markers that scripts/doc_tables.py refreshes.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_doc_tables():
    spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "scripts" / "doc_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


doc_tables = _load_doc_tables()

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _all_blocks(root: Path):
    return [block for doc in doc_tables.doc_files(root) for block in doc_tables.blocks(doc, root)]


def test_the_docs_hold_include_blocks():
    assert doc_tables.doc_files(ROOT), "no README.md / docs/*.md / results/README.md found"
    assert _all_blocks(ROOT), "no <!-- table: ... --> include block in the docs"


def test_every_included_table_equals_its_committed_file():
    stale = [f"{b.doc.relative_to(ROOT)}:{b.line}: {b.source}"
             for b in _all_blocks(ROOT) if b.expected is not None and b.body != b.expected]
    assert not stale, (
        "these quoted tables differ from the committed results they name; "
        "run `python scripts/doc_tables.py` and commit the docs:\n  " + "\n  ".join(stale))


def test_every_included_table_names_an_existing_file():
    missing = [f"{b.doc.relative_to(ROOT)}:{b.line}: {b.source}"
               for b in _all_blocks(ROOT) if b.expected is None]
    assert not missing, "include blocks name files that do not exist:\n  " + "\n  ".join(missing)


def _committed_tables() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return {p for p in out.splitlines() if p.endswith(".md") and not p.endswith("README.md")}


def test_every_committed_results_table_is_quoted_somewhere():
    quoted = {b.source for b in _all_blocks(ROOT)}
    unquoted = sorted(_committed_tables() - quoted)
    assert not unquoted, f"committed results tables that no doc quotes (add an include block): {unquoted}"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _tree(tmp_path: Path, body: str) -> Path:
    _write(tmp_path / "results" / "t" / "table.md", "| a | b |\n| --- | --- |\n| 1 | 2 |\n")
    _write(tmp_path / "README.md",
           f"# doc\n\nbefore\n\n<!-- table: results/t/table.md -->\n{body}<!-- /table -->\n\nafter\n")
    return tmp_path


def test_a_stale_block_is_reported_then_rewritten(tmp_path, capsys):
    root = _tree(tmp_path, "\n| a | b |\n| --- | --- |\n| 1 | 3 |\n\n")
    readme = root / "README.md"
    before = readme.read_text()

    assert doc_tables.main(["--check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "README.md:5: results/t/table.md" in out and "doc_tables.py" in out
    assert readme.read_text() == before  # check mode changes nothing

    assert doc_tables.main(["--root", str(root)]) == 0
    text = readme.read_text()
    assert "| 1 | 2 |" in text and "| 1 | 3 |" not in text
    assert text.startswith("# doc\n\nbefore\n\n<!-- table: results/t/table.md -->\n")
    assert text.endswith("<!-- /table -->\n\nafter\n")
    assert doc_tables.main(["--check", "--root", str(root)]) == 0
    # a second rewrite changes nothing
    doc_tables.main(["--root", str(root)])
    assert readme.read_text() == text


def test_an_empty_block_is_filled(tmp_path):
    root = _tree(tmp_path, "")
    assert doc_tables.main(["--root", str(root)]) == 0
    assert "\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n<!-- /table -->" in (root / "README.md").read_text()


def test_a_block_naming_a_missing_file_fails(tmp_path, capsys):
    root = _tree(tmp_path, "")
    _write(root / "docs" / "x.md", "<!-- table: results/nope.md -->\n<!-- /table -->\n")
    assert doc_tables.main(["--check", "--root", str(root)]) == 2
    assert "docs/x.md:1: results/nope.md: no such file" in capsys.readouterr().err
    assert doc_tables.main(["--root", str(root)]) == 2


def test_an_unclosed_block_fails(tmp_path, capsys):
    root = _tree(tmp_path, "")
    _write(root / "docs" / "y.md", "<!-- table: results/t/table.md -->\n| old |\n")
    assert doc_tables.main(["--check", "--root", str(root)]) == 2
    assert "docs/y.md" in capsys.readouterr().err


def test_an_indented_marker_is_an_example_not_a_block(tmp_path):
    root = _tree(tmp_path, "")
    _write(root / "docs" / "z.md", "    <!-- table: results/nope.md -->\n    <!-- /table -->\n")
    assert doc_tables.blocks(root / "docs" / "z.md", root) == []


def _relative_links(doc: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", doc.read_text(encoding="utf-8")))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor in the same page
        targets.append(target)
    return targets


@pytest.mark.parametrize("doc", doc_tables.doc_files(ROOT), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_an_existing_file(doc):
    broken = [t for t in _relative_links(doc) if not (doc.parent / t.split("#")[0]).exists()]
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_the_link_check_sees_links():
    assert "docs/setup.md" in _relative_links(ROOT / "README.md")


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines < 300, f"README.md has {lines} lines; move detail into docs/"
