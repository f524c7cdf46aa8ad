#!/usr/bin/env bash
# Set up and run the default test suite (the README's test command; CI runs exactly this).
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m slow` for the full-size/long tests.
# The PyTorch parity tests need torch: its CPU build is installed (the `torch-tests` extra, torch==2.13.0+cpu,
# from the local wheels where the machine has them, else from PyTorch's CPU index; never the ~2.5 GB CUDA
# build that PyPI serves). ACMIX_TEST_TORCH=0 skips that: those tests are then skipped with the reason.
set -euo pipefail
EXTRAS="test" . "$(dirname "$0")/setup_env.sh"
if [ "${ACMIX_TEST_TORCH:-1}" != "0" ] && ! "$ACMIX_PYTHON" -c "import torch" >/dev/null 2>&1; then
    acmix_pip_install -e ".[test,torch-tests]" \
        || acmix_pip_install -e ".[test,torch-tests]" --extra-index-url https://download.pytorch.org/whl/cpu \
        || echo "warning: torch (CPU build) could not be installed: the PyTorch parity tests will be skipped"
fi
echo "== python -m pytest -q $* (pytest.ini skips -m slow unless asked)"
status=0
"$ACMIX_PYTHON" -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then  # pytest's "no tests collected" (e.g. a -k that matches nothing)
    echo "pytest collected no tests"
    status=0
fi
exit "$status"
