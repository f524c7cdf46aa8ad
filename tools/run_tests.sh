#!/usr/bin/env bash
# Set up and run the default test suite (the README's test command; CI runs exactly this).
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m slow` for the full-size/long tests.
set -euo pipefail
EXTRAS="test,convert" . "$(dirname "$0")/setup_env.sh"
echo "== python -m pytest -q $* (pytest.ini skips -m slow unless asked)"
status=0
python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then  # pytest's "no tests collected" (e.g. a -k that matches nothing)
    echo "pytest collected no tests"
    status=0
fi
exit "$status"
