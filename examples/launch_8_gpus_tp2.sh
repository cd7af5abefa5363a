#!/usr/bin/env bash
# Launches Llama-3.1-70B on 8 GPUs as 4 workers of 2 GPUs each (--tp 2), with extra SGLang flags
# after `--` (given to every worker unchanged). Needs GPUs and `pip install sglang`.
set -euo pipefail
sglang-dp launch --model-path meta-llama/Llama-3.1-70B-Instruct --dp 4 --tp 2 \
    --gpus 0-7 --port 30000 --policy cache_aware \
    -- --mem-fraction-static 0.85 --chunked-prefill-size 8192 --enable-metrics
