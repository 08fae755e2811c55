"""The server, whose model fails inside generation on any prompt holding "~" (a RuntimeError
from its forward, on the generation thread): tests/test_server_drafting.py.

python failing_server.py SERVER_FLAGS...
"""

import sys

import mlx.core as mx

from mlx_mla import server
from mlx_mla.model import decoder

MARKER = "~"
marker_ids = []  # the token ids that "~" adds, found once the tokenizer is loaded
load, forward = server.load, decoder.DecoderModel.__call__


def load_and_find_the_marker(*args, **kwargs):
    model, tokenizer = load(*args, **kwargs)
    with_marker, without = tokenizer.encode(MARKER + "ab"), tokenizer.encode("ab")
    marker_ids.extend(set(with_marker) - set(without))
    return model, tokenizer


def failing_forward(self, inputs, cache=None, input_embeddings=None):
    if inputs is not None and mx.any(mx.array(marker_ids)[:, None, None] == inputs).item():
        raise RuntimeError("injected failure")
    return forward(self, inputs, cache, input_embeddings)


if __name__ == "__main__":
    server.load = load_and_find_the_marker
    decoder.DecoderModel.__call__ = failing_forward
    server.main(sys.argv[1:])
