"""A tiny random LLaMA (2 layers, hidden 64, GQA, tied embeddings) with a real byte-level BPE
tokenizer: the LLM tests exercise the real export, quantization and planning code on it in
seconds, without the 135M model."""
from __future__ import annotations

from pathlib import Path

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 4


def tiny_llama(folder: Path, seed: int = 0, layers: int = 2, massive_channel: float | None = None) -> Path:
    """Write a Hugging Face folder (safetensors + tokenizer). ``massive_channel``: scale one
    hidden channel of every down_proj input's producer so it carries outlier activations, as
    real LLaMA-class models do."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([TEXT] * 4, tr)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():   # larger weights than the 0.02 init: logits that mean something
            if p.ndim == 2:
                p.mul_(4.0)
        if massive_channel:
            for layer in model.model.layers:
                layer.mlp.up_proj.weight[3].mul_(massive_channel)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder
