"""The model: config (ModelArgs and the family table), MLA attention (latent and expanded paths,
W_UK/W_UV absorbed), DeepSeekMoE, the decoder, and loading a checkpoint into it."""
