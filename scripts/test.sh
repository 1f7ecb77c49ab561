#!/usr/bin/env bash
# The test command (README): install what the tests need, then run the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k wire).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
exec .venv/bin/python -m pytest -q "$@"
