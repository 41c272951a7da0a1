"""Packaging for shardtune: the `launcher` and `trainer` packages and the `shardtune` command.

torch is pinned loosely on purpose: on CPU-only machines the Makefile installs the CPU wheel first,
so that this requirement is already satisfied and pip never pulls a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="shardtune",
    version="0.1.0",
    description="Full-parameter fine-tuning of large language models across GPUs and nodes with DeepSpeed ZeRO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["launcher", "launcher.*", "trainer", "trainer.*"]),
    data_files=[
        ("share/shardtune/ds_configs", ["ds_configs/zero0.json", "ds_configs/zero1.json", "ds_configs/zero2.json",
                                        "ds_configs/zero3.json", "ds_configs/zero2_offload.json",
                                        "ds_configs/zero3_offload.json", "ds_configs/zero3_offload_all.json"]),
    ],
    install_requires=[
        "torch>=2.6",  # 2.6 fixes CVE-2025-32434 (torch.load with weights_only)
        "deepspeed>=0.16",
        "transformers>=4.56",
        "datasets>=3.0",
        "wandb>=0.19",
        "pyyaml>=6.0",
        "pydantic>=2.7",
        "safetensors>=0.4",
        "tqdm",
        "psutil",
        "accelerate>=1.1",  # transformers' HfDeepSpeedConfig (ZeRO-3 sharded loading) requires it
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.8", "matplotlib", "ruff>=0.6"],
        "demo": ["gguf"],
        "report": ["matplotlib"],
    },
    entry_points={"console_scripts": ["shardtune=launcher.cli:main"]},
)
