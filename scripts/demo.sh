#!/usr/bin/env bash
# Quick start 1: compress the packaged SmolLM2-135M-Instruct with svd-llm and zs-svd at keep_ratio 0.8
# (perplexity on two held-out texts, greedy answers). Extra arguments go to `prehab-svd demo`
# (e.g. --methods svd-llm aa-svd zs-ranks+aa-svd --keep-ratio 0.6, or --model minilm).
. "$(dirname "$0")/env.sh"
exec prehab-svd demo "$@"
