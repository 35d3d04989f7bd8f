"""Overrides shared by the tests that run whole trainings: configs/tiny_cpu.py shrunk to the smallest model the code
supports on the small shapes set, so a run is mostly import and compile time. Keys as `--config.<key>` takes them."""

TINIEST = {
    "batch_size": 16,
    "model.embed_dim": 32,
    "model.image.depth": 1,
    "model.image.width": 32,
    "model.image.mlp_dim": 64,
    "model.text.depth": 1,
    "model.text.width": 32,
    "model.text.mlp_dim": 64,
    "data.name": "clip_shapes/small",
    "data.cache": False,
}


def set_keys(cfg, overrides: dict):
    """cfg with each dotted key ('model.image.depth') set to its value, in place; returns cfg."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg
