"""Weight loading: GGUF conversion matches transformers' own GGUF reader; caching; sharded safetensors."""
from __future__ import annotations

import glob
import os

import torch

from kestrel.model.loader import embedded_model_path, resolve_model_dir
from kestrel.model.model_config import ModelConfig


def test_gguf_conversion_equals_transformers_gguf_loader(embedded_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).state_dict()
    ours = load_file(os.path.join(embedded_dir, "model.safetensors"))
    assert len(ours) > 200
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name


def test_conversion_is_cached(embedded_dir):
    weights = os.path.join(embedded_dir, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert resolve_model_dir(None) == embedded_dir
    assert resolve_model_dir(embedded_model_path()) == embedded_dir
    assert os.stat(weights).st_mtime_ns == before


def test_a_wrongly_converted_tokenizer_is_refused(tokenizer):
    """The converted tokenizer's EOS is the file's (im_end), and a tokenizer whose EOS disagrees with the GGUF
    metadata (what transformers 5.17 built) is refused with the fix, not served."""
    import pytest

    from kestrel.model.gguf_convert import check_tokenizer

    assert tokenizer.eos_token == "<|im_end|>"
    check_tokenizer(tokenizer, {"eos_token_id": tokenizer.eos_token_id})
    with pytest.raises(ValueError, match=r"converted this GGUF file's tokenizer wrongly.*transformers>=5\.18"):
        check_tokenizer(tokenizer, {"eos_token_id": tokenizer.eos_token_id + 1})


def test_the_direct_tokenizer_load_is_autotokenizers_tokenizer(embedded_dir, tokenizer):
    """load_tokenizer skips AutoTokenizer where the config names the generic fast class: same class, same ids."""
    from kestrel.model.loader import chat_template_ids, load_tokenizer
    fast = load_tokenizer(embedded_dir)
    assert type(fast) is type(tokenizer)
    text = "Name a colour, then spell it backwards:\n\t  naïve café, 東京, 12345 <|im_end|> done"
    assert fast.encode(text) == tokenizer.encode(text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert chat_template_ids(fast, messages) == chat_template_ids(tokenizer, messages)
    assert fast.all_special_ids == tokenizer.all_special_ids and fast.eos_token_id == tokenizer.eos_token_id
    assert fast.decode(fast.encode(text)) == tokenizer.decode(tokenizer.encode(text))


def test_embedded_config(embedded_dir):
    cfg = ModelConfig.from_dir(embedded_dir)
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0


def test_sharded_checkpoints_load(tiny_llama_dir, tiny_qwen2_dir):
    assert len(glob.glob(os.path.join(tiny_llama_dir, "*.safetensors"))) > 1
    cfg = ModelConfig.from_dir(tiny_qwen2_dir)
    assert cfg.architecture == "qwen2" and cfg.qkv_bias


def test_unsupported_architecture(tmp_path):
    import json
    import pytest
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported model architecture"):
        ModelConfig.from_dir(str(tmp_path))
