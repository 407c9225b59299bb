"""MkDocs hook: the pages that must say what the code says are written from the code at build
time, so the site and `--help` cannot disagree.

- `<!-- cli-reference -->` becomes every command of the Typer app (`typer.main.get_command`):
  its help, usage, arguments, options by help panel, and the examples of its epilog.
- `<!-- config-reference -->` becomes every setting of llmkit/config/schema.py and of each
  task's settings class: its recipe key (= `-s` path), its option as the CLI makes it, type,
  default, range and help string.
- `<!-- tasks-grouped-inside -->` and `<!-- tasks-grouped-across -->` become the tasks whose
  `Task.group_inside` is set, or not: how each task groups rows by length.

Nothing here reaches the network; the app is imported as `llmkit --help` imports it.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from typing import Any, get_args, get_origin

CLI_MARK = "<!-- cli-reference -->"
CONFIG_MARK = "<!-- config-reference -->"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_reference())
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, config_reference())
    if "<!-- tasks-grouped-" in markdown:
        from llmkit.tasks import registry

        for mark, inside in (("inside", True), ("across", False)):
            names = [f"`{t.name}`" for t in registry().values() if t.group_inside == inside]
            markdown = markdown.replace(f"<!-- tasks-grouped-{mark} -->", ", ".join(names))
    return markdown


# ---------------------------------------------------------------------------- the CLI reference

def plain(text: str | None) -> str:
    """Help text as a reader sees it: Rich markup gone, escapes undone, one paragraph."""
    from rich.text import Text

    return " ".join(Text.from_markup(text or "").plain.split())


def cell(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped, options and paths as code where bare."""
    return text.replace("|", "\\|")


def cli_reference() -> str:
    import typer.main

    from llmkit.cli import app

    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="llmkit")
    return "\n".join(command_docs(root, ctx, "llmkit", 2))


def command_docs(command: Any, ctx: Any, path: str, level: int) -> list[str]:
    """A command's section, then its subcommands' (one heading level down)."""
    lines = [f"{'#' * level} `{path}`", ""]
    text = (command.help or "").strip()
    if text:
        lines += [plain(part) + "\n" for part in text.split("\n\n")]
    pieces = command.collect_usage_pieces(ctx)
    lines += ["```text", f"{path} {' '.join(pieces)}".rstrip(), "```", ""]
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)
              and p.name != "help"]
    arguments = [p for p in params if p.param_type_name == "argument"]
    if arguments:
        lines += ["| argument | type | |", "|---|---|---|"]
        lines += [f"| `{a.display_name_raw}` | {type_name(a, ctx)} | "
                  f"{cell(plain(getattr(a, 'help', '')) + extras(a, ctx))} |" for a in arguments]
        lines.append("")
    panels: dict[str, list[Any]] = {}
    for option in (p for p in params if p.param_type_name == "option"):
        panels.setdefault(getattr(option, "rich_help_panel", None) or "Options", []).append(option)
    for panel, options in panels.items():
        lines += [f"**{panel}**", "", "| option | type | |", "|---|---|---|"]
        lines += [f"| {names(o)} | {type_name(o, ctx)} | {cell(plain(o.help) + extras(o, ctx))} |"
                  for o in options]
        lines.append("")
    lines += examples(command.epilog)
    subcommands = getattr(command, "commands", {})
    for name in subcommands:
        sub = subcommands[name]
        lines += command_docs(sub, typer_context(sub, ctx, name), f"{path} {name}", level + 1)
    return lines


def typer_context(command: Any, parent: Any, name: str) -> Any:
    import typer

    return typer.Context(command, parent=parent, info_name=name)


def names(option: Any) -> str:
    """`--lora-r`, `-m` / `--model`, `--overwrite` / `--no-overwrite`."""
    shown = [*option.opts, *option.secondary_opts]
    return " ".join(f"`{n}`" for n in sorted(shown, key=lambda n: n.startswith("--")))


def type_name(param: Any, ctx: Any) -> str:
    """The type `--help` shows (`int range`, `list[str]`); a flag takes no value."""
    if getattr(param, "is_flag", False):
        return "flag"
    shown = param.display_type_rich(ctx) if hasattr(param, "display_type_rich") else None
    return cell(shown.strip("<>")) if shown else ""


def extras(param: Any, ctx: Any) -> str:
    """What `--help` adds in brackets after the help text: default, range, env var, required."""
    record = param.get_help_record(ctx)
    said = record[1][len(param.help or ""):].strip() if record else ""
    return f" {said}" if said else ""


def examples(epilog: str | None) -> list[str]:
    """The epilog's command lines (llmkit.cli.options.examples: a title, then a paragraph per
    command) as a code block."""
    if not epilog:
        return []
    title, _, body = epilog.partition("\n")
    from rich.text import Text

    commands = [Text.from_markup(c).plain.strip() for c in re.split(r"\n\s*\n", body)]
    return [f"{plain(title)}:", "", "```bash", *[c for c in commands if c], "```", ""]


# ----------------------------------------------------------------- the configuration reference

def config_reference() -> str:
    from llmkit.config.schema import AdapterConfig, DataConfig, RunConfig, TrainConfig
    from llmkit.tasks import registry

    shared = {f.name for f in fields(DataConfig)}
    lines = []
    sections = [("Run", "", RunConfig, None), ("Data (every task)", "data.", DataConfig, None),
                ("Training", "train.", TrainConfig, None),
                ("Adapters", "adapter.", AdapterConfig, None)]
    sections += [(f"`{task.name}` data", "data.", task.settings, shared)
                 for task in registry().values()]
    for title, prefix, cls, skip in sections:
        lines += [f"## {title}", ""]
        doc = (cls.__doc__ or "").strip()
        if doc and skip is None:
            lines += [" ".join(doc.split()), ""]
        if skip is not None:
            lines += [f"Options of `llmkit finetune {title.split('`')[1]}` only, besides the "
                      "[data settings of every task](#data-every-task).", ""]
        lines += ["| key (`-s` path) | option | type | default | |", "|---|---|---|---|---|"]
        lines += rows(cls, prefix, skip or set())
        lines.append("")
    return "\n".join(lines)


def rows(cls: type, prefix: str, skip: set[str]) -> list[str]:
    from typing import get_type_hints

    from llmkit.cli.options import as_option

    hints = get_type_hints(cls)
    found = []
    for f in fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        made = as_option(f, hints[f.name], "")
        option_names = [n for _, name, _ in made for n in name.split("/")]
        short = [a for a in f.metadata.get("aliases", ()) if not a.startswith("--")]
        options = " ".join(f"`{n}`" for n in [*short, *option_names])
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore
        found.append(f"| `{prefix}{f.name}` | {options} | {cell(type_text(hints[f.name]))} | "
                     f"{cell(default_text(default))} | "
                     f"{cell(' '.join(f.metadata['help'].split()) + bounds(f))} |")
    return found


def type_text(tp: Any) -> str:
    """The type as config errors name it (llmkit.config.check.describe); a tuple is a list."""
    from llmkit.config.check import describe

    if get_origin(tp) is tuple:
        return f"list of {describe(get_args(tp)[0])}"
    return describe(tp)


def default_text(value: Any) -> str:
    if value is None:
        return "—"
    if value == ():
        return "[]"
    if value == "":
        return "''"
    return f"`{value}`"


def number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def bounds(f: Any) -> str:
    """The allowed range of a setting, as llmkit.config.check enforces it."""
    minimum, maximum, above, below = f.metadata.get("bounds", (None,) * 4)
    said = [f"{sign} {number(x)}" for sign, x in (("≥", minimum), (">", above), ("≤", maximum),
                                                   ("<", below)) if x is not None]
    return f" (range: {', '.join(said)})" if said else ""
