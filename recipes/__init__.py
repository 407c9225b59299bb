"""Recipes shipped with llmkit: YAML files, listed by `llmkit recipes list`."""
