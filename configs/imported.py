"""The config of a model imported with `python -m clip_jax.main convert --from hf --model-dir DIR --workdir OUT`
(or `--from open_clip`):
`--config=configs/imported.py:OUT` reads OUT/config.json (model shapes, tokenizer, preprocessing), so `eval`
and `train` rebuild exactly the imported model. Override evals.* / data.* on the command line as usual.
"""

import json
import os


def get_config(arg: str = ""):
    from clip_jax import config

    if not arg:
        raise ValueError("use configs/imported.py:<workdir of the import>")
    path = os.path.join(arg, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"{path} does not exist; run `clip_jax.main convert --from hf` (or `--from open_clip`) into {arg} first"
        )
    with open(path) as f:
        return config.from_dict(json.load(f))
