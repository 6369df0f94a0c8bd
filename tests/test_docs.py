"""Commands that cannot rot: every `make TARGET` and `mpad COMMAND --flag` in a fenced code block of README.md and
docs/*.md must exist (the Makefile's targets; the Typer command tree of `stages.cli.app` and its params). Other
commands in those blocks (dvc, curl, git, ...) are left alone. The site's strict build is `make test`'s own line."""

from __future__ import annotations

import re
import shlex
import subprocess
from functools import cache
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(text: str) -> list[tuple[int, str]]:
    """The fenced code blocks of a Markdown text as (1-based line number of the first line inside, body)."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def commands(block: str) -> list[tuple[int, list[str]]]:
    """(line offset, words) of each simple command of a shell block: comments dropped, split at ; && || |, the
    environment assignments before a command left out."""
    found = []
    for offset, line in enumerate(block.splitlines()):
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words = list(lexer)
        except ValueError:  # an unbalanced quote: a line of output, not a command
            continue
        command: list[str] = []
        for word in [*words, ";"]:
            if word and set(word) <= set(";&|"):
                if command:
                    found.append((offset, command))
                command = []
            elif command or not re.match(r"[A-Za-z_][A-Za-z0-9_]*=", word):  # `VAR=value cmd`: the command is cmd
                command.append(word)
    return found


@cache
def make_targets() -> frozenset[str]:
    """The Makefile's targets, as make itself reads them (its database, no recipe run)."""
    database = subprocess.run(
        ["make", "-pRrq", "-f", "Makefile", ":"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout
    targets = set()
    for line in database.splitlines():
        m = re.match(r"^([^\s#:=%][^:=]*?):(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return frozenset(targets)


@cache
def mpad_group():
    """`mpad`'s command group (a click group; Typer vendors its own click, so it is used by duck typing)."""
    from stages.cli import app

    return typer.main.get_command(app)


def check_make(words: list[str], targets: frozenset[str]) -> list[str]:
    """Problems with `make [VAR=value | -flag | TARGET]...`: each TARGET must be one of `targets`."""
    names = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
    return [f"`make {name}`: no such target in the Makefile" for name in names if name not in targets]


def check_mpad(words: list[str], group) -> list[str]:
    """Problems with `mpad COMMAND [SUB...] [--flag[=v] | value]...`: the command path must exist in the Typer
    tree, and each flag must be one of the resolved command's options (or --help)."""
    command = group
    path = ["mpad"]
    rest = words[1:]
    while hasattr(command, "list_commands") and rest and not rest[0].startswith("-"):
        ctx = command.context_class(command, info_name=" ".join(path))
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            return [f"`{' '.join([*path, rest[0]])}`: no such command"]
        path.append(rest.pop(0))
        command = sub
    known = {"--help"} | {opt for p in command.params for opt in [*p.opts, *p.secondary_opts] if opt.startswith("-")}
    flags = [w.split("=", 1)[0] for w in rest if w.startswith("-") and w != "-" and not re.match(r"-\d", w)]
    return [f"`{' '.join(path)} {flag}`: no such option" for flag in flags if flag not in known]


def check_text(text: str, targets: frozenset[str] | None = None, group=None) -> list[str]:
    """Every problem of the make and mpad commands in `text`'s fenced code blocks, as 'line N: problem'."""
    problems = []
    for first_line, block in code_blocks(text):
        for offset, words in commands(block):
            program = Path(words[0]).name
            if program == "make":
                found = check_make(words, make_targets() if targets is None else targets)
            elif program == "mpad":
                found = check_mpad(words, mpad_group() if group is None else group)
            else:
                continue
            problems += [f"line {first_line + offset}: {problem}" for problem in found]
    return problems


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_make_target_and_mpad_command_in_the_docs_exists(page):
    assert check_text(page.read_text()) == []


def test_the_docs_name_make_and_mpad_commands_at_all():
    """The check above must have something to check: the README's blocks name both kinds."""
    blocks = code_blocks((ROOT / "README.md").read_text())
    programs = [Path(words[0]).name for _, block in blocks for _, words in commands(block)]
    assert {"make", "mpad"} <= set(programs)
    assert {"run", "test", "offline"} <= make_targets()


def test_a_made_up_make_target_is_caught():
    text = "Text.\n\n```bash\nmake run JOBS=2   # fine\nmake frobnicate PRESET=offline && make test\n```\n"
    assert check_text(text) == ["line 5: `make frobnicate`: no such target in the Makefile"]


def test_a_made_up_mpad_flag_and_command_are_caught():
    text = (
        "```bash\n"
        "mpad predict --prompts p.pt --out out/ --frobnicate 3 images/*.png\n"
        "mpad serve --model m.onnx --max-batch=4 --port=9\n"
        "mpad frobnicate --category x\n"
        "MPAD_WORKDIR=/scratch/mpad ray start --address=HEAD:6379\n"  # a variable's value is no command
        "OMP_NUM_THREADS=2 mpad train --frobnicate\n"
        "```\n"
    )
    assert check_text(text) == [
        "line 2: `mpad predict --frobnicate`: no such option",
        "line 4: `mpad frobnicate`: no such command",
        "line 6: `mpad train --frobnicate`: no such option",
    ]


def test_other_commands_comments_and_output_are_left_alone():
    text = (
        "```bash\n"
        "dvc exp run -S mpts.lambda=0.5   # make frobnicate in a comment\n"
        "curl -s --frobnicate http://127.0.0.1:8000/ && git status\n"
        "```\n\n"
        "```\n"
        "experiment  it's output, with an unbalanced quote\n"
        "```\n"
    )
    assert check_text(text) == []


README_MAX_LINES = 250


def test_readme_is_a_short_guide_without_history():
    """Issue 31's README rules: at most 250 lines, no commit hash, nothing about the machine a figure was taken on."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert re.findall(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", text) == []
    machine = r"\b(quiet|busy|load average|loadavg|this machine|session)\b"
    assert re.findall(machine, text, re.IGNORECASE) == []


def anchors(page: Path) -> set[str]:
    """A page's anchors: explicit `{#id}` attributes and the slugs MkDocs gives the other headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE):
        explicit = re.search(r"\{#([\w-]+)\}\s*$", heading)
        slug = re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.lower()).strip())
        found.add(explicit.group(1) if explicit else slug)
    return found


def test_the_links_into_the_docs_resolve():
    """Docstrings keep their contract and link to docs/<page>.md#<anchor> for the rest, and the README links into
    docs/ (the site's strict build checks the links between its own pages): each must name a page and an anchor
    that exist."""
    links = set()
    for source in [ROOT / "README.md", *ROOT.glob("mpad/**/*.py")]:
        links |= {(m[0], m[1]) for m in re.findall(r"docs/([\w-]+\.md)(?:#([\w-]+))?", source.read_text())}
    assert links
    broken = [f"docs/{page}#{anchor}" for page, anchor in sorted(links) if not (ROOT / "docs" / page).is_file()]
    broken += [
        f"docs/{page}#{anchor}"
        for page, anchor in sorted(links)
        if anchor and (ROOT / "docs" / page).is_file() and anchor not in anchors(ROOT / "docs" / page)
    ]
    assert broken == []
