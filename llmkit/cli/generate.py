"""`llmkit generate`: one prompt (streamed if asked) or a file of prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from llmkit.cli.options import BaseModel, shown, with_settings
from llmkit.errors import LlmkitError
from llmkit.inference.generate import GenerationSettings

EXAMPLES = """\
llmkit generate --model runs/gpt --prompt "Once upon a time" --stream
llmkit generate -m runs/gpt -p "ROMEO:" --temperature 0.8 --top-p 0.95 \\
    --seed 1
llmkit generate -m runs/gpt --input prompts.txt --output out.jsonl
llmkit generate -m runs/en-ro --prompt "The house is small."  # seq2seq too
llmkit generate -m ./gpt2 --chat --chat-template chatml.jinja -p "Hi" --stream"""


@with_settings(GenerationSettings, "Decoding")
def generate_text(
    model: Annotated[str, typer.Option("--model", "-m", help="Run directory, local checkpoint "
                     "or Hub id (causal or seq2seq), or an llmkit export folder (ONNX).")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="One prompt.")] = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="Prompts: .txt (one per "
                     "line) or .jsonl (a 'prompt' field).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSON lines to write "
                      "(batch mode).")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they come.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Chat: the prompt is a user turn (a "
                    "--input .jsonl may hold 'messages'), in the chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="--chat: a system message first.")] = None,
    chat_template: Annotated[str | None, typer.Option(help="--chat: a Jinja chat template "
                             "file, for a model whose tokenizer has none.")] = None,
    batch_size: Annotated[int, typer.Option(help=shown("Prompts per batch.", 16),
                                            show_default=False, min=1)] = 16,
    base_model: BaseModel = None,
    settings: GenerationSettings | None = None,
) -> None:
    """Generate text with a causal or seq2seq model: one prompt, or a file of prompts."""
    from llmkit.data.read import check_output_file
    from llmkit.inference.exported import check_source
    from llmkit.inference.generate import generate, load_prompts, read_prompts

    assert settings is not None
    check_request(prompt, input, stream, chat, system, settings, chat_template)
    check_source(model)  # before torch and transformers load: a mistyped path is quick
    if output is not None:
        check_output_file(output)
    given = [prompt] if prompt is not None else read_prompts(str(input), chat)
    net, tokenizer, prompts = load_prompts(model, given, chat, system, base_model,
                                           chat_template)
    if stream:
        from transformers import TextStreamer

        generate(net, tokenizer, prompts, settings, streamer=TextStreamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True), templated=chat)
        return  # the streamer ends with a newline
    if output is None:
        for record in generate(net, tokenizer, prompts, settings, batch_size, templated=chat):
            texts = record["output"] if settings.num_return_sequences > 1 else [record["output"]]
            for text in texts:
                print(text if input is None else json.dumps(record, ensure_ascii=False))
        return
    from llmkit.inference.predict import write_jsonl

    records = with_progress(net, tokenizer, prompts, settings, batch_size, chat)
    write_jsonl(records, output)
    typer.echo(f"{len(records)} generations written to {output}")


def check_request(prompt: str | None, input: str | None, stream: bool, chat: bool,
                  system: str | None, settings: GenerationSettings,
                  chat_template: str | None = None) -> None:
    """Options that contradict each other, and a missing --chat-template file, refused before
    a model is loaded."""
    from llmkit.tasks.chat import check_template_file

    if (prompt is None) == (input is None):
        raise LlmkitError("give either --prompt or --input")
    if stream and (input or (settings.num_beams or 1) > 1 or settings.num_return_sequences > 1
                   or settings.stop):
        raise LlmkitError("--stream prints one sequence for one --prompt: drop --input, "
                          "--num-beams, --num-return-sequences and --stop")
    if system is not None and not chat:
        raise LlmkitError("--system is a message of a conversation: add --chat")
    if chat_template is not None and not chat:
        raise LlmkitError("--chat-template is the template of a conversation: add --chat")
    check_template_file(chat_template)


def with_progress(net: Any, tokenizer: Any, prompts: list[str], settings: GenerationSettings,
                  batch_size: int, chat: bool) -> list[dict[str, Any]]:
    """generate() under a progress bar counting prompts and new tokens per second."""
    from rich.progress import Progress

    from llmkit.cli.terminal import console
    from llmkit.inference.generate import generate

    with Progress(*Progress.get_default_columns(), "{task.fields[speed]}",
                  console=console) as progress:
        bar = progress.add_task("generating", total=len(prompts), speed="")
        tokens = [0]

        def advance(done: int, new: int) -> None:
            tokens[0] += new
            elapsed = progress.tasks[bar].elapsed or 1e-9
            progress.update(bar, advance=done, speed=f"{tokens[0] / elapsed:.1f} new tokens/s")

        return generate(net, tokenizer, prompts, settings, batch_size, on_batch=advance,
                        templated=chat)
