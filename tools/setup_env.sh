# Sourced by tools/run_demo.sh and tools/run_tests.sh: install the project from its own files.
#   EXTRAS="test" . tools/setup_env.sh          # then run "$ACMIX_PYTHON" ...
# - Python: $PYTHON if set, else the first of python, python3.12, python3.11, python3.10, python3 that is
#   3.10-3.12 (MindSpore 2.8.0 has no wheel for 3.13).
# - Where: into that Python, unless it is "externally managed" (PEP 668: Debian 12, Ubuntu 24.04 refuse
#   pip installs into the system Python); then into a project virtual environment, $ACMIX_VENV (default
#   .venv in the repository; created once, python3-venv installed by apt-get when missing and run as root).
#   Already inside a virtual environment (or conda), that one is used.
# - pip: the project (editable) with the requested extras (mindspore==2.8.0, numpy<2, ...: setup.py);
#   ACMIX_SETUP_DRY_RUN=1 prints the pip command instead of running it.
# - Debian's dataset-fashion-mnist (the real Fashion-MNIST, /usr/share/datasets/fashion-mnist) and g++ when
#   missing and apt-get can be used; without them the demo stops with a clear message, the tests fall back
#   to generated images and ResNet-ACmix uses its slower attention path.
# Sets ACMIX_PYTHON (the interpreter to use) and, with a project environment, activates it.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

_acmix_supported() {  # exit 0 when "$1" is a Python 3.10-3.12
    "$1" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' >/dev/null 2>&1
}

_acmix_externally_managed() {  # exit 0 when pip must not install into "$1" (PEP 668 marker, outside a venv)
    "$1" - <<'PY'
import os, sys, sysconfig
in_env = sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta"))
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if not in_env and os.path.isfile(marker) else 1)
PY
}

_acmix_apt_install() {  # install Debian packages when possible (root with apt-get); exit 1 otherwise
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "== apt-get install $*"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
    else
        return 1
    fi
}

if [ -n "${PYTHON:-}" ]; then
    if ! _acmix_supported "$PYTHON"; then
        echo "error: PYTHON=$PYTHON is not Python 3.10-3.12 (MindSpore 2.8.0 has wheels for those)" >&2
        return 2 2>/dev/null || exit 2
    fi
    ACMIX_PYTHON="$PYTHON"
else
    ACMIX_PYTHON=""
    for candidate in python python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && _acmix_supported "$candidate"; then
            ACMIX_PYTHON="$(command -v "$candidate")"
            break
        fi
    done
    if [ -z "$ACMIX_PYTHON" ]; then
        echo "error: no Python 3.10-3.12 found (tried python, python3.12, python3.11, python3.10, python3);" \
             "install one (e.g. sudo apt-get install python3) or set PYTHON=/path/to/python" >&2
        return 2 2>/dev/null || exit 2
    fi
fi

if _acmix_externally_managed "$ACMIX_PYTHON"; then
    venv="${ACMIX_VENV:-.venv}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "== $ACMIX_PYTHON is externally managed (PEP 668): creating the project environment $venv"
        if ! "$ACMIX_PYTHON" -m venv "$venv"; then
            rm -rf "$venv"
            version="$("$ACMIX_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            _acmix_apt_install "python${version}-venv" && "$ACMIX_PYTHON" -m venv "$venv" || {
                echo "error: cannot create $venv: install python${version}-venv (sudo apt-get install" \
                     "python${version}-venv) or run inside a virtual environment of your own" >&2
                return 2 2>/dev/null || exit 2
            }
        fi
    fi
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    ACMIX_PYTHON="$(cd "$venv/bin" && pwd)/python"
fi
export ACMIX_PYTHON
echo "== python: $ACMIX_PYTHON ($("$ACMIX_PYTHON" -c 'import sys; print(sys.version.split()[0])'))"

acmix_pip_install() {  # acmix_pip_install ARGS...: pip install into ACMIX_PYTHON (echoed; dry run prints only)
    echo "== $ACMIX_PYTHON -m pip install $*"
    if [ -n "${ACMIX_SETUP_DRY_RUN:-}" ]; then
        return 0
    fi
    "$ACMIX_PYTHON" -m pip install --disable-pip-version-check -q "$@"
}

spec="."
if [ -n "${EXTRAS:-}" ]; then
    spec=".[${EXTRAS}]"
fi
acmix_pip_install -e "${spec}" || return 1 2>/dev/null || exit 1

if [ -z "${ACMIX_SETUP_DRY_RUN:-}" ]; then
    if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
        _acmix_apt_install dataset-fashion-mnist \
            || echo "warning: dataset-fashion-mnist is not installed (sudo apt-get install dataset-fashion-mnist)"
    fi
    if ! command -v "${CXX:-g++}" >/dev/null 2>&1; then
        _acmix_apt_install g++ \
            || echo "warning: no C++ compiler (sudo apt-get install g++): ResNet-ACmix runs its slower attention" \
                    "path on CPU"
    fi
    "$ACMIX_PYTHON" -c "import mindspore, numpy; print('mindspore', mindspore.__version__, '| numpy', numpy.__version__)"
fi
