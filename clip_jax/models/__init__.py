"""Model towers (Flax NNX): layers.py (shared blocks), vit.py (image), text.py (text), two_tower.py (CLIP/SigLIP/LiT)."""
