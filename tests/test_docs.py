"""The documentation cannot drift from the code.

- Every block of docs/*.md marked `<!-- runnable -->` runs, a few steps each, on the tiny
  models of conftest.py and the checkout's data (examples/, docs/samples/).
- Every other `llmkit ...` command line of docs/*.md and README.md (in shell blocks and in
  inline code) names real commands and real options, checked against the Typer app without
  running anything; so are the examples that `--help` shows.
- The site builds with `mkdocs build --strict`; `llmkit --version` is pyproject.toml's version.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_examples import run

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SITE = sorted(DOCS.rglob("*.md"))
# the pages, the README, and the Markdown files the pages include (`--8<-- "CONTRIBUTING.md"`)
PAGES = [*SITE, REPO / "README.md", *sorted({REPO / name for page in SITE for name in re.findall(
    r'^--8<-- "([^":]+\.md)"', page.read_text(encoding="utf-8"), re.M)})]
RUNNABLE = "<!-- runnable -->"
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"(?P<mark><!-- runnable -->[ \t]*\n)?^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)"
                   r"[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
INLINE = re.compile(r"`(llmkit [^`]+)`")
OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", ">&"}
FEW_STEPS = ["--max-steps", "2"]  # a runnable block's finetune runs a few steps, not its epochs


@dataclass(frozen=True)
class Line:
    """One `llmkit` command line of a page: where it is, and its arguments after `llmkit`."""

    where: str
    argv: tuple[str, ...]
    inline: bool  # prose names a command (`llmkit chat`): required arguments may be left out


def blocks(text: str) -> Iterator[tuple[bool, str, str, int]]:
    """(marked runnable, language, body, line number) of each fenced block of a page."""
    for found in FENCE.finditer(text):
        body = "\n".join(line[len(found["indent"]):] for line in found["body"].splitlines())
        yield (bool(found["mark"]), found["lang"], body,
               text.count("\n", 0, found.start("indent")) + 1)


def shell_lines(body: str) -> list[tuple[int, str]]:
    """A shell block's lines (with their offset in the block), continued lines joined, prompts
    (`$ `) dropped."""
    found, start, joined = [], 0, ""
    for i, line in enumerate(body.splitlines()):
        joined, start = (joined + " " + line.strip(), start) if joined else (line.strip(), i)
        if joined.endswith("\\"):
            joined = joined[:-1].strip()
            continue
        if joined:
            found.append((start, " ".join(joined.removeprefix("$ ").split())))
        joined = ""
    return found


def commands(line: str) -> Iterator[list[str]]:
    """The llmkit argument lists of one shell line: each command between shell operators that
    runs `llmkit` (or `... -m llmkit`), after any VAR=value assignments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
    lexer.whitespace_split, lexer.commenters = True, "#"
    segment: list[str] = []
    for token in [*lexer, "|"]:
        if token not in OPERATORS:
            segment.append(token)
            continue
        words = segment
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words[:1] == ["llmkit"]:
            yield words[1:]
        elif "llmkit" in words and words[words.index("llmkit") - 1] == "-m":
            yield words[words.index("llmkit") + 1:]
        segment = []


def doc_lines() -> list[Line]:
    """Every llmkit command line of the pages: shell blocks, then inline code."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(REPO)
        for _, lang, body, number in blocks(text):
            if lang in SHELL:
                for offset, line in shell_lines(body):
                    found += [Line(f"{name}:{number + 1 + offset}: {line}", tuple(argv), False)
                              for argv in commands(line)]
        prose = FENCE.sub("", text)
        for span in INLINE.findall(prose):
            span = " ".join(span.split())
            found += [Line(f"{name}: `{span}`", tuple(argv), True) for argv in commands(span)]
    return found


def help_examples() -> list[Line]:
    """The example command lines of every command's --help (the CLI reference shows them)."""
    found = []

    def walk(command: object, path: str) -> None:
        epilog = getattr(command, "epilog", None) or ""
        for text in re.split(r"\n\s*\n", epilog.partition("\n")[2]):
            for argv in commands(" ".join(text.replace("\\\n", " ").split())):
                found.append(Line(f"{path} --help: {text.strip()}", tuple(argv), False))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(cli(), "llmkit")
    return found


# ------------------------------------------------------------------ checking against the CLI

@functools.cache
def cli() -> object:
    """The Typer app as click commands, as `llmkit` parses its arguments."""
    import typer.main

    from llmkit.cli import app

    return typer.main.get_command(app)


def option_names(command: object) -> dict[str, object]:
    """Every option name of a command (hidden aliases such as --lr included, --help too)
    -> its param."""
    import typer

    params = command.get_params(typer.Context(command))
    return {name: p for p in params if p.param_type_name == "option"
            for name in (*p.opts, *p.secondary_opts)}


def takes_value(param: object) -> bool:
    return not getattr(param, "is_flag", False) and not getattr(param, "count", False)


def problems(argv: list[str], inline: bool) -> list[str]:
    """What is wrong with `llmkit ARGV` as the CLI would parse it; nothing is run."""
    # the forms llmkit.cli.main rewrites before Typer parses them
    argv = [{"--dry-run=measure": "--measure", "--dry-run=plan": "--dry-run"}.get(a, a)
            for a in argv]
    return check(cli(), cli(), "llmkit", argv, inline)


def check(root: object, command: object, path: str, args: list[str], inline: bool
          ) -> list[str]:
    subcommands: dict[str, object] = getattr(command, "commands", {})
    if subcommands:  # a group: its own options, then a subcommand (TASK or ...: every one)
        known = option_names(command)
        while args and args[0].startswith("-"):
            if args[0].split("=")[0] not in known:
                return [unknown(path, args[0], known)]
            args = args[1:]
        if not args:
            return []
        if args[0].isupper() or args[0] == "...":
            return [p for name, sub in subcommands.items()
                    for p in check(root, sub, f"{path} {name}", args[1:], inline)]
        if args[0] not in subcommands:
            close = difflib.get_close_matches(args[0], subcommands, n=1)
            return [f"{path} has no command {args[0]!r}"
                    + (f" (did you mean {close[0]}?)" if close else "")]
        return check(root, subcommands[args[0]], f"{path} {args[0]}", args[1:], inline)
    return check_leaf(root, command, path, args, inline)


def check_leaf(root: object, command: object, path: str, args: list[str], inline: bool
               ) -> list[str]:
    known = option_names(command)
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    given: set[str] = set()
    positional: list[str] = []
    interspersed = (getattr(command, "context_settings", None) or {}).get(
        "allow_interspersed_args", True)
    while args:
        token, args = args[0], args[1:]
        if token == "...":  # an elided part of the line
            continue
        if token == "--":
            positional += args
            break
        if token.startswith("-") and len(token) > 1 and not re.match(r"^-\d", token):
            name = token.split("=")[0]
            if name not in known:
                return [unknown(path, token, known)]
            given.add(known[name].name)
            if takes_value(known[name]) and "=" not in token:
                if not args and not inline:  # prose may name an option alone
                    return [f"{path}: {name} needs a value"]
                args = args[1:]
            continue
        if not interspersed:  # llmkit launch: the rest is the command it starts
            if token != "finetune":
                return [f"{path}: expected `finetune TASK ...` after its options, not {token!r}"]
            return check(root, root, "llmkit", [token, *args], inline)
        positional.append(token)
    found = []
    most = sum(-1 if p.nargs == -1 else p.nargs for p in arguments)
    if any(p.nargs == -1 for p in arguments):
        most = len(positional)
    if len(positional) > most:
        found.append(f"{path}: unexpected argument {positional[most]!r}")
    if not inline and "help" not in given:
        needed = [p for p in arguments if p.required][len(positional):]
        needed += [p for p in known.values() if p.required and p.name not in given]
        found += [f"{path}: missing {p.opts[0] if p.param_type_name == 'option' else p.name}"
                  for p in dict.fromkeys(needed)]
    return found


def unknown(path: str, token: str, known: dict[str, object]) -> str:
    name = token.split("=")[0]
    close = difflib.get_close_matches(name, list(known), n=1)
    return (f"{path} has no option {name}" + (f" (did you mean {close[0]}?)" if close else "")
            + f"; see {path} --help")


LINES = doc_lines()


def test_every_command_line_of_the_docs_names_real_commands_and_options() -> None:
    """A renamed option, a removed command or a typo in any page or the README fails here,
    naming the page, its line and what the CLI has instead."""
    assert len(LINES) > 150, len(LINES)  # the pages are read (a broken reader finds nothing)
    wrong = [f"{line.where}\n    {p}" for line in LINES for p in problems(list(line.argv),
                                                                        line.inline)]
    assert not wrong, "command lines the CLI does not accept:\n" + "\n".join(wrong)


def test_the_examples_in_help_are_real_command_lines() -> None:
    lines = help_examples()
    assert len(lines) > 20
    wrong = [f"{line.where}\n    {p}" for line in lines for p in problems(list(line.argv),
                                                                        line.inline)]
    assert not wrong, "\n".join(wrong)


def test_the_checker_catches_what_drifts() -> None:
    """The checks themselves: each of these is a doc line gone stale."""
    for argv, said in [
        ("finetune classify --lrr 3 --output x", "no option --lrr (did you mean --lr?)"),
        ("finetune clasify --output x", "no command 'clasify' (did you mean classify?)"),
        ("finetune TASK --doc-stride 64", "llmkit finetune classify has no option --doc-stride"),
        ("launch --nodes 2 finetune qa --stride 3", "finetune qa has no option --stride"),
        ("merge runs/a runs/b --output m", "unexpected argument 'runs/b'"),
        ("predict --input x.csv", "llmkit predict: missing --model"),
    ]:
        assert any(said in p for p in problems(shlex.split(argv), False)), (argv, said)
    assert not problems(shlex.split("finetune TASK --help"), False)
    assert not problems(shlex.split("launch --nodes 2 --node-rank 1 --master h:1 --show "
                                    "finetune ..."), False)
    assert [a for line in ["printf 'hi\\n' | llmkit chat runs/c > out.txt",
                           "A=1 torchrun --nproc_per_node 2 -m llmkit eval -m bleu -p h -r r"]
            for a in commands(line)] == [["chat", "runs/c"],
                                         ["eval", "-m", "bleu", "-p", "h", "-r", "r"]]


# ------------------------------------------------------------------------- runnable blocks

def runnable() -> list[tuple[str, str]]:
    return [(f"{page.relative_to(REPO)}:{number}", body) for page in PAGES
            for marked, _, body, number in blocks(page.read_text(encoding="utf-8")) if marked]


RUNNABLE_BLOCKS = runnable()


@pytest.mark.parametrize("body", [b for _, b in RUNNABLE_BLOCKS],
                         ids=[w for w, _ in RUNNABLE_BLOCKS])
def test_a_runnable_block_runs(body: str, tiny_bert: Path, tiny_gpt2: Path, tmp_path: Path,
                               capsys, monkeypatch) -> None:
    """The block's commands in order, from a folder where the checkout's examples/ and docs/
    are at hand: the quick start's MiniLM (`$MODEL`) is conftest's tiny BERT, make.py's GPT-2
    is conftest's tiny GPT-2 (tests/test_examples.py runs make.py itself), and each finetune
    runs a few steps."""
    for name in ("examples", "docs"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    models = {"$MODEL": str(tiny_bert), "examples/offline/models/gpt2": str(tiny_gpt2)}
    ran = 0
    for _, line in shell_lines(body):
        if re.match(r"^MODEL=\$\(.*\)$", line) or line == "python examples/offline/make.py":
            continue  # stood in for by the fixtures
        argvs = list(commands(line))
        assert argvs and line.startswith("llmkit "), f"the doc test cannot run {line!r}"
        for argv in argvs:
            argv = [models.get(a, a) for a in argv]
            if argv[0] == "finetune":
                argv += FEW_STEPS
            run(argv, capsys, monkeypatch)
            ran += 1
    assert ran


def test_the_runnable_blocks_are_few_and_cover_the_tasks_samples() -> None:
    """At most a handful (each trains), and each sample file in docs/samples/ is used by one."""
    assert 1 <= len(RUNNABLE_BLOCKS) <= 4, [w for w, _ in RUNNABLE_BLOCKS]
    used = " ".join(body for _, body in RUNNABLE_BLOCKS)
    for sample in sorted((DOCS / "samples").iterdir()):
        assert f"docs/samples/{sample.name}" in used, sample.name


# ------------------------------------------------------------------------ the site, the version

def test_the_readme_s_links_lead_somewhere() -> None:
    """The README is read on GitHub and PyPI, outside the site's link check."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in t]
    assert len(links) > 20 and not [t for t in links if not (REPO / t).exists()]
    assert len(text.splitlines()) <= 150  # a two-minute read: the rest is on the site



def test_the_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    """`mkdocs build --strict`, as the README says: a broken link or anchor, a missing page or
    an included file that moved fails the build."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e .[docs])")
    pytest.importorskip("material", reason="mkdocs-material is not installed "
                                           "(pip install -e .[docs])")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                            str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                           timeout=300, env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    config = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text(
        encoding="utf-8")
    assert "llmkit finetune dpo" in cli and "--collective-timeout" in cli  # generated
    assert "train.learning_rate" in config and "Peak learning rate." in config


def test_llmkit_version_is_pyproject_s(capsys, monkeypatch) -> None:
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(
        encoding="utf-8"), re.M)
    assert version
    out, _ = run(["--version"], capsys, monkeypatch)
    assert out.strip() == f"llmkit {version[1]}", (
        "the installed llmkit is not pyproject.toml's version: reinstall it (pip install -e .)")
