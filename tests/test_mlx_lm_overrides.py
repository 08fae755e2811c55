"""The mlx-lm members the server and the batch caches override or rely on, pinned: a new mlx-lm
whose signature or use of one of them changed fails here, naming it (pyproject pins the range
these were read from)."""

import importlib
import inspect
from importlib.metadata import version

import pytest

TESTED = "0.32.2"
SIGNATURES = {  # member: its parameters in the mlx-lm we tested, annotations left out
    "server.ModelProvider.__init__": "(self, cli_args)",
    "server.ModelProvider._load": "(self, model_path, adapter_path=None, draft_model_path=None)",
    "server.ModelProvider.load": "(self, model_path, adapter_path=None, draft_model_path=None)",
    "server.ResponseGenerator.__init__": "(self, model_provider, prompt_cache)",
    "server.ResponseGenerator._next_request": "(self, timeout=None)",
    "server.ResponseGenerator._serve_single": "(self, request, stream)",
    "server.ResponseGenerator._tokenize": "(self, tokenizer, request, args)",
    "server.ResponseGenerator._generate": "(self)",
    "server.ResponseGenerator._is_batchable": "(self, args)",
    "server.ResponseGenerator._share_object": "(self, obj)",
    "server.ResponseGenerator.generate": "(self, request, generation_args, progress_callback=None)",
    "server.APIHandler.__init__": (
        "(self, response_generator, *args, system_fingerprint=None, **kwargs)"
    ),
    "server.APIHandler.setup": "(self)",
    "server.APIHandler.send_response": "(self, code, message=None)",
    "server.APIHandler.do_POST": "(self)",
    "server.APIHandler.validate_model_parameters": "(self)",
    "server.APIHandler.handle_completion": "(self, request, stop_words)",
    "server.APIHandler.handle_chat_completions": "(self)",
    "server.APIHandler.handle_health_check": "(self)",
    "server.APIHandler.handle_models_request": "(self)",
    "server.APIHandler._set_completion_headers": "(self, status_code=200)",
    # the chat page: mlx_mla.web
    "server.APIHandler.do_GET": "(self)",
    "server.APIHandler.completion_usage_response": (
        "(self, prompt_token_count=None, completion_token_count=None, prompt_cache_count=None)"
    ),
    "server.APIHandler.generate_response": (
        "(self, text, finish_reason, prompt_token_count=None, completion_token_count=None, "
        "prompt_cache_count=None, token_logprobs=None, top_tokens=None, tokens=None, "
        "tool_calls=None, reasoning_text=None)"
    ),
    "server.CompletionRequest.__init__": (
        "(self, request_type, prompt, messages, tools, role_mapping)"
    ),
    "cache.LRUPromptCache.__init__": "(self, max_size=10, max_bytes=9223372036854775808)",
    "cache.LRUPromptCache.fetch_nearest_cache": "(self, model, tokens)",
    "cache.LRUPromptCache.insert_cache": (
        "(self, model, tokens, prompt_cache, *, cache_type='assistant')"
    ),
    "cache.PromptTrie.add": "(self, model, tokens, value)",
    "cache.PromptTrie.get": "(self, model, tokens)",
    "cache.PromptTrie.pop": "(self, model, tokens)",
    "cache.PromptTrie.pop_prefixes": "(self, model, tokens)",
    "cache.PromptTrie.search": "(self, model, tokens)",
    "cache.BatchKVCache.merge": "(cls, caches)",
    "cache.BatchKVCache.extract": "(self, idx)",
    "cache.BatchKVCache.filter": "(self, batch_indices)",
    "cache.BatchKVCache.extend": "(self, other)",
    "cache.BatchKVCache.prepare": "(self, *, left_padding=None, lengths=None, right_padding=None)",
    "cache.BatchKVCache.finalize": "(self)",
    "cache.BatchKVCache.make_mask": "(self, N, return_array=False, **kwargs)",
    "cache.dynamic_roll": "(x, shifts, axis)",
    "server._make_logits_processors": "(args)",
    "server._make_sampler": "(args, tokenizer)",
    "generate.GenerationBatch.extend": "(self, batch)",
    "generate.GenerationBatch.filter": "(self, keep)",
    "generate.GenerationBatch.next": "(self)",
    "generate.GenerationBatch.empty": "(cls, model, fallback_sampler)",
    "cache.BatchKVCache.trim": "(self, n)",
    "generate.GenerationBatch._step": "(self)",
    "generate.PromptProcessingBatch.extend": "(self, batch)",
    "generate.PromptProcessingBatch.filter": "(self, keep)",
    "generate.PromptProcessingBatch._copy": "(self)",
    "generate.PromptProcessingBatch.prompt": "(self, tokens)",
    "generate.PromptProcessingBatch.generate": "(self, tokens)",
    "generate._merge_caches": "(caches)",
    "generate._extend_cache": "(cache_a, cache_b)",
    "generate.maybe_quantize_kv_cache": (
        "(prompt_cache, quantized_kv_start, kv_group_size, kv_bits)"
    ),
}
USES = {  # member: source text showing it is used the way we rely on
    "server.ResponseGenerator.__init__": [
        "self._stop = ",
        "self._generation_thread = ",
        "self._is_distributed = ",
        "self._generation_failed = False",
    ],
    "server.ResponseGenerator._run_generate": ["self._generation_failed = True"],
    "cache._BaseCache": ["def is_trimmable(self)", "def nbytes(self)", "def state(self)"],
    "cache.LRUPromptCache.insert_cache": [
        "self._trie.pop(model, tokens)",
        "self._n_bytes += entry.nbytes",
    ],
    "server.ResponseGenerator._generate": [  # run with our BatchGenerator and _make_sampler
        "while not self._stop",
        "batch_generator = BatchGenerator(",
        "samplers=[_make_sampler(args, current_tokenizer)]",
        "logits_processors=[_make_logits_processors(args)]",
        "self._is_batchable(args)",
        "self.prompt_cache.fetch_nearest_cache(",
        "del self.prompt_cache",
    ],
    "server.ResponseGenerator._is_batchable": ["kv_bits is None"],
    # a failure before the context is answered with a 404 (ours: 500), one after it is raised
    # from the replies while a non-streamed reply's headers are still buffered
    "server.APIHandler.handle_completion": [
        "self.response_generator.generate(",
        "self._set_completion_headers(404)",
        "for gen in response:",
        # the drafts in the usage: every usage mlx-lm sends is built by these two
        "self.completion_usage_response(",
        "self.generate_response(",
    ],
    "cache.LRUPromptCache.__init__": ["self._trie = PromptTrie()", "self._lru = "],
    "cache.LRUPromptCache.trim_to": ["self._trie.pop(model, tokens)"],
    "cache.LRUPromptCache.CacheOrder.__init__": ["self._lrus = "],
    "generate._merge_caches": [".merge("],
    # run with our stream_generate, which drafts
    "server.ResponseGenerator._serve_single": ["for gen in stream_generate(", "sampler=sampler,"],
    # the drafting batch: its state, the first step made when a prompt's rows join
    "generate.GenerationBatch.__init__": ["self._next_tokens = inputs", "self._step()"],
    "generate.GenerationBatch._step": [
        "self._next_tokens = sampled",
        "self._next_logprobs = list(logprobs)",
        "sti.append(ti)",
    ],
    "generate.GenerationBatch.next": [
        "self._matchers[i].advance(",
        "prompt_cache=self.extract_cache(i)",
    ],
    "generate.BatchGenerator.__init__": [
        "self._generation_batch = GenerationBatch.empty(",
        "self._prompt_batch = PromptProcessingBatch.empty(",
    ],
    # the MTP's prompt states: one forward a prompt() call, the first step's in generate()
    "generate.PromptProcessingBatch.prompt": [
        "c.prepare(lengths=lengths, right_padding=padding)",
        "c.finalize()",
        "self.model(tokens[:, :n_to_process], cache=self.prompt_cache)",
    ],
    "generate.PromptProcessingBatch.generate": [
        "generation = GenerationBatch(",
        "return generation",
    ],
    "generate.PromptProcessingBatch._copy": ["new_batch = self.__class__.__new__(self.__class__)"],
    "generate.BatchGenerator._next": [
        "self._generation_batch.extend(gen_batch)",
        "gen_batch = self._prompt_batch.split(split).generate(last_inputs)",
        "self._prompt_batch.prompt(prompts)",
    ],
}
MODULES = {m: importlib.import_module(f"mlx_lm.{m}") for m in ("server", "generate")}
MODULES["cache"] = importlib.import_module("mlx_lm.models.cache")


def member(name: str):
    module, *path = name.split(".")
    found = MODULES[module]
    for part in path:
        found = inspect.getattr_static(found, part)
    return found.__func__ if isinstance(found, classmethod | staticmethod) else found


def parameters(function) -> str:
    signature = inspect.signature(function)
    plain = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=plain, return_annotation=inspect.Signature.empty))


def test_mlx_lm_is_the_version_pinned():
    assert version("mlx-lm").startswith(TESTED.rsplit(".", 1)[0] + ".")


@pytest.mark.parametrize("name", SIGNATURES)
def test_overridden_member_keeps_its_signature(name):
    try:
        found = member(name)
    except AttributeError:
        pytest.fail(f"mlx-lm {version('mlx-lm')} has no {name} (tested with {TESTED})")
    assert parameters(found) == SIGNATURES[name], (
        f"mlx-lm {version('mlx-lm')} changed the signature of {name} (tested with {TESTED})"
    )


@pytest.mark.parametrize("name", USES)
def test_member_is_used_as_we_rely_on(name):
    source = inspect.getsource(member(name))
    for text in USES[name]:
        assert text in source, f"mlx-lm {version('mlx-lm')}: {name} no longer has {text!r}"
