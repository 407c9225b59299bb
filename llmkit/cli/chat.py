"""`llmkit chat RUN`: a conversation on the terminal with a chat run (or any causal model with a
chat template), its replies streamed token by token; the model part is inference/generate.py's
(the same prompts and decoding as `llmkit generate --chat`)."""

from __future__ import annotations

import sys
from dataclasses import asdict, field, fields, make_dataclass
from typing import Annotated, Any

import typer

from llmkit.cli.options import BaseModel, with_settings
from llmkit.inference.generate import GenerationSettings

EXAMPLES = """\
llmkit chat runs/chat
llmkit chat runs/chat --system "Answer in one sentence." --temperature 0.7 --seed 1
llmkit chat ./gpt2 --chat-template chatml.jinja    # a model without one
printf 'hello\\nhow are you?\\n' | llmkit chat runs/chat > replies.txt"""

HELP = ("/system TEXT sets the system message (/system alone removes it), /reset starts the "
        "conversation again, /exit or Ctrl-D leaves; Ctrl-C stops a reply (at the prompt: "
        "leaves)")
# generate's decoding settings but those of several sequences: a reply is one, streamed
ChatSettings = make_dataclass("ChatSettings", [
    (f.name, f.type, field(default=f.default, metadata=f.metadata))
    for f in fields(GenerationSettings)
    if f.name not in ("num_beams", "num_return_sequences", "stop")], frozen=True)


@with_settings(ChatSettings, "Decoding")
def chat_command(
    run: Annotated[str, typer.Argument(help="Run directory, local checkpoint or Hub id of a "
                   "causal model with a chat template.", show_default=False)],
    system: Annotated[str | None, typer.Option(help="A system message first (/system TEXT "
                      "changes it).")] = None,
    chat_template: Annotated[str | None, typer.Option(help="A Jinja chat template file, for "
                             "a model whose tokenizer has none.")] = None,
    base_model: BaseModel = None,
    settings: Any = None,
) -> None:
    """Talk to a chat model: the conversation is kept, replies are streamed.

    Type /help for the commands. With stdin not a terminal, each line is a user turn and stdout
    holds the replies, one after another."""
    from llmkit.inference.exported import check_source
    from llmkit.inference.generate import load_chat
    from llmkit.tasks.chat import check_template_file

    decoding = GenerationSettings(**asdict(settings), num_beams=1)
    check_source(run)  # before torch and transformers load: a mistyped path is quick
    check_template_file(chat_template)
    net, tokenizer = load_chat(run, base_model, chat_template)
    Conversation(net, tokenizer, decoding, system).talk(interactive=sys.stdin.isatty())


def note(message: str) -> None:
    typer.echo(message, err=True)


class Conversation:
    """The messages so far (a system message first, if any) and the model that answers."""

    def __init__(self, net: Any, tokenizer: Any, settings: GenerationSettings,
                 system: str | None) -> None:
        self.net, self.tokenizer, self.settings = net, tokenizer, settings
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": self.system}] if self.system is not None else [])
        self.cut_said = False

    def talk(self, interactive: bool) -> None:
        """Read user turns until /exit, end of input or Ctrl-C at the prompt."""
        if interactive:
            note(f"chat: {HELP}")
        while True:
            try:
                line = input("you> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                if interactive:
                    note("")
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.answer(text)

    def command(self, text: str) -> bool:
        """A /command: False to leave."""
        name, _, rest = text.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.reset()
            note("(a new conversation)")
        elif name == "/system":
            self.system = rest.strip() or None
            self.messages = [m for m in self.messages if m["role"] != "system"]
            if self.system is not None:
                self.messages.insert(0, {"role": "system", "content": self.system})
            note("(system message set)" if self.system else "(no system message)")
        elif name == "/help":
            note(HELP)
        else:
            note(f"unknown command {name}: {HELP}")
        return True

    def answer(self, text: str) -> None:
        """The user turn answered, the reply streamed to stdout and kept; Ctrl-C stops the
        reply there (what was shown is kept)."""
        from llmkit.inference.generate import chat_prompt, generate

        self.messages.append({"role": "user", "content": text})
        prompt, dropped = chat_prompt(self.net, self.tokenizer, self.messages,
                                      self.settings.max_new_tokens)
        if dropped and not self.cut_said:
            self.cut_said = True
            note("(the conversation no longer fits the model's context: its oldest turns are "
                 "left out from here on)")
        streamer, parts = streamed(self.tokenizer)
        try:
            reply = generate(self.net, self.tokenizer, [prompt], self.settings,
                             streamer=streamer, templated=True)[0]["output"]
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            note("(reply stopped)")
            reply = "".join(parts)
        if reply:
            self.messages.append({"role": "assistant", "content": reply})
        else:
            self.messages.pop()  # nothing to keep of this turn


def streamed(tokenizer: Any) -> tuple[Any, list[str]]:
    """transformers' TextStreamer writing a reply to stdout as it comes, and the parts
    written."""
    from transformers import TextStreamer

    parts: list[str] = []

    def write(text: str, stream_end: bool = False) -> None:
        parts.append(text)
        sys.stdout.write(text + ("\n" if stream_end else ""))
        sys.stdout.flush()

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer.on_finalized_text = write  # type: ignore[method-assign]
    return streamer, parts
