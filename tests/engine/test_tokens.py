"""Prompt tokens: the official protocol's chat prompts are tokenised as vLLM 0.3.0 tokenised
fishfarm's rendered text (special tokens added, so a second BOS); other requests are not."""
from __future__ import annotations

from fishfarm_reference import LLAMA3, into_prompt

from cycleqd.engine.protocol import GenRequest, encode_request
from cycleqd.mini.tokenizer import make_char_tokenizer

MESSAGES = ({"role": "user", "content": "How many rows?"}, {"role": "assistant", "content": "Action: Operation"},
            {"role": "user", "content": "[(3,)]"})


def _llama3_char_tokenizer():
    """A tokenizer that adds a BOS (``<s>``), carrying fishfarm's LLAMA3 template (which writes ``bos_token``)."""
    tok = make_char_tokenizer()
    tok.chat_template = LLAMA3
    return tok


def test_official_chat_prompt_has_the_second_bos_vllm_030_added():
    """With special_tokens the ids equal ``tokenizer.encode(rendered text)`` (vLLM 0.3.0's default
    ``add_special_tokens=True``): BOS twice; without, the template's one BOS only."""
    tok = _llama3_char_tokenizer()
    bos = tok.bos_token_id
    text = into_prompt(tok, [dict(m) for m in MESSAGES], LLAMA3)
    assert text.startswith("<s><|start_header_id|>user")
    official = encode_request(tok, GenRequest("1", messages=MESSAGES, special_tokens=True))
    assert official == tok(text)["input_ids"] == tok.encode(text)
    assert official[:2] == [bos, bos] and official[2] != bos
    plain = encode_request(tok, GenRequest("1", messages=MESSAGES))
    assert plain[0] == bos and plain[1] != bos and plain == official[1:]


def test_prefill_follows_the_rendered_text_and_raw_prompts_keep_defaults():
    """The prefill is appended after the generation prompt before tokenising; raw prompts (MBPP) get
    the tokenizer's defaults, one BOS, as vLLM 0.3.0 gave them."""
    tok = _llama3_char_tokenizer()
    ids = encode_request(tok, GenRequest("1", messages=MESSAGES[:1], prefill="```sql", special_tokens=True))
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n```sql")
    raw = encode_request(tok, GenRequest("1", prompt="@@ Response:```python"))
    assert raw[0] == tok.bos_token_id and raw[1] != tok.bos_token_id
