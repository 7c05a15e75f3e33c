"""The demo's tiny Qwen3: configuration, sampling, token log-probabilities, and its weights.

The model is a real ``transformers`` Qwen3 (random init, no download) at toy size. Weights are
stored as bfloat16 safetensors (the anchor is what a bf16 checkpoint would hold, which is the
premise of the bf16-visibility diagnostic) and trained in float32 (fp32 master weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from . import task

WEIGHTS_DIR = Path(__file__).parent / "weights"
ANCHOR_FILE = "anchor.safetensors"
TEACHER_FILE = "teacher.safetensors"


def config(hidden: int = 128, layers: int = 3) -> Qwen3Config:
    """The tiny Qwen3: ``layers`` blocks of width ``hidden``, 4 query / 2 key-value heads."""
    return Qwen3Config(
        vocab_size=task.VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=task.SEQ_LEN,
        tie_word_embeddings=True,
        bos_token_id=task.BOS,
        eos_token_id=task.BOS,
        pad_token_id=task.BOS,
        attention_dropout=0.0,
    )


def build(seed: int, hidden: int = 128, layers: int = 3) -> Qwen3ForCausalLM:
    """A randomly initialised tiny Qwen3 (float32, eval mode: no dropout anywhere)."""
    torch.manual_seed(seed)
    cfg = config(hidden, layers)
    cfg._attn_implementation = "eager"
    model = Qwen3ForCausalLM(cfg)
    return model.float().eval()


def load(path: Path | str, hidden: int = 128, layers: int = 3) -> Qwen3ForCausalLM:
    """A tiny Qwen3 with the (bf16) weights of a safetensors file, upcast to float32."""
    model = build(0, hidden, layers)
    state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


def save(model: torch.nn.Module, path: Path | str) -> None:
    """Save the weights as bfloat16 safetensors (tied lm_head stored once)."""
    state = {
        k: v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    save_file(state, str(path))


def round_to_bf16(model: torch.nn.Module) -> None:
    """W <- f32(bf16(W)) in place: start training from exactly what a bf16 checkpoint holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def token_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log π(x_t | x_<t) of the answer tokens: (N, ANSWER_LEN) for ids of shape (N, SEQ_LEN)."""
    logits = model(input_ids=ids).logits[:, task.PROMPT_LEN - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, ids[:, task.PROMPT_LEN :].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Complete (N, PROMPT_LEN) prompts with ANSWER_LEN tokens: sampled, or greedy when
    ``generator`` is None. Returns the (N, SEQ_LEN) sequences."""
    ids = prompts
    for _ in range(task.ANSWER_LEN):
        logits = model(input_ids=ids).logits[:, -1].float()
        if generator is None:
            nxt = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        ids = torch.cat([ids, nxt.unsqueeze(-1)], dim=1)
    return ids


@torch.no_grad()
def accuracy(model: torch.nn.Module, pairs: torch.Tensor, batch: int = 500) -> float:
    """Exact match of greedy answers on ``pairs`` (held-out prompts), in [0, 1]."""
    hits = 0.0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        ids = generate(model, task.prompt_ids(chunk))
        hits += float(task.exact_match(ids[:, task.PROMPT_LEN :], chunk).sum())
    return hits / len(pairs)
