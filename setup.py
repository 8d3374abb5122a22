"""promed_jax: ProMed in JAX. Exact pins for CI live in requirements*.txt; ranges here."""

from setuptools import find_packages, setup

setup(
    name="promed_jax",
    version="0.1.0",
    description="ProMed (Shapley Information Gain guided proactive medical LLMs) in JAX/Flax NNX",
    packages=find_packages(include=["promed_jax", "promed_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "mctx>=0.0.6",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "transformers>=5.0",
        "tokenizers>=0.21",
        "safetensors>=0.5",
        "datasets>=3.0",
        "numpy>=2.0",
        "gguf>=0.17",
        "jinja2>=3.1",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "httpx>=0.27",
    ],
    extras_require={
        # torch only as the CPU wheel 2.13.0: a plain `torch` requirement pulls gigabytes of CUDA.
        "test": ["pytest>=8", "torch==2.13.0", "accelerate>=1.0", "ruff>=0.6"],
    },
)
