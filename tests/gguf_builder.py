"""Write a Hugging Face Llama directory (the demo model) as a GGUF file the way llama.cpp's converter does.

`write_llama_gguf(model_dir, path, qtype=...)` writes llama.* hyper-parameters, the byte-level BPE tokenizer
as tokenizer.ggml.* (tokens, token types, merges, special ids, chat template) and the tensors under GGUF
names (token_embd, blk.N.attn_q/attn_k/attn_v/attn_output/attn_norm/ffn_gate/ffn_up/ffn_down/ffn_norm,
output_norm, output). Like `convert_hf_to_gguf.py` it permutes the rows of attn_q and attn_k from Hugging
Face's rotate-half RoPE layout to GGML's interleaved one (transformers undoes this when it loads a GGUF), keeps
1-D tensors (norms) in F32 and stores the 2-D ones in `qtype`. `architecture` overrides general.architecture
(and the key prefix), for files transformers cannot read; `omit` leaves tensors out.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize
from safetensors.numpy import load_file
from transformers import AutoTokenizer

# HF Llama module name -> GGUF tensor name (per layer, after "model.layers.N.").
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_FILE_TYPES = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
}


def permute_rope(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: per head, rows [first half | second half] -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def gguf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """The model's float32 tensors under GGUF names, Q and K permuted, in llama.cpp's order."""
    config = json.loads((model_dir / "config.json").read_text())
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]
    state = load_file(model_dir / "model.safetensors")
    out = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in _LAYER_NAMES.items():
            weights = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weights = permute_rope(weights, n_head, n_head)
            elif gguf_name == "attn_k":
                weights = permute_rope(weights, n_head, n_head_kv)
            out[f"blk.{layer}.{gguf_name}.weight"] = weights
    out["output_norm.weight"] = state["model.norm.weight"]
    if "lm_head.weight" in state and not config.get("tie_word_embeddings"):
        out["output.weight"] = state["lm_head.weight"]
    return {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in out.items()}


def write_llama_gguf(model_dir: Path, path: Path, *, qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
                     architecture: str = "llama", name: str = "sllmd demo", omit: Collection[str] = ()) -> Path:
    """Write `model_dir` (a Hugging Face Llama with a byte-level BPE tokenizer) to the GGUF file `path`, without the
    GGUF tensors named in `omit`."""
    model_dir, path = Path(model_dir), Path(path)
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())

    writer = GGUFWriter(path, architecture)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(_FILE_TYPES.get(qtype, LlamaFileType.GUESSED))

    specials = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if i in specials else TokenType.NORMAL for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(tokenizer.chat_template)

    for tensor_name, weights in gguf_tensors(model_dir).items():
        if tensor_name in omit:
            continue
        if weights.ndim == 1 or qtype == GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, weights)
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(tensor_name, weights.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, quantize(weights, qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
