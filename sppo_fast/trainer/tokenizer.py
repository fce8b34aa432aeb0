"""A character-level tokenizer built locally (nothing from a hub).

Ids are fixed: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``"\\n"`` 4, then the printable
ASCII characters ``" "`` (32) to ``"~"`` (126) as ids 5..99: 100 tokens in all. Every character is one
token, so ``"\\n"`` is a single token and :func:`sppo_fast.newline_token_ids` finds exactly it.
Any other character (tabs, non-ASCII) becomes ``<unk>``.

Encoding prepends ``<bos>`` (the Llama convention) and appends nothing; the trainer appends
``eos_token_id`` after a solution itself and encodes responses with ``add_special_tokens=False``.
Decoding joins tokens with no separator (a ``Fuse`` decoder, and transformers' clean-up of
tokenization spaces switched off), so ``decode(encode(text))`` is ``text`` for in-vocabulary text.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, processors
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Split
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = ("\n",) + tuple(chr(code) for code in range(32, 127))


def char_vocab() -> dict[str, int]:
    """Token -> id, deterministic: special tokens first, then newline, then printable ASCII."""
    return {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}


def build_backend_tokenizer() -> Tokenizer:
    vocab = char_vocab()
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    # Split every character into its own piece ("isolated" keeps it as a token); no normalizer, no
    # whitespace handling: spaces and newlines are ordinary characters.
    tokenizer.pre_tokenizer = Split(pattern=Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer as a transformers tokenizer (save_pretrained / from_pretrained)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend_tokenizer(),
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # generation batches pad on the left so every prompt ends at the same column
        model_max_length=4096,
    )
