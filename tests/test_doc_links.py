"""What README.md and docs/*.md point at exists: relative links (and their #anchors), repository paths
named in the text, the modules that ``python -m`` commands run, and dotted names of the project's own
packages (``compressor.codec``, ``partitioner.bitalloc.allocate_bits``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# A path under one of the repository's own top-level folders, as written in prose or a command.
TOP = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))
PATH = re.compile(r"(?<![\w/.~$-])((?:" + "|".join(map(re.escape, TOP)) + r")/[\w./*{},-]*[\w*}])")
MODULE = re.compile(r"python -m ((?:" + "|".join(map(re.escape, TOP)) + r")(?:\.\w+)+)")
# A dotted name whose first part is one of the repository's Python packages.
PACKAGES = [name for name in TOP if (ROOT / name / "__init__.py").is_file()]
FILE_SUFFIXES = {"md", "py", "json", "png", "yaml", "txt", "proto", "in", "toml"}
DOTTED = re.compile(r"(?<![\w/.-])((?:" + "|".join(map(re.escape, PACKAGES)) + r")(?:\.[A-Za-z_]\w*)+)")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in FENCE.sub("", markdown).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def expand(path: str) -> list[str]:
    """``a.{json,png}`` -> ``a.json``, ``a.png`` (the shell's brace expansion, one level)."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [path[: match.start()] + part + path[match.end() :] for part in match.group(1).split(",")]


def broken_links(doc: Path) -> list[str]:
    """Relative links in ``doc`` (outside code blocks) to a missing file or a missing heading."""
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


def dotted_name_exists(name: str, root: Path = ROOT) -> bool:
    """``a.b.c``: each part a module or package under ``root`` until one is not; that one must be defined
    (or imported) in the module before it, by its text alone (nothing is imported)."""
    parts = name.split(".")
    path = root / parts[0]
    for part in parts[1:]:
        if (path / part / "__init__.py").is_file() or (path / part).with_suffix(".py").is_file():
            path = path / part
            continue
        source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        return source.is_file() and defines(source.read_text(), part)
    return True


def defines(source: str, name: str) -> bool:
    """Whether module text defines or imports ``name`` (a def, a class, an assignment, an import)."""
    n = re.escape(name)
    patterns = (
        rf"^\s*(?:async\s+)?(?:def|class)\s+{n}\b",  # def name / class name
        rf"^\s*{n}\s*(?::[^=\n]*)?=",  # name = ... / name: T = ...
        rf"^\s*(?:from\s+\S+\s+)?import\s+[^\n(]*\b{n}\b(?!\s+as\b)",  # import name / from x import a, name
        rf"^\s+{n},?\s*(?:#.*)?$",  # one name per line inside from x import (...)
        rf"\bas\s+{n}\b",  # import x as name
    )
    return any(re.search(pattern, source, re.M) for pattern in patterns)


def missing_names(doc: Path, root: Path = ROOT) -> list[str]:
    """Repository paths (globs and braces allowed), ``python -m`` modules and dotted names of the project's
    packages that ``doc`` names and that do not exist."""
    text = doc.read_text()
    missing = []
    for written in PATH.findall(text):
        for path in expand(written.rstrip(".,")):
            if not any(root.glob(path)) and not any(root.glob(path + ".*")):  # or an --out prefix
                missing.append(path)
    for module in MODULE.findall(text):
        base = root.joinpath(*module.split("."))
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            missing.append(f"python -m {module}")
    for name in DOTTED.findall(text):
        if name.rsplit(".", 1)[1] in FILE_SUFFIXES:  # benchmarks.md: a file name, not a module
            continue
        if not dotted_name_exists(name.rstrip("."), root):
            missing.append(name)
    return sorted(set(missing))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_existing_files_and_headings(doc: Path) -> None:
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_repository_paths_and_modules_named_in_the_text_exist(doc: Path) -> None:
    assert missing_names(doc) == []


def test_every_docs_page_is_listed_in_the_index() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    listed = set(LINK.findall(index))
    unlisted = [p.name for p in DOCS[1:] if p.name != "index.md" and p.name not in listed]
    assert not unlisted, f"docs/index.md does not list {unlisted}"


def test_a_name_counts_as_defined_only_where_it_is_bound() -> None:
    source = "from .a import (\n    one,\n    two,  # why\n)\nfrom .b import three as four\nFIVE: int = 5\n"
    source += 'def six():\n    """seven is only mentioned"""\nclass Eight:\n    pass\n'
    assert all(defines(source, name) for name in ("one", "two", "four", "FIVE", "six", "Eight"))
    assert not any(defines(source, name) for name in ("three", "seven", "a"))


def test_a_broken_link_a_missing_heading_and_a_missing_path_are_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## The codec: a grammar\n")
    doc = tmp_path / "page.md"
    doc.write_text(
        "[ok](other.md) [ok](other.md#the-codec-a-grammar) [web](https://example.org/x) [self](#top)\n"
        "# Top\n[gone](missing.md) [no heading](other.md#nonesuch)\n"
        "```\n[in a code block](ignored.md)\n```\n"
        "Run `tests/test_doc_links.py` and `tests/test_nonesuch.py`; see /tmp/tests/x.py and "
        "benchmarks/results/codec.{json,nonesuch}.\n"
        "python -m benchmarks.tables --check; python -m tests.nonesuch\n"
        "`partitioner.bitalloc.allocate_bits`, `compressor.codec`, `protos.cleave.v1`, `compressor.codec.nonesuch`\n"
        "[tests.md](other.md)\n"
    )
    assert broken_links(doc) == ["missing.md: no such file", "other.md#nonesuch: no heading #nonesuch in other.md"]
    assert missing_names(doc) == [
        "benchmarks/results/codec.nonesuch",
        "compressor.codec.nonesuch",
        "python -m tests.nonesuch",
        "tests.nonesuch",
        "tests/test_nonesuch.py",
    ]
