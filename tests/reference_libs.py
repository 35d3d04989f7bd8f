"""Reference implementations the fidelity tests compare against, loaded without their heavy package imports.

open_clip's package __init__ imports torchvision, which is not installed (the only torchvision release for this
torch on PyPI is a CUDA build that cannot load beside the CPU torch, and a broken torchvision also breaks
transformers' image processors). Its tokenizer.py and loss.py need only torch, numpy, regex and ftfy, so they are
loaded here straight from the installed open-clip-torch distribution, unmodified.
"""

import importlib
import importlib.util
import os

import pytest


def open_clip_module(name: str):
    """open_clip.<name> (e.g. "tokenizer", "loss") from the installed package files; skips if not installed."""
    spec = importlib.util.find_spec("open_clip")  # finds the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (make test installs it)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(f"open_clip_reference_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def clip_benchmark_module(name: str):
    """clip_benchmark.metrics.<name> (e.g. "zeroshot_retrieval"); skips if clip-benchmark is not installed.

    `make test` installs clip-benchmark with --no-deps (its declared dependencies include torchvision, see above).
    The package's __init__ files import nothing, and its metric modules need only torch, tqdm and scikit-learn, so
    a plain import of the installed, unmodified files works.
    """
    try:
        return importlib.import_module(f"clip_benchmark.metrics.{name}")
    except ModuleNotFoundError as e:
        pytest.skip(f"CLIP_benchmark reference unavailable ({e}); make test installs clip-benchmark==1.6.2")
