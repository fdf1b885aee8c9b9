"""poa_hpc: Pre-training Once for models of All sizes, as a high-performance trainer."""

from setuptools import find_packages, setup

# The repository keeps GPU kernels in a top-level ``kernels/`` folder; they are
# installed as ``poa_hpc.kernels`` so nothing clashes with PyPI's ``kernels``;
# ``configs/`` likewise ships as ``poa_hpc.configs`` so ``poa demo`` finds its YAML.
packages = find_packages(include=["poa_hpc", "poa_hpc.*"]) + ["poa_hpc.kernels", "poa_hpc.configs"]

setup(
    name="poa_hpc",
    version="0.1.0",
    description="POA self-supervised pre-training (teacher / intact / elastic students) on GPU clusters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=["License :: OSI Approved :: Apache Software License"],
    python_requires=">=3.10",
    packages=packages,
    package_dir={"poa_hpc.kernels": "kernels", "poa_hpc.configs": "configs"},
    include_package_data=True,
    package_data={"poa_hpc.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "pillow",
        "omegaconf>=2.3",
        "pyyaml",
        "safetensors>=0.4",
        "tqdm",
        "scikit-learn>=1.3",  # ships the digits set used by the embedded demo
    ],
    extras_require={
        # DALI's wheel carries its CPU backend too, so the DALI tests run without a GPU.
        "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist", "timm>=1.0", "deepspeed>=0.16", "nvidia-dali-cuda120>=1.40",
                "submitit>=1.5", "matplotlib", "ruff",
                "tensorboard", "wandb", "mlflow", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript"],
        "plot": ["matplotlib"],  # the accuracy-vs-GFLOPs figure of `poa eval sweep`
        "timm": ["timm>=1.0"],
        "slurm": ["submitit>=1.5"],
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "tensorboard": ["tensorboard"],  # train.loggers: [tensorboard]
        "wandb": ["wandb"],  # train.loggers: [wandb]
        "mlflow": ["mlflow"],  # train.loggers: [mlflow]
        "deepspeed": ["deepspeed>=0.16"],
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript"],  # poa export --format onnx, latency --runtime onnxruntime
        "gpu": ["xformers", "nvidia-dali-cuda120>=1.40", "deepspeed>=0.16", "triton"],
    },
    entry_points={"console_scripts": ["poa=poa_hpc.cli:main"]},
)
