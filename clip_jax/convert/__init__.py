"""Import/export of public checkpoints: HF transformers CLIPModel / SiglipModel (SigLIP 1 and SigLIP 2 fixed
resolution) and Siglip2Model (SigLIP 2 NaFlex: models/naflex.py, input/naflex.py). hf.py maps the tensors,
hf_config.py the configs, hf_tokenizer.py finds and writes the tokenizer files (spiece.model: SigLIP 1;
tokenizer.model + a Gemma tokenizer_config.json: SigLIP 2), files.py reads and writes model directories and
clip_jax checkpoints. open_clip.py (tensors, files) and open_clip_config.py (configs) do the same for open_clip's
format (open_clip_config.json + weights, or a training checkpoint's state_dict)."""
