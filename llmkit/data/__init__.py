"""Rows and batches: reading files and the Hub (`read`), length-grouped batches and
micro-batches (`batches`), tokenized features' lengths and cache keys (`features`)."""
