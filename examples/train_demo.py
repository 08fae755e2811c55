"""Train a small DeepSeek-V2 (MLA, YaRN, DeepSeekMoE) on tinyshakespeare, save a HF checkpoint.

    python examples/train_demo.py                    # about 40 minutes on 2 CPU cores

The last 10% of the text is held out: the tokenizer and the model see only the first 90%.
"""

import argparse
import io
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm
from transformers import AutoTokenizer, DeepseekV2Config, DeepseekV2ForCausalLM, LlamaTokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared/data/tinyshakespeare.txt"
DEFAULT_OUT = ROOT / "build/demo_hf"
DEFAULT_PROMPT = "ROMEO:"
# The demo model is a base model: its chat template lays a conversation out as a play script, each
# user turn a line of it (e.g. "ROMEO:") and each reply the model's continuation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] + '\n' }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
)


def setup_arg_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=260)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-loss-alpha", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps")
    return p


def train_tokenizer(text, vocab_size, seed, out, max_length):
    """SentencePiece BPE with byte fallback; newlines and spaces are kept as they are."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tok = LlamaTokenizer.from_pretrained(
        out,
        add_prefix_space=False,
        add_bos_token=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
    )
    tok.save_pretrained(out, save_jinja_files=False)
    return sp


def make_config(vocab_size, context):
    return DeepseekV2Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        topk_method="greedy",
        # YaRN stretches a 1/4-length RoPE to the full window, and the model trains on that full
        # window: the context it claims is the one it has seen.
        max_position_embeddings=context,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": context // 4,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def get_batch(data, batch_size, context, gen):
    ix = torch.randint(len(data) - context - 1, (batch_size,), generator=gen)
    x = torch.stack([data[i : i + context] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + context] for i in ix])
    return x, y


def balance_loss(router_logits, top_k):
    """DeepSeek-V2's expert-level balance loss, mean over MoE layers; 1.0 for uniform routing."""
    loss = 0.0
    for logits in router_logits:
        probs = logits.softmax(-1)  # (B*T, n_experts)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, -1).indices, 1.0)
        loss = loss + (chosen.mean(0) * probs.mean(0)).sum() * probs.shape[-1] / top_k
    return loss / len(router_logits)


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, data, context, batch_size=4, parts=4):
    """Mean next-token NLL over non-overlapping windows of `context` tokens, overall and for each
    of `parts` equal position ranges of the window."""
    model.eval()
    n = (len(data) - 1) // context
    x = data[: n * context].view(n, context)
    y = data[1 : n * context + 1].view(n, context)
    by_position = torch.zeros(context)
    for i in range(0, n, batch_size):
        logits = model(x[i : i + batch_size]).logits
        nll = F.cross_entropy(logits.transpose(1, 2), y[i : i + batch_size], reduction="none")
        by_position += nll.sum(0)  # (context,)
    model.train()
    by_part = (by_position.view(parts, -1).sum(1) / (n * context // parts)).tolist()
    return by_position.sum().item() / y.numel(), by_part


def position_report(by_part, context):
    size = context // len(by_part)
    return {f"{i * size}-{(i + 1) * size - 1}": math.exp(loss) for i, loss in enumerate(by_part)}


def main():
    args = setup_arg_parser().parse_args()
    start = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)

    text = args.data.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    sp = train_tokenizer(text[:split], args.vocab_size, args.seed, args.out, args.context)
    train_data = torch.tensor(sp.encode(text[:split]), dtype=torch.long)
    eval_data = torch.tensor(sp.encode(text[split:]), dtype=torch.long)
    print(f"tokens: {len(train_data):,} train, {len(eval_data):,} held out")

    config = make_config(sp.vocab_size(), args.context)
    model = DeepseekV2ForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}")
    # weight decay on matrices and embeddings, not on norms
    decay = [p for p in model.parameters() if p.dim() >= 2]
    norms = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": norms, "weight_decay": 0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))

    batch_size = args.batch_tokens // args.context
    report = {
        "parameters": n_params,
        "train_tokens": len(train_data),
        "eval_tokens": len(eval_data),
        "train_chars": split,
        "eval_chars": len(text) - split,
        "tokenizer": {"type": "sentencepiece bpe, byte_fallback", "vocab_size": sp.vocab_size()},
        "batch_size": batch_size,
        "tokens_per_step": batch_size * args.context,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "config": config.to_dict(),
    }

    def checkpoint(steps_done):
        """Save, so that a run stopped early still leaves a usable checkpoint."""
        model.save_pretrained(args.out)
        report.update(steps_done=steps_done, train_minutes=(time.time() - start) / 60)
        (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    bar = tqdm(range(args.steps), mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = get_batch(train_data, batch_size, args.context, gen)
        out = model(x, output_router_logits=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        aux = balance_loss(out.router_logits, config.num_experts_per_tok)
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_loss_alpha * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", balance=f"{aux.item():.3f}", refresh=False)
        if step % 50 == 0 or step == args.steps - 1:
            tqdm.write(f"step {step:5d}  loss {loss.item():.4f}  balance {aux.item():.3f}")
        if (step + 1) % args.save_every == 0 and step != args.steps - 1:
            checkpoint(step + 1)

    checkpoint(args.steps)
    eval_loss, by_part = evaluate(model, eval_data, args.context)
    report.update(
        held_out_loss=eval_loss,
        held_out_perplexity=math.exp(eval_loss),
        held_out_perplexity_by_position=position_report(by_part, args.context),
    )
    print(f"held-out loss {eval_loss:.4f}  perplexity {math.exp(eval_loss):.2f}")
    for span, ppl in report["held_out_perplexity_by_position"].items():
        print(f"  tokens {span}: perplexity {ppl:.2f}")
    model = DeepseekV2ForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    reload_loss, _ = evaluate(model, eval_data, args.context)
    assert abs(reload_loss - eval_loss) < 1e-4, (reload_loss, eval_loss)

    tok = AutoTokenizer.from_pretrained(args.out)
    assert tok.encode(text[split:], add_special_tokens=False) == eval_data.tolist()
    prompt = tok(DEFAULT_PROMPT, return_tensors="pt").input_ids
    greedy = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    torch.manual_seed(args.seed)
    sampled = model.generate(
        prompt, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature
    )
    samples = {
        "greedy": tok.decode(greedy[0], skip_special_tokens=True),
        f"temperature_{args.temperature}": tok.decode(sampled[0], skip_special_tokens=True),
    }
    for name, sample in samples.items():
        print(f"--- {name} ---\n{sample}\n")

    report.update(
        reloaded_held_out_loss=reload_loss,
        wall_minutes=(time.time() - start) / 60,
        samples=samples,
    )
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out}  ({report['wall_minutes']:.1f} minutes)")


if __name__ == "__main__":
    main()
