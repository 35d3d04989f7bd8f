"""Reference implementations the fidelity tests compare against, loaded without their heavy package imports.

open_clip's package __init__ imports torchvision, which is not installed (the only torchvision release for this
torch on PyPI is a CUDA build that cannot load beside the CPU torch, and a broken torchvision also breaks
transformers' image processors). Its tokenizer.py and loss.py need only torch, numpy, regex and ftfy, so they are
loaded here straight from the installed open-clip-torch distribution, unmodified. Its model code (model.py and the
modules it imports) needs one torchvision name at import time; open_clip_model_module says which and how.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

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


_OPEN_CLIP_PACKAGE = "open_clip_reference"


def open_clip_model_module():
    """open_clip.model (CLIP, CustomTextCLIP and the VisionTransformer / TextTransformer it builds), unmodified,
    as `open_clip_reference.model`, with its sibling modules loaded as `open_clip_reference.*` (never executing
    the package __init__, which imports torchvision through transform.py). Skips if open-clip-torch is missing.

    model.py imports transformer.py, hf_model.py, modified_resnet.py, timm_model.py (which catches a missing
    timm) and utils.py; of these only utils.py touches torchvision at import time, and only for one name:
    `from torchvision.ops.misc import FrozenBatchNorm2d`, used by `freeze_batch_norm_2d` (locking the ResNet
    towers' BatchNorm layers, which the ViT models never call). So utils.py alone is loaded with a stand-in
    `torchvision.ops.misc` whose FrozenBatchNorm2d raises if ever constructed; the stand-in is removed from
    sys.modules straight after, so no other library (transformers checks for torchvision) ever sees it.
    """
    model = sys.modules.get(f"{_OPEN_CLIP_PACKAGE}.model")
    if model is not None:
        return model
    spec = importlib.util.find_spec("open_clip")  # finds the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (make test installs it)")
    package_spec = importlib.machinery.ModuleSpec(_OPEN_CLIP_PACKAGE, None, is_package=True)
    package_spec.submodule_search_locations = list(spec.submodule_search_locations)
    package = importlib.util.module_from_spec(package_spec)
    sys.modules[_OPEN_CLIP_PACKAGE] = package
    stand_in = _torchvision_stand_in()
    saved = {name: sys.modules.get(name) for name in stand_in}
    sys.modules.update(stand_in)
    try:
        importlib.import_module(f"{_OPEN_CLIP_PACKAGE}.utils")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return importlib.import_module(f"{_OPEN_CLIP_PACKAGE}.model")


def _torchvision_stand_in():
    """{module name: module} for the one torchvision name open_clip's utils.py imports (see above)."""

    class FrozenBatchNorm2d:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError("torchvision is not installed: this stand-in only lets utils.py import")

    modules = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc")}
    modules["torchvision"].ops = modules["torchvision.ops"]
    modules["torchvision.ops"].misc = modules["torchvision.ops.misc"]
    modules["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    return modules


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
