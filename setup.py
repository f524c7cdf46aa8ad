"""acmix-ms: ACmix (Pan et al., CVPR 2022) for MindSpore. Install with ``pip install -e .[test]``."""
from setuptools import setup

setup(
    name="acmix-ms",
    version="0.1.0",
    description="ACmix (On the Integration of Self-Attention and Convolution) for MindSpore",
    python_requires=">=3.9",
    packages=["acmix_ms", "acmix_ms.kernels", "models", "engine"],
    package_data={"acmix_ms.kernels": ["*.cc"]},  # C++ source of the CPU kernels, compiled at first use
    install_requires=["mindspore==2.8.0", "numpy<2", "pyyaml", "pillow"],
    extras_require={
        "test": ["pytest"],
        "plot": ["matplotlib"],
        "convert": ["torch==2.13.0"],
    },
)
