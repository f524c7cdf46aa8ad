#!/usr/bin/env bash
# Set up and run the main job on the embedded default: Fashion-MNIST (Debian's dataset-fashion-mnist) ->
# train ResNet-ACmix (tiny) and its ResNet baseline -> evaluate both -> export MINDIR and verify it ->
# side-by-side table and curves. Full run: all 60,000 training / 10,000 test images; --quick: the small run.
# Extra arguments go to tools/demo.py (python tools/demo.py --help). Installs the "plot" extra (matplotlib,
# for the curves); EXTRAS=... chooses other extras.
set -euo pipefail
EXTRAS="${EXTRAS:-plot}"
. "$(dirname "$0")/setup_env.sh"
"$ACMIX_PYTHON" tools/demo.py "$@"
