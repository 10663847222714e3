"""Training the mini world's tiny Llama models: a plain, deterministic next-token loop.

The loss covers only the answer line (and the end-of-text token): prompts are
templated specs, and the point is to learn the mapping from spec to answer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm.auto import tqdm

from cycleqd.mini.items import MiniItem

if TYPE_CHECKING:  # transformers' model classes load in seconds: only a build needs them
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelShape:
    """Size of a mini Llama."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 344
    max_positions: int = 160


@dataclass(frozen=True)
class TrainSpec:
    """One training phase: AdamW with linear warm-up then cosine decay to 10% of ``lr``."""

    steps: int
    lr: float
    batch_size: int = 32
    warmup: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0


def new_model(tokenizer: PreTrainedTokenizerBase, shape: ModelShape, seed: int) -> LlamaForCausalLM:
    """A freshly initialised LlamaForCausalLM for ``tokenizer``'s vocabulary (deterministic in ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config).float()


def encode_batch(
    items: Sequence[MiniItem], tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) with labels -100 on prompt and padding."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([it.prompt for it in items])["input_ids"]
    fulls = tokenizer([it.text for it in items])["input_ids"]
    width = max(len(f) for f in fulls) + 1
    ids = torch.full((len(items), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, f) in enumerate(zip(prompts, fulls)):
        seq = f + [eos]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(seq[len(p) :])
    return ids, mask, labels


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[MiniItem],
    spec: TrainSpec,
    *,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on ``items`` (``spec.steps * spec.batch_size`` of them, in order).

    Returns the loss of every step. Raises ValueError if there are too few items.
    """
    need = spec.steps * spec.batch_size
    if len(items) < need:
        raise ValueError(f"{desc}: {len(items)} items for {spec.steps} steps of {spec.batch_size}")
    torch.manual_seed(spec.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    warm = max(1, int(spec.warmup * spec.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return spec.lr * (step + 1) / warm
        t = (step - warm) / max(1, spec.steps - warm)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    losses: list[float] = []
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        batch = items[step * spec.batch_size : (step + 1) * spec.batch_size]
        ids, mask, labels = encode_batch(batch, tokenizer)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
