"""Rows and batches: reading files, folders and the Hub (`read`, with each local file's type,
encoding, quoting and layout in `files`), length-grouped batches and micro-batches
(`batches`), tokenized features' lengths and cache keys (`features`)."""
