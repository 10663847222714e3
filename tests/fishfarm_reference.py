"""The official CycleQD code's chat templates, as reference texts for the fidelity tests.

Copied from SakanaAI/CycleQD at 3d14971 (Apache-2.0): ``MBPP`` is ``code_chat_templates`` of
``tasks/mbpp.py`` (with the same whitespace removal applied), ``LLAMA3`` is
``evaluation/fishfarm/fishfarm/chat_templates.py``. Tests render them with transformers, as
fishfarm's ``VLLMModel._into_prompt`` did, and compare cycleqd's prompts with the result.
"""
from __future__ import annotations

MBPP = r"""
{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = messages[0]['content'].strip() + '\n\n' %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = '' %}
{% endif %}

{{ system_message }}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception(
            'Conversation roles must alternate user/assistant/user/assistant/...')}}
    {% endif %}

    {% if message['role'] == 'user' %}
        {{ '@@ Instruction:\n' + message['content'].strip() + '\n\n' }}
    {% elif message['role'] == 'assistant' %}
        {{ '@@ Response:\n' + message['content'].strip() }}
    {% endif %}

    {% if loop.last and message['role'] == 'user' and add_generation_prompt %}
        {{ '@@ Response:' }}
    {% endif %}
{% endfor %}
""".replace("    ", "").replace("\n", "")

LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

#: fishfarm's MBPP prefill (``response_prefix`` of ``map_mbpp_problem``).
MBPP_PREFILL = "```python"


def into_prompt(tokenizer, messages: list[dict[str, str]], template: str, prefill: str = "") -> str:
    """fishfarm's ``VLLMModel._into_prompt``: the template with a generation prompt, then the prefill appended."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True) + prefill
