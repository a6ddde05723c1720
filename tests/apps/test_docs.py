"""The user documents name only what exists: every repository path and every method name they mention.

Documents drift as files move and methods are renamed (a README pointing at a file that is gone, a table of
methods that no longer resolve); this reads README.md, docs/*.md and scenes/README.md and checks each mention.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import st3

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "scenes/README.md"]

#: A path into the repository: a top-level folder (or the scenes package's) followed by a name.
PATH = re.compile(r"(?<![\w./~-])((?:\.ci|st3|tests|scenes|docs|benchmarks|requirements|st3_scenes|scripts)/[\w./+-]*)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
#: Where a method is named: st3.get / st3.match calls, `-m NAME` (not `python -m`), `method=NAME`, `a+b`.
METHOD = [
    re.compile(r"`([a-z0-9]+\+[a-z0-9+]+)`"),
    re.compile(r"st3\.(?:get|match)\(\"([^\"]+)\""),
    re.compile(r"(?<!python)(?<!python3) -m ([a-z0-9+]+)(?=[\s:`]|$)", re.MULTILINE),
    re.compile(r"\bmethod=([a-z0-9+]+)(?=[\s,:`]|$)", re.MULTILINE),
]


def methods_named(text: str) -> set[str]:
    """Method names in `text`: the patterns above, and the first cells (`name`) of tables headed `method`/`name`."""
    named = {name for pattern in METHOD for name in pattern.findall(text)}
    in_table = False
    for line in text.splitlines():
        if re.match(r"\| (method|name) \|", line):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table:
            named |= set(re.findall(r"`([a-z0-9+]+)`", line.split("|")[1]))
    return named


def paths(doc: Path) -> set[str]:
    text = doc.read_text()
    found = {match.rstrip(".,:;") for match in PATH.findall(text)}
    found |= {link for link in LINK.findall(text) if not link.startswith(("http:", "https:", "mailto:"))}
    return found


def exists(doc: Path, mention: str) -> bool:
    bases = (ROOT, doc.parent, ROOT / "scenes")
    return any((base / mention).exists() for base in bases)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_path_a_document_mentions_exists(doc):
    missing = sorted(mention for mention in paths(doc) if not exists(doc, mention))
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_method_a_document_names_is_registered(doc):
    named = methods_named(doc.read_text()) - {"none"}  # lmms-eval's method=none: unpruned
    unknown = sorted(named - set(st3.methods()))
    assert not unknown, f"{doc.relative_to(ROOT)} names methods that are not registered: {unknown}"


def test_the_checks_see_the_mentions():
    """Both checks find what they are for (a pattern that matched nothing would check nothing)."""
    readme = ROOT / "README.md"
    assert {"st3/compat.py", "tests/reference.py", "docs/st3.md"} <= paths(readme)
    assert {"st3", "spread", "fastv", "stratified", "st3+dart", "fastv+vta"} <= methods_named(readme.read_text())
    assert not exists(readme, "st3/tiny.py")
