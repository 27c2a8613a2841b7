"""masa_jax: MASA (Meta-Awareness via Self-Alignment) RL for Qwen models in JAX."""
from setuptools import find_packages, setup

# The JAX stack is pinned to the versions the tests ran with (README: tested versions): flax and orbax
# follow JAX's internals closely, so a newer JAX may break them. The [tpu] / [gpu] extras pin the same
# JAX and the libtpu that jax[tpu]==0.10.2 requires. Literal lists: tests/test_setup.py reads them.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "qwix==0.1.8",  # a LoRA run's int8 / int4 / nf4 frozen base (masa_jax/models/qwen/quantize.py)
    "ml_collections>=1.1,<2",
    "grain>=0.2.18,<0.3",
    "numpy>=1.26",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "transformers>=5.0,<6",  # tokenizer + chat template loading only; never imported for modelling
    "pyarrow>=14",
    "jinja2>=3.1",  # transformers' apply_chat_template needs it, and transformers does not require it
    "etils[epath]>=1.7",
    "ml_dtypes>=0.5",
    "sympy==1.14.*",
    "math-verify==0.9.*",
    # math-verify's LaTeX path goes through sympy's antlr parser, which needs exactly this runtime.
    "antlr4-python3-runtime==4.11.0",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "absl-py>=2.0",
]

setup(
    name="masa_jax",
    version="0.1.0",
    description="MASA (Meta-Awareness via Self-Alignment) reinforcement learning for Qwen LLMs in JAX",
    packages=find_packages(include=["masa_jax", "masa_jax.*"]),
    package_data={"masa_jax": ["toy/assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    # Generated problem sources (masa_jax.data.sources.register_source): spec prefix -> spec -> problems.
    entry_points={"masa_jax.sources": ["toy = masa_jax.toy.world:load_spec",
                                       "toy-heldout = masa_jax.toy.world:load_spec"]},
    extras_require={
        # gs:// run directories, model dirs and data (masa_jax.fs): gcsfs is epath's GCS backend without
        # TensorFlow, google-cloud-storage the client Orbax asks for a bucket's layout.
        "gcs": ["gcsfs>=2024.5", "google-cloud-storage>=2.14"],
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.*", "gcsfs>=2024.5", "google-cloud-storage>=2.14"],
        "gpu": ["jax[cuda12]==0.10.2"],
        "tfds": ["tensorflow-datasets>=4.9.10", "array_record>=0.5"],
        "wandb": ["wandb>=0.16"],  # config.log.wandb
        # masa_jax as an lm-evaluation-harness model (masa_jax.evaluation.lm_eval_backend)
        "eval": ["lm-eval>=0.4.13,<0.5"],
        # the JAX peer of experiments/bench_peer.py (issue 23); pins the same jax / flax as above. Its own
        # venv: it moves transformers to the version it wants.
        "bench": ["google-tunix==0.1.7"],
        # loading a LoRA run's exported adapter (<export>/adapter/, PEFT's layout) with transformers + peft;
        # masa_jax itself trains, merges and writes adapters without it
        "lora": ["peft>=0.21,<0.22"],
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            # torch is a reference implementation for parity tests only (CPU build on disk here).
            "torch==2.13.0",
            "transformers>=5.0,<6",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "pandas>=2.0",
            # the lm-eval backend's tests, and lm-eval's own `hf` backend (needs accelerate) as their reference
            "lm-eval==0.4.13",
            "accelerate>=0.26",
            # the PEFT-layout export test (tests/models/test_lora.py) loads it with peft
            "peft==0.21.2",
        ],
    },
)
