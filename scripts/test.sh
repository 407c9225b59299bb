#!/usr/bin/env bash
# Install llmkit with its test tools, then run the default test suite (slow tests: -m slow).
source "$(dirname "$0")/setup.sh"
python -m pytest "$@"
