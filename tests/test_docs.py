"""The front door and the docs: the README fits one screenful of reading (at most 200 lines),
keeps its two commands, and every relative link in it and in docs/ reaches a file (and a
heading, where it names one) inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
COMMANDS = [
    "python3 -m venv .venv && . .venv/bin/activate && bash launch/install.sh && cpe-ray train",
    "python3 -m venv .venv && . .venv/bin/activate && bash launch/install.sh --test --vllm "
    "--smollm2 && python -m pytest -q",
]


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code, where a bracket is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    out = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}: {target}"
        if not dest.is_relative_to(root):
            out.append(f"{where} points outside the repository")
        elif not dest.exists():
            out.append(f"{where} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{where} names no heading of {dest.relative_to(root)}")
    return out


def test_the_readme_is_at_most_200_lines_and_keeps_its_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    lines = text.splitlines()
    for command in COMMANDS:
        assert command in lines


def test_every_relative_link_reaches_a_file_and_heading_in_the_repository() -> None:
    assert len(PAGES) > 5  # the docs were found
    assert [b for page in PAGES for b in broken_links(page)] == []


def test_nothing_points_outside_the_repository() -> None:
    for page in PAGES:
        assert "../shared" not in page.read_text(), page


def test_the_link_checker_finds_a_missing_file_an_outside_path_and_a_missing_heading(
        tmp_path: Path) -> None:
    assert slug("The learner's forward: `grm train` (2.5)") == "the-learners-forward-grm-train-25"
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text("# Repo\n\n## The two commands\n")
    page = root / "docs" / "probe.md"
    page.write_text("# Probe\n\n[a](nowhere.md) [b](../../x.md) [c](#probe) [d](#gone)\n"
                    "[g](../README.md#the-two-commands) `[e](skipped.md)` [f](https://a.b)\n"
                    "```\n[h](in-a-code-block.md)\n```\n")
    assert broken_links(page, root) == [
        "docs/probe.md: nowhere.md does not exist",
        "docs/probe.md: ../../x.md points outside the repository",
        "docs/probe.md: #gone names no heading of docs/probe.md"]
