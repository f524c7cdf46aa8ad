"""acmix-ms: ACmix (Pan et al., CVPR 2022) for MindSpore. Install with ``pip install -e .[test]``.

Python 3.10-3.12: MindSpore 2.8.0 publishes wheels for 3.9-3.12, and the torch parity tests need 3.10+.
Converting official .pth files needs no PyTorch (models/pth_reader.py). ``torch-tests`` is the CPU build of
torch for the parity tests; PyPI serves only the CUDA build, so install it with
``pip install -e .[torch-tests] --extra-index-url https://download.pytorch.org/whl/cpu`` (tools/run_tests.sh
does this).
"""
from setuptools import setup

setup(
    name="acmix-ms",
    version="0.1.0",
    description="ACmix (On the Integration of Self-Attention and Convolution) for MindSpore",
    python_requires=">=3.10,<3.13",
    packages=["acmix_ms", "acmix_ms.kernels", "models", "engine"],
    package_data={"acmix_ms.kernels": ["*.cc", "*.h"]},  # C++ sources and header of the CPU kernels, built at first use
    install_requires=["mindspore==2.8.0", "numpy<2", "pyyaml", "pillow"],
    extras_require={
        "test": ["pytest", "matplotlib"],  # matplotlib: the plot tests take their real path in CI
        "plot": ["matplotlib"],
        "coco": ["pycocotools"],  # detection mAP by the reference COCOeval (a NumPy equivalent is built in)
        "torch-tests": ["torch==2.13.0+cpu"],
    },
)
