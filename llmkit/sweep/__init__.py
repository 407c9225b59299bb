"""`llmkit sweep`: hyper-parameter search on Optuna, every trial an ordinary run directory
(`space`: the `--param` distributions; `study`: the stored, resumable, prunable study;
`summary`: the table, the best trial, importances and pictures)."""
