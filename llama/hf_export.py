"""Any checkpoint llama.checkpoint reads (a Meta dir, a Hugging Face dir, a .gguf) -> a Hugging
Face folder that transformers and vLLM load:

    python -m llama.convert SRC DST --to hf [--dtype float32|float16|bfloat16] [--overwrite]

DST gets config.json (LlamaForCausalLM), model.safetensors, generation_config.json (the end ids),
and the tokenizer: tokenizer.json + tokenizer_config.json (with the chat template). A GGUF's
byte-level BPE vocabulary, merges and pre-tokenizer pattern become a `tokenizers` BPE; a source dir
with a tokenizer.json has it copied. Weights go from Meta's interleaved rotary layout to Hugging
Face's rotate-half rows (q and k; ../shared/FACTS.md "Hugging Face layout"); tied embeddings
(equal tok_embeddings and output) write no lm_head.
"""
import json
import os
import shutil
import tempfile

import torch

from .checkpoint import check_weights, declared_end_ids, open_source
from .errors import LlamaError
from .layout import DTYPES
from .model import ModelArgs

HF_OF_META = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def rotate_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n_heads * head_dim, dim] q or k rows, Meta's interleaved pairs -> Hugging Face's
    rotate-half halves (transformers' convert_llama_weights_to_hf permutation)."""
    dim = w.shape[1]
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def hf_name(meta: str) -> str:
    """A Meta weight name -> its Hugging Face name."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight",
           "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if meta in top:
        return top[meta]
    _, layer, rest = meta.split(".", 2)
    return f"model.layers.{layer}.{HF_OF_META[rest[:-len('.weight')]]}.weight"


def hf_config(args: ModelArgs, dtype: torch.dtype, tied: bool, bos, eos) -> dict:
    """config.json of a LlamaForCausalLM, rope spelled as hub Llama 3.x configs spell it."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": tied, "torch_dtype": DTYPE_NAMES[dtype],
        "bos_token_id": bos, "eos_token_id": eos,
    }
    if args.use_scaled_rope:
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": args.rope_scale_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_context}
    return cfg


def gguf_tokenizer(path: str, out_dir: str) -> dict:
    """Write tokenizer.json + tokenizer_config.json for a GGUF's byte-level BPE; returns the
    tokenizer facts: bos_id (None when none is added), eos_id."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from .gguf import field, open_gguf
    from .tokenizer import BOS_PRE, PRE_PATTERNS

    reader = open_gguf(path)
    if field(reader, "tokenizer.ggml.model", path) != "gpt2":
        raise LlamaError(f"{path}: only a byte-level BPE ('gpt2') tokenizer converts to "
                         "tokenizer.json")
    pre = field(reader, "tokenizer.ggml.pre", path, "")
    if pre not in PRE_PATTERNS:
        raise LlamaError(f"{path}: unknown pre-tokenizer {pre!r}: known are "
                         f"{', '.join(PRE_PATTERNS)}")
    tokens = field(reader, "tokenizer.ggml.tokens", path)
    types = field(reader, "tokenizer.ggml.token_type", path)
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", path, [])]
    bos = int(field(reader, "tokenizer.ggml.bos_token_id", path, -1))
    eos = int(field(reader, "tokenizer.ggml.eos_token_id", path, -1))
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", path, pre in BOS_PRE))
    template = field(reader, "tokenizer.chat_template", path, "")
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    # tiktoken's reading (llama.tokenizer): the pattern splits, then bytes map to GPT-2's alphabet
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_PATTERNS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([t for t, typ in zip(tokens, types) if typ != 1])
    add_bos = add_bos and 0 <= bos < len(tokens)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)])
    tk.save(os.path.join(out_dir, "tokenizer.json"))
    text = lambda i: tokens[i] if 0 <= i < len(tokens) else None  # noqa: E731
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": text(bos),
              "eos_token": text(eos), "add_bos_token": add_bos, "model_max_length": 1 << 30,
              "clean_up_tokenization_spaces": False}
    if template:
        config["chat_template"] = template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1, ensure_ascii=False)
    return {"bos_id": bos if add_bos else None, "eos_id": eos if eos >= 0 else None}


def copy_tokenizer(src_dir: str, out_dir: str) -> dict:
    """Copy a Hugging Face tokenizer (tokenizer.json and the files beside it); its bos and eos."""
    from .tokenizer import load_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    tok = load_tokenizer(os.path.join(out_dir, "tokenizer.json"))
    return {"bos_id": tok.bos_id, "eos_id": tok.eos_id}


def export_hf(src, dst, dtype: str = "float32", overwrite: bool = False):
    """Write SRC as a Hugging Face LlamaForCausalLM folder DST (see the module docstring).

    Raises LlamaError: an unknown dtype, DST inside SRC, DST holding something else without
    `overwrite`, or a source the checkpoint loader refuses.
    """
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise LlamaError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
    weights, kind, tok_path = open_source(str(src), DTYPES[dtype])
    path = os.path.abspath(os.fspath(src))
    dst = os.path.abspath(os.fspath(dst))
    if dst == path or dst.startswith(path + os.sep):
        raise LlamaError(f"{dst}: the destination cannot be the source or inside it")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        if not os.path.isfile(os.path.join(dst, "config.json")):
            raise LlamaError(f"{dst} exists and is not a Hugging Face model: choose another "
                             "destination")
        if not overwrite:
            raise LlamaError(f"{dst} holds another model; pass --overwrite to replace it")
    args = weights.args
    check_weights(weights, args, kind)
    sd = {}
    for name in sorted(weights.shapes):
        w = weights.read(name).to(DTYPES[dtype])
        if name.endswith("attention.wq.weight"):
            w = rotate_half_rows(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = rotate_half_rows(w, args.kv_heads)
        sd[hf_name(name)] = w.contiguous().clone()
    tok_dirs = [d for d in (path if os.path.isdir(path) else None,
                            os.path.dirname(tok_path) if tok_path else None) if d]
    tied = torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    if tied:
        del sd["lm_head.weight"]
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)
        if kind == "gguf":
            tok = gguf_tokenizer(path, tmp)
        elif any(os.path.isfile(os.path.join(d, "tokenizer.json")) for d in tok_dirs):
            tok = copy_tokenizer(next(d for d in tok_dirs
                                      if os.path.isfile(os.path.join(d, "tokenizer.json"))), tmp)
        else:
            tok = {"bos_id": None, "eos_id": None}
            print(f"{src}: no tokenizer.json beside it; DST has no tokenizer (give vLLM "
                  "--tokenizer, or convert from the GGUF / Hugging Face source)")
        ends = [i for i in [tok["eos_id"]] if i is not None]
        ends += [i for i in declared_end_ids(path) if i not in ends]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(args, DTYPES[dtype], tied, tok["bos_id"],
                                ends[0] if ends else None), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": tok["bos_id"],
                       "eos_token_id": ends if len(ends) != 1 else ends[0]}, f, indent=2)
        if os.path.exists(dst):  # replaced only now that the new one is complete
            old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=parent)
            os.rename(dst, os.path.join(old, "model"))
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{dst}: {kind} {src} -> Hugging Face LlamaForCausalLM, {dtype}"
          + (", tied embeddings" if tied else ""))
