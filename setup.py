from setuptools import find_packages, setup

setup(
    name="mmtrain",
    version="0.1.0",
    description="DeepSpeed ZeRO-3 trainer for interleaved image-text models (Otter, OpenFlamingo, IDEFICS, OtterHD)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmtrain", "mmtrain.*", "data_tools", "data_tools.*"]),
    # The Slurm batch-script template that `mmtrain submit slurm` renders (launch/slurm/ links to it).
    package_data={"mmtrain.submit": ["*.sbatch"]},
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
        "packaging",  # mmtrain doctor compares installed versions with these requirements
    ],
    extras_require={
        # sagemaker: `mmtrain submit sagemaker` (SDK v2, for its PyTorch estimator); the tests run its dry run.
        # simplejpeg: the tests compare the loader's two JPEG decoders, so they need it.
        "test": ["pytest>=8", "hypothesis", "ruff", "sagemaker>=2.200,<3", "simplejpeg>=1.7"],
        # fast-jpeg: libjpeg-turbo through simplejpeg, used by the loader when importable (mmtrain.data.images).
        "fast-jpeg": ["simplejpeg>=1.7"],
        "sagemaker": ["sagemaker>=2.200,<3"],
        "flash": ["flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "mmtrain=mmtrain.cli:main",
            "mmtrain-data=data_tools.cli:main",
        ]
    },
)
