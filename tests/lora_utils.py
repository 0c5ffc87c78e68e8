"""Random-weight LoRA adapters made with PEFT, their merged-weights references, and the tokenizer files a
locally made model directory needs, for tests."""
from __future__ import annotations

import os
import shutil

import torch


def make_adapter(base_dir: str, out_dir: str, r: int, targets: list[str], alpha: float | None = None, seed: int = 0,
                 b_scale: float = 1.0, **lora_kwargs) -> str:
    """A PEFT LoRA adapter with random A and non-zero random B (PEFT's init_lora_weights=False), saved to out_dir.
    Returns out_dir; the merged model is made by `merge`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=targets,
                        init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    if b_scale != 1.0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(b_scale)
    peft_model.save_pretrained(out_dir)
    return out_dir


def merge(base_dir: str, adapter_dir: str, out_dir: str) -> str:
    """The base model with the adapter merged into its weights (PEFT's merge_and_unload), as a model directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    copy_tokenizer(base_dir, out_dir)
    return out_dir


def copy_tokenizer(src_dir: str, dst_dir: str) -> None:
    """Copy a model directory's tokenizer files (and chat template) next to weights saved elsewhere."""
    for f in os.listdir(src_dir):
        if f.startswith(("tokenizer", "special_tokens")) or f == "chat_template.jinja":
            shutil.copy(os.path.join(src_dir, f), dst_dir)
