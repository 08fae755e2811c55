"""The model: the family table (families.py), config (ModelArgs), MLA attention (latent and expanded
paths, W_UK/W_UV absorbed), DeepSeekMoE, the decoder, and loading a checkpoint into it."""
