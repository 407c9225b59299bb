"""One fine-tuning run: from start to finish (`finetune`), what the loop works with (`build`),
the loop (`loop`), checkpoints and resume (`checkpoint`), processes (`launch`), LoRA
(`adapters`), the dry run (`preflight`, `memory`), what a run tells (`report`), and what it
leaves to share (`card`)."""
