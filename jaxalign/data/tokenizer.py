"""A tiny character-level tokenizer with a chat template, for tests and the synthetic task.

Built with the `tokenizers` library (one token per character, special tokens matched first) and
wrapped as a `transformers.PreTrainedTokenizerFast`, so it saves with `save_pretrained`, reloads
with `AutoTokenizer.from_pretrained` and goes through the same code paths as a real tokenizer:

- plain text gets a leading `<bos>` from the post-processor (`add_special_tokens=True`);
- the chat template renders `<bos>` itself, then `<|role|>content` per message, ending each assistant
  turn with `<eos>`; `add_generation_prompt=True` appends `<|assistant|>`:

    [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    -> "<bos><|user|>2+2=<|assistant|>4<eos>"

Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, <|system|>=4, <|user|>=5, <|assistant|>=6, then the
characters of `chars` in order (digits first by default: "0" is 7, ..., "9" is 16).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
ROLE_TOKENS = SPECIAL_TOKENS[4:]
DEFAULT_CHARS = string.digits + "+-*=" + " " + string.ascii_lowercase + ".,?:!\n"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(*, chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """Returns the character-level tokenizer described in the module docstring.

    `chars` lists the ordinary characters (each must be a single, distinct character); anything else
    maps to `<unk>`. Vocabulary size is `7 + len(chars)` (54 by default).
    """
    if len(set(chars)) != len(chars):
        raise ValueError(f"`chars` must hold distinct characters, got {chars!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
