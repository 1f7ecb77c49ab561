#!/usr/bin/env bash
# The test command (README): install what the tests need, then run the whole suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k wire).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
# --durations: the 25 slowest tests, so a test that grows slow is seen in every CI log
exec .venv/bin/python -m pytest -q --durations=25 "$@"
