"""clip_jax: large-batch CLIP / SigLIP / CoCa pretraining in JAX."""

from setuptools import find_packages, setup

# Direct dependencies, pinned to the versions the test suite runs against.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "clu==0.0.12",
    "braceexpand==0.1.7",  # webdataset brace ranges in data.shards ({000000..000999})
    "etils[epath]==1.15.0",  # paths of data.shards: local, gs:// and other remote file systems
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",  # undeclared need of tfds' download_and_prepare
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-cpu==2.21.0",  # CLU metric writers and tfds builders import it
    "tensorboard==2.21.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "scikit-learn==1.9.1",  # ships the handwritten-digits images (real-image demo set)
    "sentencepiece==0.2.1",  # tokenizer.kind='sentencepiece'
    "ftfy==6.3.1",  # CLIP BPE text cleaning: OpenAI's and open_clip's tokenizers run ftfy.fix_text before BPE
    "regex==2026.11.19",  # CLIP BPE pre-tokenizer: the references' pattern engine and Unicode tables
    "tqdm==4.70.1",  # the training progress bar on a terminal (clip_jax/console.py)
]

setup(
    name="clip_jax",
    version="0.1.0",
    description="Large-batch image-text pretraining (CLIP, SigLIP, CoCa) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["clip_jax", "clip_jax.*"]),
    # CLIP's BPE merge list (tokenizer.kind='clip_bpe') and its MIT notices ship inside the package.
    # Zero-shot class names and prompt templates (JSON) with their sources and licence (NOTICE).
    package_data={
        "clip_jax.input": ["bpe_simple_vocab_16e6.txt.gz", "bpe_simple_vocab_16e6.LICENSE"],
        "clip_jax.evaluate": ["data/*.json", "data/NOTICE"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # tokenizers (HF): the independent reference the CLIP BPE tests compare against, token for token.
        # scikit-image and fonttools: the clip_skimage photos, and the emoji tests' independent glyph table.
        # matplotlib: the sweep driver's plots, which tests/test_sweep.py draws.
        "test": [
            "pytest==9.2.0",
            "tokenizers==0.23.3",
            "scikit-image==0.26.0",
            "fonttools==4.68.0",
            "matplotlib==3.11.2",
            "webdataset==1.0.2",  # the reference reading of tar shards that tests/test_shards.py compares against
        ],
        "demo": ["scikit-image==0.26.0"],  # data/prepare.py --name clip_skimage: its bundled photos
        "bench": ["matplotlib==3.11.2"],  # plots in experiments/
        # `convert --from/--to hf` (transformers' config classes, safetensors) and the parity tests' torch reference.
        # open-clip-torch (the reference tokenizer and losses) is installed by the Makefile with --no-deps: its
        # torchvision dependency resolves to a CUDA build that cannot load beside the CPU torch, and a broken
        # torchvision breaks transformers' image processors (tests/reference_libs.py).
        "hf": ["transformers==5.23.0", "safetensors==0.8.0", "torch==2.13.0"],
    },
)
