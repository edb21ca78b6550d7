"""Tiny random checkpoints for tests: Hugging Face layout (made by transformers) and Meta layout.

    hf_dir = make_hf(tmp_path / "hf", "gqa")           # "mha" (Llama-2-like), "gqa"
                                                       # (Llama-3.2-like, rope llama3 factor 32),
                                                       # "tied" (tied embeddings); other
                                                       # families: "qwen2" (q/k/v biases, tied),
                                                       # "qwen3" (q/k norms, head_dim 24 != 64/4),
                                                       # "mistral" (sliding window WINDOW)
    args, sd = load_meta_state(hf_dir)                 # llama.checkpoint: Meta names, full tensors
    sd = meta_state(hf_model(hf_dir))                  # the same, written here independently
    meta_dir = make_meta(tmp_path / "meta", sd, args, shards=2, tokenizer_from=hf_dir)
    model = hf_model(hf_dir)                           # the transformers oracle (float32, eval)
"""
import json
import os
import shutil

import torch

VOCAB = 320  # model vocabulary; the tokenizer has TOKENIZER_VOCAB <= VOCAB entries
SPECIALS = ["<unk>", "<s>", "</s>"]
TOKENIZER_VOCAB = len(SPECIALS) + 256

CONFIGS = {
    "mha": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=172, rms_norm_eps=1e-5, rope_theta=10000.0),
    "gqa": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=192, rms_norm_eps=1e-5, max_position_embeddings=131072,
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                     low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "tied": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=160, rms_norm_eps=1e-5, rope_theta=100000.0,
                 tie_word_embeddings=True),
}
WINDOW = 96  # the tiny Mistral's sliding window, in tokens
FAMILY_CONFIGS = {  # model_type -> config (2 layers, dim 64, 4 heads, 2 kv heads)
    "qwen2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=160, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, intermediate_size=160, rms_norm_eps=1e-6,
                  rope_theta=1000000.0),
    "mistral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=160, rms_norm_eps=1e-5,
                    rope_theta=10000.0, sliding_window=WINDOW),
}
FAMILIES = tuple(FAMILY_CONFIGS)


def make_tokenizer(path, vocab=None, extra=(), config=None):
    """A byte-level BPE tokenizer.json with no merges: <unk> <s> </s> and the 256 byte symbols,
    then `extra` special tokens (a chat format's markers), plus filler tokens up to `vocab`
    entries when given; `config` replaces tokenizer_config.json's content. Returns the file
    path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # sorted: alphabet() comes in a different order in each process, and with it every token id
    symbols = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + list(extra)
    symbols += [f"<extra_{i}>" for i in range((vocab or 0) - len(symbols))]
    tok = Tokenizer(models.BPE({s: i for i, s in enumerate(symbols)}, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS + list(extra))
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, "tokenizer.json")
    tok.save(file)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config or {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return file


def make_hf(path, kind="mha", seed=0, vocab=VOCAB, hub_style=False):
    """A random transformers causal LM (LLaMA for the CONFIGS kinds, else the FAMILY_CONFIGS
    family) saved with safetensors and a tokenizer.json. Norm weights are drawn from [0.5, 1.5]
    and biases from [-0.5, 0.5], so a loader that drops or mixes them up cannot match. hub_style
    rewrites config.json the way hub Llama 3.x configs spell rope (rope_theta + rope_scaling)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    family = kind if kind in FAMILY_CONFIGS else "llama"
    settings = FAMILY_CONFIGS.get(kind) or CONFIGS[kind]
    cfg = AutoConfig.for_model(family, **{"max_position_embeddings": 4096, **settings},
                               vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    path = str(path)
    model.save_pretrained(path)
    make_tokenizer(path)
    if hub_style:
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            c["rope_scaling"] = rope
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
    return path


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_states(model, tokens, attention_mask=None):
    """transformers' per-layer states in our convention: {0: embeddings, i: raw output of block i}
    (HF's last hidden state is after the final norm, so the last block's is taken by a hook), and
    logits."""
    raw = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, i, o: raw.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            out = model(tokens, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        hook.remove()
    states = dict(enumerate(out.hidden_states[:-1]))
    states[len(out.hidden_states) - 1] = raw["h"]
    states["logits"] = out.logits
    return states


def meta_state(model):
    """A transformers causal LM's weights (LLaMA, Qwen2, Qwen3, Mistral) in Meta's names and
    interleaved rotary layout, written here independently of llama.checkpoint (which the tests
    check against it): q/k weights, q/k biases and q/k norm weights all follow the rows' order."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "self_attn.q_norm": "attention.q_norm",
             "self_attn.k_norm": "attention.k_norm",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    rotary = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.q_norm", "self_attn.k_norm")
    sd = {"tok_embeddings.weight": model.model.embed_tokens.weight,
          "norm.weight": model.model.norm.weight, "output.weight": model.lm_head.weight}
    for i, layer in enumerate(model.model.layers):
        for hf, meta in names.items():
            module = layer
            for part in hf.split("."):  # q/k norms: Qwen3 only
                module = getattr(module, part, None)
            if module is None:
                continue
            for kind in ("weight", "bias"):
                w = getattr(module, kind, None)
                if w is None:
                    continue
                if hf in rotary:  # rotate-half rows (per head) back to interleaved pairs
                    shape = w.shape
                    w = w.reshape(-1, 2, hd // 2, *shape[1:]).transpose(1, 2).reshape(shape)
                sd[f"layers.{i}.{meta}.{kind}"] = w
    return {k: v.detach().clone() for k, v in sd.items()}


def make_meta(path, full_sd, args, shards=1, tokenizer_from=None):
    """A Meta-layout dir: consolidated.NN.pth (the full state dict split for `shards` ranks),
    params.json and, when given, the tokenizer files copied from `tokenizer_from`."""
    from llama.checkpoint import meta_params, shard_state_dict

    path = str(path)
    os.makedirs(path, exist_ok=True)
    for r in range(shards):
        torch.save(shard_state_dict(full_sd, args, shards, r),
                   os.path.join(path, f"consolidated.{r:02d}.pth"))
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(meta_params(args), f)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            src = os.path.join(str(tokenizer_from), name)
            if os.path.exists(src):
                shutil.copy(src, path)
    return path


def tokens(n_rows=2, length=12, seed=1, vocab=TOKENIZER_VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n_rows, length), generator=g)
