#!/usr/bin/env bash
# Quick start 1: compress the packaged SmolLM2-135M-Instruct at keep_ratio 0.8 with svd-llm and with
# the CLI's default (aa-svd's factors at zs-svd's ranks): perplexity on two held-out texts, greedy answers.
# Extra arguments go to `prehab-svd demo` (e.g. --methods svd-llm zs-svd --keep-ratio 0.6, or --model minilm).
. "$(dirname "$0")/env.sh"
exec prehab-svd demo "$@"
