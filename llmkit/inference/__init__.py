"""A model put to use: prediction and the one evaluation loop (`predict`), generation
(`generate`), sliding-window perplexity (`rolling`), `llmkit eval --model` (`scores`)."""
