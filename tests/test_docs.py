"""The project's own documents: the generated config page is current, links resolve, the README is short.

- ``docs/configuration.md`` is what ``scripts/gen_config_docs.py`` writes from
  ``arena_callbacks/config.py`` (regenerated in memory here);
- every relative Markdown link in ``README.md`` and ``docs/*.md`` points to a file of the
  repository (and, into a Markdown file, to one of its headings);
- ``README.md`` stays within 10 KB;
- no file cites the old design document's name or a path outside the repository.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
README_LIMIT = 10 * 1024
# Built from pieces so that this file does not match itself.
STALE = ("DESIGN" + ".md", ".." + "/shared")

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with their numbers."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[tuple[int, str]]:
    found = []
    for n, line in _prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links (link texts in backticks become empty)
        found += [(n, m.group(1)) for m in _LINK.finditer(line)]
    return found


def _repo_files() -> list[Path]:
    """Files of the repository: tracked, or untracked and not ignored (so .venv, .git, caches are out)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout.decode("utf-8", "surrogateescape")
        return sorted({ROOT / p for p in out.split("\0") if p and (ROOT / p).is_file()})
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        skip = {".venv", ".git", "runs", ".cache", "build", "dist", "__pycache__", ".pytest_cache"}
        return sorted(
            p for p in ROOT.rglob("*")
            if p.is_file() and not any(part in skip or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
        )


def test_configuration_page_is_current():
    gen = _generator()
    expected = gen.render()
    assert gen.render() == expected, "the generator is not deterministic"
    page = ROOT / "docs" / "configuration.md"
    current = page.read_text(encoding="utf-8") if page.is_file() else ""
    assert current == expected, (
        "docs/configuration.md differs from what arena_callbacks/config.py gives; "
        "run: python scripts/gen_config_docs.py (and commit the page)"
    )


def test_configuration_page_covers_every_field():
    from arena_callbacks.config import MonitorConfig

    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for name, info in MonitorConfig.model_fields.items():
        assert f"| `{name}` |" in page
        model = info.annotation
        args = getattr(model, "__args__", None)
        model = args[0] if args else model
        for sub in getattr(model, "model_fields", {}):
            assert re.search(rf"\| `{name}(\[\])?\.{sub}` \|", page), f"{name}.{sub} missing from the page"


@pytest.mark.parametrize("example", ["examples/arena.yaml", "examples/monitor.yaml"])
def test_example_configs_load(example):
    from arena_callbacks.config import MonitorConfig

    MonitorConfig.from_file(ROOT / example)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for line, target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{line}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif not dest.is_relative_to(ROOT):
            broken.append(f"{where} (outside the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{where} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_pages_have_links_checked():
    """The link check sees links at all (a regex gone wrong would pass every page)."""
    assert any(target == "docs/probes.md" for _, target in _links(ROOT / "README.md"))


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail to a page under docs/"


def test_no_stale_references():
    hits = []
    for path in _repo_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for word in STALE:
            if word in text:
                n = text[: text.index(word)].count("\n") + 1
                hits.append(f"{path.relative_to(ROOT)}:{n}: {word}")
    assert not hits, "stale references (the design document is docs/design.md):\n" + "\n".join(hits)
