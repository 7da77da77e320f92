from setuptools import find_packages, setup

setup(
    name="mmtrain",
    version="0.1.0",
    description="DeepSpeed ZeRO-3 trainer for interleaved image-text models (Otter, OpenFlamingo, IDEFICS, OtterHD)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmtrain", "mmtrain.*", "data_tools", "data_tools.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.16",
        "transformers>=5.0,<6",
        "tokenizers",
        "safetensors",
        "webdataset>=0.2.90",
        "omegaconf>=2.3",
        "tensorboard",
        "open_clip_torch>=2.24",
        "pillow",
        "numpy",
        "pyarrow",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis", "ruff"],
        "flash": ["flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "mmtrain=mmtrain.cli:main",
            "mmtrain-data=data_tools.cli:main",
        ]
    },
)
