#!/usr/bin/env bash
# Quick start 1: compress the packaged all-MiniLM-L6-v2 with every method at keep_ratio 0.6.
# Extra arguments go to `prehab-svd demo` (e.g. --methods svd svd-llm --keep-ratio 0.4).
. "$(dirname "$0")/env.sh"
exec prehab-svd demo "$@"
