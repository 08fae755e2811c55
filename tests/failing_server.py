"""The server, whose model fails inside generation on any prompt holding "~" (a RuntimeError
from its forward, on the generation thread), once it has loaded: tests/test_server_drafting.py.
A forward fails only while such a prompt waits (a drafter's random draft may hold "~" too).

python failing_server.py SERVER_FLAGS...
"""

import sys
import threading

import mlx.core as mx

from mlx_mla import server
from mlx_mla.model import decoder

MARKER = "~"
marker_ids = []  # the token ids that "~" adds, found once the tokenizer is loaded
poisoned = []  # not empty while a prompt holding them waits for its failure
load, forward = server.ModelProvider.load_model, decoder.DecoderModel.__call__
tokenize = server.ResponseGenerator._tokenize


def load_then_fail_on_the_marker(self, *args, **kwargs):
    load(self, *args, **kwargs)
    with_marker, without = self.tokenizer.encode(MARKER + "ab"), self.tokenizer.encode("ab")
    marker_ids.extend(set(with_marker) - set(without))
    decoder.DecoderModel.__call__ = failing_forward


def noting_the_marker(self, tokenizer, request, args):
    tokenized = tokenize(self, tokenizer, request, args)
    if marker_ids and set(marker_ids) <= set(tokenized[0]):
        poisoned.append(True)
    return tokenized


def failing_forward(self, inputs, cache=None, input_embeddings=None):
    generating = threading.current_thread() is not threading.main_thread()  # not start-up's pass
    if (
        generating
        and poisoned
        and inputs is not None
        and mx.any(mx.array(marker_ids)[:, None, None] == inputs).item()
    ):
        poisoned.clear()
        raise RuntimeError("injected failure")
    return forward(self, inputs, cache, input_embeddings)


if __name__ == "__main__":
    server.ModelProvider.load_model = load_then_fail_on_the_marker
    server.ResponseGenerator._tokenize = noting_the_marker
    server.main(sys.argv[1:])
