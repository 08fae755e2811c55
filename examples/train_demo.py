"""Train a small DeepSeek-V2 (MLA, YaRN, DeepSeekMoE) with a DeepSeek-V3-style multi-token
prediction (MTP) layer on tinyshakespeare, save a HF checkpoint.

    python examples/train_demo.py                    # about 50 minutes on 2 CPU cores

The last 10% of the text is held out: the tokenizer and the model see only the first 90%. Most steps
train on `--short-context` windows (cheap), the last `--long-fraction` on the whole `--context`, so
the model holds the context it claims. The MTP layer is saved as DeepSeek-V3 ships it: decoder layer
`num_hidden_layers` with `enorm`, `hnorm`, `eh_proj`, `shared_head` and its own `embed_tokens`.
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
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoTokenizer, DeepseekV2Config, DeepseekV2ForCausalLM, LlamaTokenizer
from transformers.masking_utils import create_causal_mask
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2DecoderLayer,
    DeepseekV2RMSNorm,
)

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
    p.add_argument("--short-context", type=int, default=256)
    p.add_argument("--long-fraction", type=float, default=0.15, help="share of steps on --context")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-loss-alpha", type=float, default=0.01)
    # DeepSeek-V3's report: MTP loss weight 0.3 for the first 10T of 14.8T tokens, then 0.1
    p.add_argument("--mtp-weight", type=float, nargs=2, default=(0.3, 0.1))
    p.add_argument(
        "--mtp-switch", type=float, default=10 / 14.8, help="share of steps at the first"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads; 1 where other work shares the CPU"
    )
    p.add_argument(
        "--init-from", type=Path, help="continue training this checkpoint (its MTP layer too)"
    )
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
        num_nextn_predict_layers=1,
    )


class MTPLayer(torch.nn.Module):
    """DeepSeek-V3's MTP module: from the main model's final-norm hidden state h_i and the embedding
    of token i+1, predict token i+2 through one more decoder layer. Embedding and output head are
    the main model's (shared, as in V3); the checkpoint stores copies under the layer's names."""

    def __init__(self, config, layer_idx):
        super().__init__()
        hidden = config.hidden_size
        self.enorm = DeepseekV2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.eh_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = DeepseekV2DecoderLayer(config, layer_idx)
        self.norm = DeepseekV2RMSNorm(hidden, eps=config.rms_norm_eps)  # shared_head.norm
        self.layer_idx = layer_idx
        torch.nn.init.normal_(self.eh_proj.weight, std=config.initializer_range)
        for name, w in self.layer.named_parameters():
            if w.dim() >= 2:
                torch.nn.init.normal_(w, std=config.initializer_range)
            elif "norm" in name:
                torch.nn.init.ones_(w)

    def forward(self, model, hidden, next_tokens):
        """hidden (B, T, D) at positions 0..T-1, next_tokens (B, T): tokens 1..T -> logits (B, T, V)
        for tokens 2..T+1."""
        x = torch.cat([self.enorm(model.model.embed_tokens(next_tokens)), self.hnorm(hidden)], -1)
        x = self.eh_proj(x)
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        mask = create_causal_mask(
            config=model.config,
            inputs_embeds=x,
            attention_mask=None,
            cache=None,
            position_ids=positions,
        )
        rope = model.model.rotary_emb(x, positions)
        x = self.layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        return model.lm_head(self.norm(x))

    def load_checkpoint_tensors(self, tensors: dict):
        """The inverse of checkpoint_tensors (the embedding and head are the main model's)."""
        prefix = f"model.layers.{self.layer_idx}."
        own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        for name in ("enorm", "hnorm", "eh_proj"):
            getattr(self, name).weight.data.copy_(own.pop(f"{name}.weight"))
        self.norm.weight.data.copy_(own.pop("shared_head.norm.weight"))
        for name in ("shared_head.head.weight", "embed_tokens.weight"):
            own.pop(name)
        self.layer.load_state_dict(own)

    def checkpoint_tensors(self, model):
        prefix = f"model.layers.{self.layer_idx}."
        out = {prefix + k: v for k, v in self.layer.state_dict().items()}
        out |= {
            prefix + "enorm.weight": self.enorm.weight,
            prefix + "hnorm.weight": self.hnorm.weight,
            prefix + "eh_proj.weight": self.eh_proj.weight,
            prefix + "shared_head.norm.weight": self.norm.weight,
            prefix + "shared_head.head.weight": model.lm_head.weight,
            prefix + "embed_tokens.weight": model.model.embed_tokens.weight,
        }
        return {k: v.detach().contiguous().clone() for k, v in out.items()}


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


def context_at(step, args):
    return args.context if step >= args.steps * (1 - args.long_fraction) else args.short_context


def mtp_weight_at(step, args):
    return args.mtp_weight[0] if step < args.steps * args.mtp_switch else args.mtp_weight[1]


@torch.no_grad()
def mtp_accuracy(model, mtp, data, context, batch_size=4):
    """Share of held-out positions where the MTP layer's greedy token equals the one two ahead."""
    model.eval()
    n = (len(data) - 2) // context
    hits = total = 0
    for i in range(0, n, batch_size):
        x = torch.stack(
            [data[j * context : (j + 1) * context + 2] for j in range(i, min(n, i + batch_size))]
        )
        hidden = model.model(x[:, :-2]).last_hidden_state
        logits = mtp(model, hidden, x[:, 1:-1])
        hits += (logits.argmax(-1) == x[:, 2:]).sum().item()
        total += logits.shape[0] * logits.shape[1]
    model.train()
    return hits / total


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
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    text = args.data.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    sp = train_tokenizer(text[:split], args.vocab_size, args.seed, args.out, args.context)
    train_data = torch.tensor(sp.encode(text[:split]), dtype=torch.long)
    eval_data = torch.tensor(sp.encode(text[split:]), dtype=torch.long)
    print(f"tokens: {len(train_data):,} train, {len(eval_data):,} held out")

    config = make_config(sp.vocab_size(), args.context)
    model = DeepseekV2ForCausalLM(config).float()
    mtp = MTPLayer(config, config.num_hidden_layers).float()
    if args.init_from:
        model = DeepseekV2ForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        config = model.config
        mtp.load_checkpoint_tensors(load_file(args.init_from / "model.safetensors"))
        first = json.loads((args.init_from / "training.json").read_text())
    n_params = sum(p.numel() for p in model.parameters())
    n_mtp = sum(p.numel() for p in mtp.parameters())
    print(f"parameters: {n_params:,} (+ {n_mtp:,} in the MTP layer)")
    # weight decay on matrices and embeddings, not on norms
    params = [*model.parameters(), *mtp.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    norms = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": norms, "weight_decay": 0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))

    report = {
        "parameters": n_params,
        "mtp_parameters": n_mtp,
        "train_tokens": len(train_data),
        "eval_tokens": len(eval_data),
        "train_chars": split,
        "eval_chars": len(text) - split,
        "tokenizer": {"type": "sentencepiece bpe, byte_fallback", "vocab_size": sp.vocab_size()},
        "tokens_per_step": args.batch_tokens,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "config": config.to_dict(),
    }
    if args.init_from:  # the stages before this one, oldest first
        report["earlier_stages"] = first.get("earlier_stages", []) + [
            {k: first[k] for k in ("args", "steps_done", "wall_minutes", "held_out_perplexity")}
        ]

    def checkpoint(steps_done):
        """Save, so that a run stopped early still leaves a usable checkpoint."""
        model.save_pretrained(args.out)
        weights = args.out / "model.safetensors"
        save_file(load_file(weights) | mtp.checkpoint_tensors(model), weights, {"format": "pt"})
        report.update(steps_done=steps_done, train_minutes=(time.time() - start) / 60)
        (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    bar = tqdm(range(args.steps), mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        context = context_at(step, args)
        x, y = get_batch(train_data, args.batch_tokens // context, context + 1, gen)
        out = model.model(x[:, :-1], output_router_logits=True)
        hidden = out.last_hidden_state  # (B, T, D), after the final norm
        loss = F.cross_entropy(model.lm_head(hidden).flatten(0, 1), y[:, :-1].flatten())
        mtp_logits = mtp(model, hidden[:, :-1], x[:, 1:-1])  # token i+1 with h_i -> token i+2
        mtp_loss = F.cross_entropy(mtp_logits.flatten(0, 1), y[:, 1:-1].flatten())
        aux = balance_loss(out.router_logits, config.num_experts_per_tok)
        opt.zero_grad(set_to_none=True)
        (loss + mtp_weight_at(step, args) * mtp_loss + args.aux_loss_alpha * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", mtp=f"{mtp_loss.item():.3f}", refresh=False)
        if step % 50 == 0 or step == args.steps - 1:
            tqdm.write(
                f"step {step:5d}  context {context}  loss {loss.item():.4f}  "
                f"mtp {mtp_loss.item():.4f}  balance {aux.item():.3f}"
            )
        if (step + 1) % args.save_every == 0 and step != args.steps - 1:
            checkpoint(step + 1)

    checkpoint(args.steps)
    eval_loss, by_part = evaluate(model, eval_data, args.context)
    mtp.eval()
    report.update(
        held_out_mtp_accuracy=mtp_accuracy(model, mtp, eval_data, args.context),
        held_out_loss=eval_loss,
        held_out_perplexity=math.exp(eval_loss),
        held_out_perplexity_by_position=position_report(by_part, args.context),
    )
    print(f"held-out loss {eval_loss:.4f}  perplexity {math.exp(eval_loss):.2f}")
    print(f"held-out MTP accuracy (token i+2): {report['held_out_mtp_accuracy']:.3f}")
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
