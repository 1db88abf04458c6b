"""illada-jax: iLLaDA / LLaDA masked-diffusion LMs in JAX + Flax Linen.

Pinned to the newest set that installs on Python 3.11 (jax 0.10.2, flax 0.12.8).
"""

from setuptools import find_packages, setup

setup(
    name='illada-jax',
    version='0.1.0',
    description='iLLaDA / LLaDA masked-diffusion language models in JAX',
    python_requires='>=3.11',
    packages=find_packages(include=['illada_jax', 'illada_jax.*']) + ['illada_jax.configs'],
    package_dir={'illada_jax': 'illada_jax', 'illada_jax.configs': 'configs'},
    install_requires=[
        'jax==0.10.2',
        'jaxlib==0.10.2',
        'flax==0.12.8',
        'optax==0.2.8',
        'orbax-checkpoint==0.12.8',
        'grain==0.2.18',
        'sentencepiece==0.2.3',
        'tensorstore==0.1.86',
        'safetensors==0.8.0',
        'numpy>=2.0,<2.5',
        'tqdm>=4.66',
        'tensorboardX>=2.6',  # training metrics as TensorBoard event files
        'pyarrow>=15',  # Parquet training data
        'tokenizers>=0.20',  # tokenizer.json for training data
        'qwix==0.1.8',  # LoRA adapters (illada_jax.lora)
    ],
    extras_require={
        # torch 2.13.0 (CPU) is the wheel this machine carries; transformers
        # provides the independent Llama reference for the logits tests.
        'test': [
            'pytest==9.2.0', 'torch==2.13.0', 'transformers>=4.50,<6',
            'nbclient>=0.10', 'nbformat>=5.10', 'ipykernel>=6.29', 'matplotlib>=3.8',
            'openai>=1.40', 'httpx>=0.27', 'aiohttp>=3.9',
        ],
        # lm-evaluation-harness adapter (model name `illada_jax`).
        'eval': ['lm-eval[api]>=0.4.5,<0.5'],
        # libtpu as pinned by jax[tpu]==0.10.2: compile-only TPU checks on CPU.
        'tpu': ['jax[tpu]==0.10.2'],
        # illada-serve: the OpenAI-compatible server (the openai client is in `test`).
        'serve': ['fastapi>=0.110', 'uvicorn[standard]>=0.29', 'pydantic>=2.5',
                  'prometheus_client>=0.20'],
    },
    entry_points={
        'console_scripts': [
            'illada-forward=illada_jax.cli.forward:main',
            'illada-convert=illada_jax.cli.convert:main',
            'illada-sample=illada_jax.cli.sample:main',
            'illada-score=illada_jax.cli.score:main',
            'illada-train=illada_jax.cli.train:main',
            'illada-demo=illada_jax.cli.demo:main',
            'illada-serve=illada_jax.cli.serve:main',
        ],
    },
)
