"""A tiny random Gemma 3 model and byte-level tokenizer, built in-process (no download).

Fast tests and CI exercise every code path on this model; only tests marked `slow` touch the real
embedded model. It is a real Gemma3ForCausalLM (sliding + full attention layers, tied embeddings),
so architecture-specific code paths are the same ones the embedded model takes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import LoadedModel

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def tiny_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def tiny_config(layers: int = 4, hidden: int = 64, vocab: int | None = None) -> object:
    from transformers import Gemma3TextConfig

    vocab = vocab or (len(SPECIALS) + 256)
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    return Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=32,
                            max_position_embeddings=4096, layer_types=types, pad_token_id=0, eos_token_id=1,
                            bos_token_id=2, tie_word_embeddings=True)


def tiny_model(layers: int = 4, hidden: int = 64, seed: int = 0) -> LoadedModel:
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(tiny_config(layers, hidden)).eval()
    model.requires_grad_(False)
    return LoadedModel.from_objects(model, tiny_tokenizer(), name=f"tiny-gemma3-{layers}x{hidden}")


def save_tiny_model(directory: Path, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny model as a HuggingFace directory (for --model PATH and subprocess tests)."""
    lm = tiny_model(layers, hidden, seed)
    directory.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(directory, safe_serialization=True)
    lm.tokenizer.save_pretrained(directory)
    return directory
