"""A character-level tokenizer saved as a standard Hugging Face tokenizer.

One token per printable ASCII character (plus newline and tab), a ``<s>`` added
in front of every encoded text, and a small chat template, so that
``AutoTokenizer.from_pretrained`` loads it like any other model's tokenizer.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """The mini world's tokenizer: ids 0-3 are <pad>, <s>, </s>, <unk>; then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate((*SPECIALS, *CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character (newlines included) is its own pre-token; Fuse joins them back without spaces.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast

