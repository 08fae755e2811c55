"""Prompt-cache files: cache_prompt, generate --prompt-cache-file and chat /save and /load."""

import shutil

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from test_cli import generated_text, run

import mlx_mla
from mlx_mla.cache import prompt_cache

DOC = "Once upon a time, in a quiet town, there lived a baker. " * 3


@pytest.fixture(scope="module")
def model_dir(checkpoints, tmp_path_factory):
    src, _ = checkpoints["plain_rope", "original"]
    return shutil.copytree(src, tmp_path_factory.mktemp("prompt_cache") / "model")


@pytest.fixture(scope="module")
def other_model_dir(checkpoints):
    return checkpoints["yarn_no_q_lora", "original"][0]


def prefilled(model, tokenizer, text=DOC, step=16):
    cache = model.make_cache()
    for _ in prompt_cache.prefill(model, mx.array(tokenizer.encode(text))[None], cache, step):
        pass
    return cache


def greedy(model, prompt, cache, n=12):
    steps = generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=cache)
    return [token for token, _ in steps]


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_generation_after_loading_a_file_equals_generation_from_the_cache_it_saved(
    model_dir, tmp_path, attention
):
    model, tokenizer = mlx_mla.load(model_dir, attention=attention)
    metadata = prompt_cache.describe(model, model_dir)
    file = tmp_path / "doc.safetensors"
    prompt_cache.save(file, prefilled(model, tokenizer), metadata)
    loaded, saved_metadata = prompt_cache.load(file, metadata)
    assert saved_metadata["tokens"] == str(len(tokenizer.encode(DOC)))
    assert saved_metadata["attention"] == attention
    prompt = tokenizer.encode("The baker", add_special_tokens=False)
    assert greedy(model, prompt, loaded) == greedy(model, prompt, prefilled(model, tokenizer))


def test_a_quantized_cache_round_trips_through_a_file(model_dir, tmp_path):
    from mlx_mla.cache.latent import QuantizedLatentCache

    model, tokenizer = mlx_mla.load(model_dir)
    kv = {"kv_bits": 8, "kv_group_size": 32}
    metadata = prompt_cache.describe(model, model_dir, **kv)

    def quantized():
        cache = model.make_cache()
        tokens = mx.array(tokenizer.encode(DOC))[None]
        for _ in prompt_cache.prefill(model, tokens, cache, 16, **kv):
            pass
        return cache

    file = tmp_path / "q.safetensors"
    prompt_cache.save(file, quantized(), metadata)
    loaded, saved = prompt_cache.load(file, metadata)
    assert saved["kv_bits"] == "8" and all(type(c) is QuantizedLatentCache for c in loaded)
    prompt = tokenizer.encode("The baker", add_special_tokens=False)
    continued = generate_step(mx.array(prompt), model, max_tokens=12, prompt_cache=loaded, **kv)
    fresh = generate_step(mx.array(prompt), model, max_tokens=12, prompt_cache=quantized(), **kv)
    assert [t for t, _ in continued] == [t for t, _ in fresh]


def test_a_file_with_other_kv_bits_is_refused_with_one_line(model_dir, tmp_path):
    doc, file = tmp_path / "doc.txt", tmp_path / "q8.safetensors"
    doc.write_text(DOC)
    args = ("--model", str(model_dir), "--kv-group-size", "32", "--quantized-kv-start", "0")
    made = run(
        "cache_prompt",
        *args,
        "--kv-bits",
        "8",
        "--prompt-file",
        str(doc),
        "--prompt-cache-file",
        str(file),
    )
    assert made.returncode == 0, made.stderr
    assert "8-bit c_kv" in made.stdout
    use = (*args, "--prompt-cache-file", str(file), "--prompt", "x")
    one_line_refusal(run("generate", *use, "--kv-bits", "4"), "kv bits 8, not 4")
    one_line_refusal(run("generate", *use), "kv bits 8, not none")


def test_cache_prompt_then_generate_equals_generate_on_the_whole_text(model_dir, tmp_path):
    doc, file = tmp_path / "doc.txt", tmp_path / "doc.safetensors"
    doc.write_text(DOC)
    args = ("--model", str(model_dir))
    out = run("cache_prompt", *args, "--prompt-file", str(doc), "--prompt-cache-file", str(file))
    assert out.returncode == 0, out.stderr
    assert f"KV cache: {len(DOC)} tokens" in out.stdout  # a character tokenizer
    gen = (*args, "--max-tokens", "20", "--temp", "0", "--no-chat-template")
    continued = run("generate", *gen, "--prompt-cache-file", str(file), "--prompt", "The baker")
    whole = run("generate", *gen, "--prompt", DOC + "The baker")
    assert continued.returncode == 0, continued.stderr
    assert generated_text(continued.stdout) == generated_text(whole.stdout)
    assert f"KV cache: {len(DOC + 'The baker') + 20} tokens" in continued.stdout


def one_line_refusal(out, *words):
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


@pytest.fixture(scope="module")
def saved_file(model_dir, tmp_path_factory):
    file = tmp_path_factory.mktemp("saved") / "doc.safetensors"
    model, tokenizer = mlx_mla.load(model_dir)
    prompt_cache.save(file, prefilled(model, tokenizer), prompt_cache.describe(model, model_dir))
    return file


def test_a_file_from_another_model_is_refused_with_one_line(saved_file, other_model_dir):
    args = ("--model", str(other_model_dir), "--prompt-cache-file", str(saved_file))
    one_line_refusal(run("generate", *args, "--prompt", "x"), "was made with model", "fingerprint")


def test_a_file_from_the_other_attention_path_is_refused_with_one_line(saved_file, model_dir):
    args = ("--model", str(model_dir), "--prompt-cache-file", str(saved_file))
    out = run("generate", *args, "--prompt", "x", "--attention", "mha")
    one_line_refusal(out, "attention path mla, not mha")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_or_truncated_file_is_refused_with_one_line(
    saved_file, model_dir, tmp_path, damage
):
    data = saved_file.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(
        {"garbage": b"\x00" * 1000, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    args = ("--model", str(model_dir), "--prompt-cache-file", str(broken))
    one_line_refusal(run("generate", *args, "--prompt", "x"), "not a readable prompt-cache file")


def test_an_interrupted_save_leaves_nothing_under_the_real_name(model_dir, tmp_path, monkeypatch):
    model, tokenizer = mlx_mla.load(model_dir)
    cache, metadata = prefilled(model, tokenizer), prompt_cache.describe(model, model_dir)
    good = tmp_path / "good.safetensors"
    prompt_cache.save(good, cache, metadata)
    before = good.read_bytes()

    def interrupted(file_name, *args):
        with open(file_name, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(prompt_cache, "save_prompt_cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prompt_cache.save(tmp_path / "new.safetensors", cache, metadata)
    with pytest.raises(KeyboardInterrupt):
        prompt_cache.save(good, cache, metadata, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors"]  # no partial left
    assert good.read_bytes() == before


def test_cache_prompt_never_replaces_a_file_without_force(model_dir, tmp_path):
    doc, file = tmp_path / "doc.txt", tmp_path / "doc.safetensors"
    doc.write_text(DOC)
    file.write_text("mine")
    args = ("--model", str(model_dir), "--prompt-file", str(doc), "--prompt-cache-file", str(file))
    one_line_refusal(run("cache_prompt", *args), "already exists")
    assert file.read_text() == "mine"
    assert run("cache_prompt", *args, "--force").returncode == 0
    assert file.stat().st_size > 1000


def test_chat_load_continues_the_conversation_it_saved(model_dir, tmp_path):
    file = tmp_path / "chat.safetensors"
    args = ("--model", str(model_dir), "--max-tokens", "10")
    first = run("chat", *args, stdin=f"Hello\n/save {file}\nHow are you?\n/exit\n")
    second = run("chat", *args, stdin=f"/load {file}\nHow are you?\n/exit\n")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "[saved " in first.stdout and "[loaded " in second.stdout
    replies = [out.stdout.split(">> ")[-2].strip() for out in (first, second)]
    assert replies[0] and replies[0] == replies[1]


def test_chat_file_errors_are_one_line_and_the_chat_goes_on(model_dir, other_model_dir, tmp_path):
    theirs = tmp_path / "theirs.safetensors"
    run("chat", "--model", str(other_model_dir), "--max-tokens", "3", stdin=f"Hi\n/save {theirs}\n")
    script = f"/load {tmp_path / 'none.safetensors'}\n/load {theirs}\n/save\nHi\n/stats\n/exit\n"
    out = run("chat", "--model", str(model_dir), "--max-tokens", "3", stdin=script)
    assert out.returncode == 0, out.stderr
    assert "[error: no such prompt-cache file" in out.stdout
    assert "[error: " in out.stdout and "was made with model" in out.stdout
    assert "[/save needs a file name" in out.stdout
    errors = [line for line in out.stdout.splitlines() if "[error: " in line]
    assert len(errors) == 2 and all(line.endswith("]") for line in errors), out.stdout
    assert "KV cache:" in out.stdout


def test_perplexity_through_the_float_cache_equals_whole_windows(model_dir):
    from mlx_mla.perplexity import perplexity

    model, tokenizer = mlx_mla.load(model_dir)
    tokens = tokenizer.encode(DOC * 3)
    whole, count, whole_spans = perplexity(model, tokens, 96, 4, None, parts=3)
    chunked, count2, chunked_spans = perplexity(model, tokens, 96, 4, {"prefill_step_size": 16}, 3)
    assert count == count2 == (len(tokens) - 1) // 96 * 96
    assert chunked == pytest.approx(whole, rel=1e-5)
    for span, value in whole_spans.items():
        assert chunked_spans[span] == pytest.approx(value, rel=1e-5)
    quantized, _, _ = perplexity(
        model, tokens, 96, 4, {"prefill_step_size": 16, "kv_bits": 8, "kv_group_size": 32}
    )
    assert quantized != whole and quantized == pytest.approx(whole, rel=0.01)


def test_perplexity_says_which_mode_it_used(model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(DOC * 4)
    args = ("--model", str(model_dir), "--text-file", str(text), "--holdout", "0.5")
    args = (*args, "--context", "64", "--parts", "2")
    window = run("perplexity", *args)
    cache = run("perplexity", *args, "--mode", "cache", "--prefill-step-size", "16")
    assert window.returncode == cache.returncode == 0, window.stderr + cache.stderr
    assert "whole windows" in window.stdout and "by position: 0-31: " in window.stdout
    assert "through the mla float cache, chunks of 16" in cache.stdout
    bits = ("--kv-bits", "8", "--kv-group-size", "32")
    one_line_refusal(run("perplexity", *args, *bits), "--kv-bits needs --mode cache")
