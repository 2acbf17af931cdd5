#!/usr/bin/env bash
# Quick start 2: the test suite (CPU; GPU-only tests skip themselves with the reason).
. "$(dirname "$0")/env.sh"
exec python -m pytest tests -q "$@"
