from setuptools import find_packages, setup

setup(
    name="rlds",
    version="0.1.0",
    description="Large-scale reinforcement learning for text-to-image diffusion models, on Ray",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rlds", "rlds.*"]),
    # the shipped ShapesWorld base model (safetensors, configs, tokenizer, model card, its evaluation)
    package_data={"rlds": ["models/*/*", "models/*/*/*", "models/*/*/*/*", "rewards/envs/*.txt", "data/lists/*.txt"]},
    install_requires=[
        "torch>=2.4,<3",
        "ray[default]>=2.40,<3",
        "diffusers>=0.32,<1",
        "transformers>=4.45,<6",
        "numpy>=1.26",
        "pyarrow>=15",
        "peft>=0.13",
        "safetensors>=0.4",
        "PyYAML>=6",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "pillow>=10",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        # image-reward clashes with current transformers; rlds runs it in its own Ray runtime_env.
        "imagereward": ["image-reward==1.5"],
    },
    entry_points={"console_scripts": ["rlds=rlds.cli:main"]},
)
