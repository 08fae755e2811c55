"""The mlx-lm members the server and the batch caches override or rely on, pinned: a new mlx-lm
whose signature or use of one of them changed fails here, naming it (pyproject pins the range
these were read from). Our modules are read too: a private member of mlx-lm that our code names
or overrides and that is not pinned here and listed in docs/speculative-server.md fails."""

import ast
import importlib
import importlib.util
import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest

import mlx_mla

TESTED = "0.32.2"
SIGNATURES = {  # member: its parameters in the mlx-lm we tested, annotations left out
    "server.ModelProvider.__init__": "(self, cli_args)",
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
    "server.ResponseGenerator.__init__": ["self._stop = "],
    "server.ResponseGenerator._run_generate": ["self._generate()"],  # the generation thread
    # mlx-lm's __init__ loads nothing: the model is ours (ModelProvider.load_model)
    "server.ModelProvider.load_default": ['self.load("default_model", None, "default_model")'],
    "cache._BaseCache": ["def is_trimmable(self)", "def nbytes(self)", "def state(self)"],
    "cache.LRUPromptCache.insert_cache": [
        "self._trie.pop(model, tokens)",
        "self._n_bytes += entry.nbytes",  # what nbytes reads
    ],
    "cache.LRUPromptCache.nbytes": ["return self._n_bytes"],
    "server.ResponseGenerator._generate": [  # run with our BatchGenerator and _make_sampler
        "while not self._stop",
        "batch_generator = BatchGenerator(",
        "samplers=[_make_sampler(args, current_tokenizer)]",
        "logits_processors=[_make_logits_processors(args)]",
        "self._is_batchable(args)",
        "self._serve_single((rqueue, request, args), generation_stream)",
        "self.prompt_cache.fetch_nearest_cache(",
        "del self.prompt_cache",
    ],
    # the server hands mlx-lm no kv_bits (our caches come quantized): they batch
    "server.ResponseGenerator._is_batchable": [
        "self.model_provider.is_batchable",
        "args.seed is None",
        "self.cli_args.kv_bits is None",
    ],
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
    # run with our stream_generate, which drafts from the request our sampler knows; a client
    # leaving is not supported over a pipeline (RunsToTheEnd)
    "server.ResponseGenerator._serve_single": [
        "sampler = _make_sampler(args, tokenizer)",
        "for gen in stream_generate(",
        "sampler=sampler,",
        "kv_bits=self.cli_args.kv_bits,",
        "raise NotImplementedError()",
    ],
    # the drafting batch: its state, the first step made when a prompt's rows join
    "generate.GenerationBatch.__init__": [
        "self._next_tokens = inputs",
        "self._num_tokens = [0] * len(self.uids)",
        "self._matchers = [",
        "self._step()",
    ],
    "generate.GenerationBatch._step": [
        "self._current_tokens = self._next_tokens",
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
    if isinstance(found, property):
        return found.fget
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


# Our own private attributes that mlx-lm happens to name too: not members of mlx-lm's.
OWN = {
    "_idx": "BatchQuantizedCache's token count (its base, _BaseCache, has none)",
    "_right_padding": "BatchQuantizedCache's right padding (its base, _BaseCache, has none)",
}
PACKAGE = Path(mlx_mla.__file__).parent
DOCS = Path(__file__).parents[1] / "docs" / "speculative-server.md"
EXPOSE = "## What mlx-lm would need to expose"


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def our_modules() -> dict[str, tuple[str, str]]:
    """Our modules: name -> (the package its relative imports start from, source)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("mlx_mla", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = ".".join(parts)
        else:
            package = ".".join(parts[:-1])
        modules[".".join(parts)] = (package, path.read_text())
    return modules


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent that is not a package
        return False


def imported(tree: ast.Module, package: str) -> dict[str, str]:
    """Name -> what it names, for each name a module's imports bind (`import os`: os -> os;
    `from mlx_lm import server as s`: s -> mlx_lm.server)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            for a in node.names:
                names[a.asname or a.name] = f"{base}.{a.name}"
    return names


def names_touched(source: str, package: str) -> set[str]:
    """The private names `source` uses: attributes (not of modules outside mlx-lm, as
    `os._exit`), keyword arguments (with_names(_make_sampler=...)) and imported names."""
    tree = ast.parse(source)
    modules = {k: v for k, v in imported(tree, package).items() if is_module(v)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            value = node.value
            module = modules.get(value.id) if isinstance(value, ast.Name) else None
            if module is None or module.startswith("mlx_lm"):
                found.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg and is_private(node.arg):
            found.add(node.arg)
        elif isinstance(node, ast.ImportFrom):
            found |= {a.name for a in node.names if is_private(a.name)}
    return found


def mlx_lm_private_names(modules: dict[str, tuple[str, str]]) -> set[str]:
    """Every private name defined or used in the modules of mlx-lm that ours import."""
    theirs = set()
    for package, source in modules.values():
        for name in imported(ast.parse(source), package).values():
            if name.startswith("mlx_lm"):
                theirs.add(name if is_module(name) else name.rsplit(".", 1)[0])
    names = set()
    for module in theirs:
        origin = importlib.util.find_spec(module).origin
        for node in ast.walk(ast.parse(Path(origin).read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name):
                names.add(node.id)
    return {n for n in names if is_private(n)}


def overrides(modules: dict[str, tuple[str, str]]) -> set[str]:
    """`Class.member` for each private member of an mlx-lm class that a class of ours defines."""
    found = set()
    for name, (_, source) in modules.items():
        module = importlib.import_module(name)
        for node in ast.parse(source).body:
            if not isinstance(node, ast.ClassDef):
                continue
            mro = getattr(module, node.name).__mro__
            theirs = [c for c in mro if c.__module__.startswith("mlx_lm")]
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    defined = [item.name]
                elif isinstance(item, ast.Assign | ast.AnnAssign):
                    targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                    defined = [t.id for t in targets if isinstance(t, ast.Name)]
                else:
                    continue
                for member_name in filter(is_private, defined):
                    owner = next((c for c in theirs if defines(c, member_name)), None)
                    if owner is not None:
                        found.add(f"{owner.__name__}.{member_name}")
    return found


def defines(cls: type, name: str) -> bool:
    """Whether `cls` has `name`, as a class member or an attribute its methods set."""
    return name in vars(cls) or f"self.{name} = " in inspect.getsource(cls)


def pinned() -> set[str]:
    """The private names pinned above: the members in SIGNATURES and USES, and the attributes
    their source texts show."""
    members = {name.rsplit(".", 1)[1] for name in (*SIGNATURES, *USES)}
    shown = {m for texts in USES.values() for t in texts for m in re.findall(r"\.(_\w+)", t)}
    return {n for n in members | shown if is_private(n)}


def documented() -> dict[str, str]:
    """The docs' list of what we still touch: `Owner.member` -> how (overridden, read, ...)."""
    section = DOCS.read_text().split(EXPOSE, 1)[1].split("\n## ", 1)[0]
    found = {}
    for names, how in re.findall(r"^- ([^()]+?)\s+\(([^)]*)\):", section, re.M):
        for qualified in re.findall(r"`([\w.]+)`", names):
            found[qualified] = how
    return found


def touched() -> set[str]:
    """The private members of mlx-lm our modules name or override."""
    modules = our_modules()
    used = set().union(*(names_touched(source, package) for package, source in modules.values()))
    redefined = {name.rsplit(".", 1)[1] for name in overrides(modules)}
    return (used & mlx_lm_private_names(modules) | redefined) - set(OWN)


def test_every_private_member_of_mlx_lm_we_touch_is_pinned():
    unpinned = touched() - pinned()
    assert not unpinned, f"mlx-lm privates used by mlx_mla but not pinned here: {sorted(unpinned)}"


def test_every_private_member_of_mlx_lm_we_touch_is_in_the_docs():
    listed = {name.rsplit(".", 1)[-1] for name in documented()}
    assert touched() == listed, (
        f"not in {DOCS.name}: {sorted(touched() - listed)}; "
        f"listed there but not used: {sorted(listed - touched())}"
    )


def test_the_overridden_private_methods_are_the_documented_ones():
    listed = {name for name, how in documented().items() if "overridden" in how}
    assert overrides(our_modules()) == listed


def test_our_own_private_names_are_assigned_by_us():
    sources = "".join(source for _, source in our_modules().values())
    for name in OWN:
        assert f"self.{name} = " in sources


def test_the_scan_finds_a_private_member_named_and_leaves_other_modules_alone():
    source = """
import os
from mlx_lm import server as mlx_server
from mlx_lm.models.cache import _BaseCache


def step(generator):
    os._exit(0)
    return generator._state_machine_cache, mlx_server._format_top_logprobs
"""
    assert names_touched(source, "mlx_mla") == {
        "_state_machine_cache",
        "_format_top_logprobs",
        "_BaseCache",
    }
    assert "_state_machine_cache" not in pinned()


@pytest.mark.parametrize("quantized", [True, False], ids=["quantized", "float"])
@pytest.mark.parametrize(
    "kind", ["LatentCache", "ExpandedKVCache", "IndexedLatentCache", "IndexedKVCache"]
)
def test_mlx_lm_kv_bits_would_leave_our_quantized_caches_as_they_are(kind, quantized):
    """The server hands mlx-lm no kv_bits, as its caches come quantized: mlx-lm's quantizing
    (generate_step's, with --kv-bits) would change nothing of them, and a float cache it would."""
    from mlx_lm.generate import maybe_quantize_kv_cache

    from mlx_mla.cache import latent

    cache = getattr(latent, kind)()
    cache = [cache.to_quantized(group_size=32, bits=4) if quantized else cache]
    before = cache[0]
    maybe_quantize_kv_cache(cache, 0, 32, 4)
    assert (cache[0] is before) == quantized
