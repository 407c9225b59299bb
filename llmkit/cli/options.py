"""Command-line options made from settings dataclasses: each field's name, type, default, help
and range are written once, on the field (`llmkit.config.schema.setting`), and Typer reads the
options from a signature built here. `finetune TASK`, `generate` and `eval` are made this way."""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import typer
from rich.markup import escape

from llmkit.config.check import check_settings


def shown(help: str, default: Any) -> str:
    """Help text with its default, in the style of every generated option."""
    return f"{escape(help)} [dim](default: {escape(str(default))})[/]"


def parameters(function: Callable[..., Any]) -> list[inspect.Parameter]:
    return list(inspect.signature(function, eval_str=True).parameters.values())


def as_option(f: Any, tp: Any, panel: str) -> list[tuple[inspect.Parameter, str, bool]]:
    """Keyword parameters for one settings field, None meaning 'not given': the option, then a
    hidden one per alias (`--lr`). Each with its option name, and True where the flag sets the
    field to False (`--no-group-by-length` for a field that defaults to True)."""
    name = "--" + f.name.replace("_", "-")
    optional = get_origin(tp) in (Union, types.UnionType)
    kind = next(a for a in get_args(tp) if a is not type(None)) if optional else tp
    default = None if f.default is MISSING else f.default
    text, decl, flip = escape(f.metadata.get("help", "")), name, False
    if kind is bool and default is not None:  # one flag, the side that changes the default
        decl, flip = (f"--no-{name[2:]}", True) if default else (name, False)
        text = f"Turn off (on by default): {text}" if flip else text
    elif kind is bool:
        decl = f"{name}/--no-{name[2:]}"
    elif default not in ("", None, ()):
        text = shown(f.metadata.get("help", ""), default)
    aliases = [a for a in f.metadata.get("aliases", ()) if a.startswith("--")]
    short = [a for a in f.metadata.get("aliases", ()) if not a.startswith("--")]
    if aliases:
        text += f" [dim](also {', '.join(aliases)})[/]"
    repeated = get_origin(kind) is tuple
    kind = {Literal: str, tuple: list[str]}.get(get_origin(kind), kind)
    made = []
    for i, names in enumerate([[decl, *short], *([a] for a in aliases)]):
        option = typer.Option(*names, help=text, show_default=False, rich_help_panel=panel,
                              hidden=i > 0, metavar="<str>" if repeated else None)
        made.append((inspect.Parameter(f"{'no_' if flip else ''}{f.name}{'_' * i}",
                                       inspect.Parameter.KEYWORD_ONLY, default=None,
                                       annotation=Annotated[kind | None, option]),
                     names[0], flip))
    return made


BaseModel = Annotated[str | None, typer.Option(help="The base model of an adapter (--lora) run, "
                                               "if not the one it was trained from.")]
Paths = dict[str, tuple[str, bool]]  # parameter -> (config path or field, flag flips it)
OPTIONS: dict[str, set[str]] = {}  # task -> the option names of its finetune command
PATHS: dict[str, dict[str, str]] = {}  # task -> field name -> dotted config path


def options_of(found: list[tuple[str, Any, Any]], panels: list[str]
               ) -> tuple[list[tuple[str, inspect.Parameter]], Paths, set[str]]:
    """Parameters (with their panel's place) for (path, field, type) triples, where they go,
    and the option names."""
    made: list[tuple[str, inspect.Parameter]] = []
    paths: Paths = {}
    names: set[str] = set()
    for (path, f, tp), panel in zip(found, panels, strict=True):
        for param, name, flip in as_option(f, tp, panel):
            made.append((panel, param))
            paths[param.name] = (path, flip)
            names.update(name.split("/"))
    return made, paths, names


def chosen(given: dict[str, Any], paths: Paths) -> dict[str, Any]:
    """The values given on the command line, by path (an alias after its own option)."""
    values: dict[str, Any] = {}
    for key, value in sorted(given.items()):
        path, flip = paths[key]
        if value not in (None, []):
            values[path] = tuple(value) if isinstance(value, list) else (
                not value if flip else value)
        else:
            values.setdefault(path, None)
    return values


def signed(command: Callable[..., Any], params: list[inspect.Parameter], doc: str | None
           ) -> Callable[..., Any]:
    """`command(**options)` with the signature Typer reads its options from."""
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


def with_settings(cls: type, panel: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A command's options plus one per field of the settings dataclass `cls`; the command
    receives `settings=cls(...)` built from the values given, checked against their ranges."""
    hints = get_type_hints(cls)
    made, paths, _ = options_of([(f.name, f, hints[f.name]) for f in fields(cls)],
                                [panel] * len(fields(cls)))

    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        def command(**given: Any) -> None:
            values = chosen({k: given.pop(k) for k in paths}, paths)
            settings = cls(**{k: v for k, v in values.items() if v is not None})
            check_settings(settings)
            function(**given, settings=settings)

        own = [p for p in parameters(function) if p.name != "settings"]
        return signed(command, own + [p for _, p in made], function.__doc__)
    return wrap


def examples(text: str) -> str:
    """Command lines as a help epilog: a paragraph each (a line ending in a backslash goes on)."""
    commands = re.split(r"(?<!\\)\n", text)
    return "[bold]Examples[/]\n\n" + "\n\n".join(f"  {c}" for c in commands) + "\n"


def finetune_problem(argv: list[str]) -> str | None:
    """What to say about an unknown task, an option of another task given to `finetune TASK`,
    or the side of a flag that is already the default; None when Typer's own message will do."""
    if len(argv) < 2 or argv[0] != "finetune" or argv[1].startswith("-"):
        return None
    if argv[1] not in OPTIONS:
        return f"unknown task {argv[1]!r}; the tasks are {', '.join(OPTIONS)}"
    task, known = argv[1], OPTIONS[argv[1]]
    for name in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
        owners = [t for t, names in OPTIONS.items() if name in names and name not in known]
        if owners:
            return (f"{name} is an option of llmkit finetune {' and '.join(owners)}, not of "
                    f"{task} (llmkit finetune {task} --help lists its options)")
        negative = name.startswith("--no-")
        field = (name[5:] if negative else name[2:]).replace("-", "_")
        other = f"--{name[5:]}" if negative else f"--no-{name[2:]}"
        if name not in known and other in known:
            return (f"{name} is the default already; to undo a recipe's value, use "
                    f"-s {PATHS[task][field]}={'false' if negative else 'true'}")
    return None
