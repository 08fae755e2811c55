"""Defaults that more than one module reads, each given once (a tool's own flags keep theirs at the
top of the tool). Pure Python: the calculator reads them without MLX."""

DEFAULT_KV_GROUP_SIZE = 64  # elements per quantisation group of a cached row (mlx-lm's too)
DEFAULT_PREFILL_STEP_SIZE = 2048  # prompt tokens per forward pass (mlx-lm's generate_step's)
DEFAULT_Q_GROUP_SIZE = 64  # elements per quantisation group of a weight matrix (convert's)
