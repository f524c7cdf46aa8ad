# Sourced by tools/run_demo.sh and tools/run_tests.sh: install the project from its own files.
#   EXTRAS="test,convert" . tools/setup_env.sh
# - pip: the project (editable) with the requested extras (mindspore==2.8.0, numpy<2, ...: setup.py);
# - Debian's dataset-fashion-mnist (the real Fashion-MNIST, /usr/share/datasets/fashion-mnist) when it is
#   missing and apt-get can be used; without it the demo stops with a clear message and the tests fall
#   back to generated images.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
spec="."
if [ -n "${EXTRAS:-}" ]; then
    spec=".[${EXTRAS}]"
fi
echo "== pip install -e ${spec}"
python -m pip install --disable-pip-version-check -q -e "${spec}"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "== apt-get install dataset-fashion-mnist"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
            || echo "warning: could not install dataset-fashion-mnist"
    else
        echo "warning: dataset-fashion-mnist is not installed (sudo apt-get install dataset-fashion-mnist)"
    fi
fi
if ! command -v "${CXX:-g++}" >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "== apt-get install g++"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++) \
            || echo "warning: could not install g++ (the CPU attention kernel will not be built)"
    else
        echo "warning: no C++ compiler (sudo apt-get install g++): ResNet-ACmix runs its slower attention path on CPU"
    fi
fi
python -c "import mindspore, numpy; print('mindspore', mindspore.__version__, '| numpy', numpy.__version__)"
