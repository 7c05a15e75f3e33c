"""The demo's verifiable task: two-digit addition, "07+12=" -> "019", with a character tokenizer.

Every sequence has the same length (operands zero-padded to two digits, the sum to three), so a
batch needs no padding and no attention mask: ``BOS a a + b b = c c c`` is 10 tokens, the first 7
are the prompt and the last 3 the answer. Exact match means all three answer characters are right.
"""

from __future__ import annotations

import torch

CHARS = "0123456789+="
BOS = len(CHARS)  # 12
VOCAB_SIZE = BOS + 1
PROMPT_LEN = 7  # BOS + "aa+bb="
ANSWER_LEN = 3  # "ccc"
SEQ_LEN = PROMPT_LEN + ANSWER_LEN
HELD_OUT = 1000  # pairs (a, b) never trained on, used for accuracy

_INDEX = {c: i for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    """Characters -> token ids (no BOS)."""
    return [_INDEX[c] for c in text]


def decode(ids: list[int] | torch.Tensor) -> str:
    """Token ids -> characters; BOS is dropped."""
    return "".join(CHARS[i] for i in (int(x) for x in ids) if i < len(CHARS))


def prompt_text(a: int, b: int) -> str:
    return f"{a:02d}+{b:02d}="


def answer_text(a: int, b: int) -> str:
    return f"{a + b:03d}"


def split_pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All 10 000 pairs (a, b) in [0, 99]², shuffled with ``seed``: (train, held_out) as (N, 2)."""
    a, b = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
    pairs = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    pairs = pairs[perm]
    return pairs[HELD_OUT:], pairs[:HELD_OUT]


def prompt_ids(pairs: torch.Tensor) -> torch.Tensor:
    """(N, 2) pairs -> (N, PROMPT_LEN) token ids ``BOS a a + b b =``."""
    a, b = pairs[:, 0], pairs[:, 1]
    plus = torch.full_like(a, _INDEX["+"])
    eq = torch.full_like(a, _INDEX["="])
    bos = torch.full_like(a, BOS)
    cols = [bos, a // 10, a % 10, plus, b // 10, b % 10, eq]
    return torch.stack(cols, dim=1)


def answer_ids(pairs: torch.Tensor) -> torch.Tensor:
    """(N, 2) pairs -> (N, ANSWER_LEN) token ids of the zero-padded sum."""
    c = pairs[:, 0] + pairs[:, 1]
    return torch.stack([c // 100, (c // 10) % 10, c % 10], dim=1)


def reversed_answer_ids(pairs: torch.Tensor) -> torch.Tensor:
    """(N, 2) pairs -> (N, ANSWER_LEN): the sum's three digits in reverse order ("019" -> "910"),
    the other target `opd-drift` switches to."""
    return answer_ids(pairs).flip(dims=[1])


def full_ids(pairs: torch.Tensor) -> torch.Tensor:
    """(N, SEQ_LEN): prompt followed by the correct answer."""
    return torch.cat([prompt_ids(pairs), answer_ids(pairs)], dim=1)


def exact_match(answers: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Reward 1.0 where all ANSWER_LEN generated tokens equal the true sum's, else 0.0 (float, (N,))."""
    return (answers == answer_ids(pairs)).all(dim=1).to(torch.float32)


def sample_pairs(pairs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n pairs drawn uniformly (with replacement) from ``pairs``."""
    idx = torch.randint(len(pairs), (n,), generator=generator)
    return pairs[idx]
