"""The docs name files that exist, and docs/architecture.md names every module."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:exocortex|bench|tests|scripts|docs)/[\w/.-]*\w/?)")


def test_every_path_the_docs_name_exists():
    missing = []
    for doc in DOCS:
        for m in PATH.finditer(doc.read_text()):
            path = m.group(1)
            if "<" in path or "*" in path:
                continue
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert missing == []


DOTTED = re.compile(r"\bexocortex(?:\.[a-z_]+)+")


def test_every_module_the_docs_import_exists():
    """`from exocortex.x.y import z` and exocortex.x.y.z in the docs: the longest module prefix is a file."""
    missing = []
    for doc in DOCS:
        for m in DOTTED.finditer(doc.read_text()):
            parts = m.group(0).split(".")
            found = any((ROOT / "/".join(parts[:i])).with_suffix(".py").exists() or
                        (ROOT / "/".join(parts[:i]) / "__init__.py").exists() for i in range(2, len(parts) + 1))
            if not found:
                missing.append(f"{doc.name}: {m.group(0)}")
    assert missing == []


def test_the_architecture_doc_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    unnamed = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "exocortex").rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py")
               and str(p.relative_to(ROOT)) not in text and f"`{p.name}`" not in text]
    assert unnamed == []
