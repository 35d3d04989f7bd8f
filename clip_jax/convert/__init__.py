"""Import/export of public checkpoints: HF transformers CLIPModel / SiglipModel (hf.py: the mapping; files.py:
reading and writing model directories and clip_jax checkpoints)."""
