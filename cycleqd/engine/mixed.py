"""Greedy decoding of a batch whose rows use different LoRA adapters (PEFT's mixed-adapter batches).

Every row of one forward pass names its adapter (``adapter_names=``, ``"__base__"`` for
the base alone); PEFT adds each row's own ``B A x`` in its LoRA layers, so M children
over one base decode in one batch with no weight swap. Rows are left-padded, decode
together with one KV cache, and a row that has ended (end token, stop string, token
limit) keeps its slot until the batch ends; its later tokens are not kept.
"""
from __future__ import annotations

from typing import Sequence

import torch

#: The adapter name PEFT reads as "the base alone" in a mixed batch.
BASE = "__base__"


@torch.inference_mode()
def greedy_mixed(model, prompts: Sequence[list[int]], limits: Sequence[int], eos: Sequence[int], check,
                 adapter_names: Sequence[str], pad_id: int) -> list[list[int]]:
    """Greedy tokens of each prompt, row i through adapter ``adapter_names[i]`` of the PEFT ``model``.

    Args:
        model: a ``PeftModel`` holding every named adapter.
        prompts: token ids per row.
        limits: most new tokens per row.
        eos: end tokens (kept in the row's output as its last token).
        check: a :class:`~cycleqd.engine.drafted.StopCheck` (``done(row)``: a stop string was written).
        adapter_names: one per row; :data:`BASE` for the base.
        pad_id: the padding id (hidden by the attention mask).
    """
    from transformers import DynamicCache

    n = len(prompts)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    names = list(adapter_names)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True,
                adapter_names=names)
    generated: list[list[int]] = [[] for _ in range(n)]
    done = [limit <= 0 for limit in limits]
    stop = set(eos)
    for _ in range(max(limits, default=0)):
        token = out.logits[:, -1].float().argmax(-1)
        for i, t in enumerate(token.tolist()):
            if done[i]:
                continue
            generated[i].append(t)
            done[i] = t in stop or len(generated[i]) >= limits[i] or check.done(generated[i])
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
        position = position[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True, adapter_names=names)
    return generated
