"""Checkpoint sync: write trained weights into the model's safetensors files, block by block, through a redo journal."""
