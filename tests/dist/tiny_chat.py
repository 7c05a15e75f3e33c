"""A character tokenizer with a chat template and tiny chat data sets, for the TRL and PEFT tests
(nothing downloaded): every printable ASCII character is one token, plus <pad>, <|im_start|> and
<|im_end|> (the end-of-sequence token), so the vocabulary (100 ids) fits tiny_qwen3's 128.
"""

from __future__ import annotations

import string

from transformers import PreTrainedTokenizer

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHARS = [c for c in string.printable if c not in "\x0b\x0c"]
# Qwen-style ChatML; {% generation %} marks the assistant's tokens for TRL's assistant-only loss.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class CharTokenizer(PreTrainedTokenizer):
    """One token per character; the special tokens are whole words."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, **kwargs) -> None:
        self._vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
        self._inverse = {i: t for t, i in self._vocab.items()}
        kwargs.setdefault("pad_token", "<pad>")
        kwargs.setdefault("eos_token", "<|im_end|>")
        kwargs.setdefault("bos_token", None)
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        kwargs.setdefault("additional_special_tokens", ["<|im_start|>"])
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [c if c in self._vocab else "?" for c in text]

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, self._vocab["?"])

    def _convert_id_to_token(self, index: int) -> str:
        return self._inverse.get(int(index), "?")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
        return ()


def prompts(n: int = 8) -> list[list[dict]]:
    """n short conversational prompts (`[{"role": "user", "content": ...}]`)."""
    return [[{"role": "user", "content": f"add {i} and {i + 1}"}] for i in range(n)]


def conversations(n: int = 8) -> list[list[dict]]:
    """n prompt + answer conversations, for SFT."""
    return [
        p + [{"role": "assistant", "content": str(2 * i + 1)}] for i, p in enumerate(prompts(n))
    ]
