"""Import/export of public checkpoints: HF transformers CLIPModel / SiglipModel. hf.py maps the tensors,
hf_config.py the configs, files.py reads and writes model directories and clip_jax checkpoints."""
