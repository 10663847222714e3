"""A tiny random Llama "family" (base + one expert per task) on disk, for tests and examples."""
from __future__ import annotations

import string
from pathlib import Path

import torch

_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _save_char_tokenizer(path: Path, vocab_size: int) -> None:
    """A character-level WordLevel tokenizer that ``AutoTokenizer`` loads, with pad/bos/eos/unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + " .,:;()[]=+-*/_'\"\n<>!?#")
    tokens = _SPECIALS + chars
    tokens = tokens[:vocab_size]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(path))


def make_tiny_family(
    root: Path,
    tasks: tuple[str, ...] = ("a", "b", "c"),
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    vocab: int = 64,
    tie_embeddings: bool = False,
) -> dict[str, Path]:
    """Save a random tiny LlamaForCausalLM base and one perturbed "expert" per task.

    Each expert is base + a structured perturbation per weight (a rank-2 term plus
    small noise, about 10% of the weight's norm), so task vectors have a clear
    low-rank structure like real fine-tunes. Returns {"base": path, task: path, ...}.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base = LlamaForCausalLM(config).float()
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    _save_char_tokenizer(paths["base"], vocab)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    for task in tasks:
        expert = LlamaForCausalLM(config).float()
        sd = {}
        for name, w in base_sd.items():
            if w.ndim == 2:
                rows, cols = w.shape
                lo = torch.randn(rows, 2, generator=gen) @ torch.randn(2, cols, generator=gen)
                delta = lo / lo.norm() + 0.3 * torch.randn(rows, cols, generator=gen) / (rows * cols) ** 0.5
            else:
                delta = torch.randn(w.shape, generator=gen)
                delta = delta / delta.norm()
            sd[name] = w + 0.1 * w.norm() * delta / delta.norm()
        expert.load_state_dict(sd, strict=False)
        if tie_embeddings:
            expert.tie_weights()
        paths[task] = root / f"expert_{task}"
        expert.save_pretrained(paths[task])
        _save_char_tokenizer(paths[task], vocab)
    return paths


def make_lora_experts(
    base_dir: Path,
    root: Path,
    specs: dict[str, dict],
    seed: int = 0,
    merged: bool = True,
    magnitude: float = 0.2,
) -> dict[str, dict[str, Path]]:
    """PEFT LoRA adapters of ``base_dir`` with random A and B, and (``merged``) each merged into a full model.

    ``specs``: task -> LoraConfig keywords (``r``, ``lora_alpha``, ``target_modules``, ``use_rslora`` ...).
    Returns {task: {"adapter": folder, "merged": folder}}; B is random (not PEFT's zero init), so
    every adapter is a nonzero task vector of rank r on each module it targets.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = Path(root)
    out = {}
    gen = torch.Generator().manual_seed(seed)
    for task, spec in specs.items():
        model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **spec))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.copy_(magnitude * torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        paths = {"adapter": root / f"lora_{task}"}
        peft_model.save_pretrained(str(paths["adapter"]))
        if merged:
            paths["merged"] = root / f"merged_{task}"
            peft_model.merge_and_unload().save_pretrained(str(paths["merged"]))
        out[task] = paths
    return out
