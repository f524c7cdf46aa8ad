#!/usr/bin/env bash
# Set up and run the main job on the embedded default: Fashion-MNIST (Debian's dataset-fashion-mnist) ->
# train ResNet-ACmix (tiny) and its ResNet baseline -> evaluate both -> export MINDIR and verify it ->
# side-by-side table. Extra arguments go to tools/demo.py (python tools/demo.py --help).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
"$ACMIX_PYTHON" tools/demo.py "$@"
