from setuptools import find_packages, setup

# cait.export(format="onnx") and the onnxruntime benchmark runtime; the floors are the versions tested
EXPORT = ["onnx>=1.23", "onnxscript>=0.7.2", "onnxruntime>=1.31"]
# Hugging Face vision models (cait.hf: ViT, DeiT, DINOv2, CLIP vision); the floor is the version tested
HF = ["transformers>=5.25"]

setup(
    name="cait",
    version="0.1.0",
    description="Compress timm Vision Transformers: merge neighbouring tokens (ATME) and prune channels consistently (CDCP)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cait", "cait.*", "cait_kernels", "cait_kernels.*"]),
    package_data={"cait_kernels": ["csrc/*.cpp"]},  # the CPU kernels, compiled on first use
    python_requires=">=3.10",
    install_requires=[
        # The floors are what `make compat` runs the whole suite with (README, "Tested versions").
        "torch>=2.11",
        "timm>=1.0.7",
        "triton>=3.6; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tqdm",
        "ninja",  # torch.utils.cpp_extension builds the C++ CPU kernels with it
    ],
    entry_points={"console_scripts": ["cait = cait.cli:main"]},
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "matplotlib", "jsonschema", "hypothesis>=6.170", *EXPORT, *HF],
        "bench": ["pytest-benchmark", "scikit-learn", "matplotlib", *EXPORT],
        "export": EXPORT,
        "hf": HF,
    },
)
