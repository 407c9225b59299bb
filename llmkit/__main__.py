"""`python -m llmkit` (and `accelerate launch -m llmkit`) run the CLI."""

from llmkit.cli import main

main()
