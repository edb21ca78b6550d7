"""The pieces of bench/gpu_check.py: the table of known GPUs' peaks, timing that waits for the
device, tiny checkpoints, comparisons, and a Llama-3.1-8B-shaped model shared with transformers.
Run under torchrun it is gpu_check's model-parallel worker:

    torchrun --standalone --nproc_per_node N bench/gpu_parts.py OUT MODEL DEVICE DTYPE
"""
import csv
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

# Dense bfloat16 tensor-core TFLOP/s and memory TB/s from NVIDIA's datasheets (the sparse figures
# are twice these). Matched in order against torch.cuda.get_device_name: the first substring
# found wins, so more specific names come first.
PEAKS = [
    ("H200 NVL", 835.0, 4.8), ("H200", 989.0, 4.8),
    ("H100 NVL", 835.0, 3.9), ("H100 PCIe", 756.0, 2.0), ("H100", 989.0, 3.35),
    ("A100-SXM4-80GB", 312.0, 2.039), ("A100 80GB PCIe", 312.0, 1.935),
    ("A100", 312.0, 1.555), ("L40S", 362.0, 0.864), ("L4", 121.0, 0.3),
]

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json) and the tiny stand-in --device cpu uses.
LLAMA31_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                  ffn_dim=14336, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                  rope_scale_factor=8.0, max_seq_len=131072)
TINY_8B = dict(LLAMA31_8B, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=2048,
               ffn_dim=896)
# A tiny grouped-query-attention checkpoint (Llama-3.2-like rope), in transformers' names.
TINY_GQA = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, intermediate_size=384, rms_norm_eps=1e-5,
                max_position_embeddings=131072, vocab_size=512,
                rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192))

PAIRS = [  # (statement stem, true ending, false ending)
    ("The city of Paris is in", " France.", " Spain."),
    ("The city of Tokyo is in", " Japan.", " Chile."),
    ("Water boils at sea level at", " 100 degrees Celsius.", " 40 degrees Celsius."),
    ("The largest planet in the solar system is", " Jupiter.", " Mercury."),
    ("Two plus two equals", " four.", " seven."),
    ("The chemical symbol for gold is", " Au.", " Fe."),
    ("The author of Hamlet is", " William Shakespeare.", " Jane Austen."),
    ("The Pacific is", " an ocean.", " a desert."),
]
GEN_PROMPTS = ["The history of the printing press begins", "Photosynthesis is the process by",
               "In mathematics, a prime number is", "Once upon a time, in a village,"]


def peak_for(name: str) -> Optional[Tuple[str, float, float]]:
    """(table entry, bfloat16 FLOP/s, memory bytes/s) of a device name, or None if unknown."""
    for key, tflops, tbps in PEAKS:
        if key in name:
            return key, tflops * 1e12, tbps * 1e12
    return None


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels: a CUDA call returns before its work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable, device: torch.device, repeats: int = 3):
    """(best wall seconds of `repeats` calls, the last result), the device synchronised before
    and after each call."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def reachable_rates(device: torch.device, dtype: torch.dtype, n: int, mib: int) -> dict:
    """What this device reaches in isolation: FLOP/s of an n x n x n matmul in `dtype` and bytes/s
    of a copy of `mib` MiB (read + write counted), each the best of 5 after a warm-up."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device,
                                                                       dtype=dtype)
    mm, _ = best_time(lambda: a @ b, device, 6)
    src = torch.empty(mib * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cp, _ = best_time(lambda: dst.copy_(src), device, 6)
    return {"matmul_flops_per_s": 2 * n ** 3 / mm, "copy_bytes_per_s": 2 * src.numel() / cp,
            "matmul_n": n, "copy_mib": mib}


# ---- tiny checkpoints and prompt files ----

def write_tokenizer(path: str) -> str:
    """A byte-level BPE tokenizer.json with no merges (<unk> <s> </s>, then the 256 bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    symbols = specials + pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({s: i for i, s in enumerate(symbols)}, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return os.path.join(path, "tokenizer.json")


def unit_scale(model) -> None:
    """Redraw a random transformers model's weights in place at unit scale (linear weights std
    1/sqrt(fan in), embeddings std 1, norms uniform in [0.5, 1.5]) from torch's global
    generator, so that its logits spread out and greedy picks are not near ties everywhere."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)


def make_tiny_gqa(path: str, seed: int = 0) -> str:
    """A random transformers LlamaForCausalLM (TINY_GQA) saved with safetensors and a byte-level
    tokenizer, its weights drawn at unit scale (unit_scale)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_GQA, bos_token_id=1, eos_token_id=2)).float()
    unit_scale(model)
    model.save_pretrained(path)
    write_tokenizer(path)
    return path


def write_pairs(path: str) -> str:
    """PAIRS as a contrast-pair prompt CSV (columns idx, plus_prompt, minus_prompt, label)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "plus_prompt", "minus_prompt", "label"])
        for i, (stem, yes, no) in enumerate(PAIRS):
            plus, minus = (yes, no) if i % 2 == 0 else (no, yes)
            w.writerow([i, stem + plus, stem + minus, int(i % 2 == 0)])
    return path


# ---- comparisons ----

def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref|| (Frobenius, float64)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def compare_caches(ref_dir: str, dev_dir: str) -> dict:
    """Two caches of the same prompts -> per layer relative error (both sides stacked) and the
    largest absolute difference of the zero-shot log-probabilities."""
    from activations.cache import ActivationCache

    ref, dev = ActivationCache(ref_dir), ActivationCache(dev_dir)
    per_layer = {}
    for layer in ref.layers:
        a = np.concatenate([ref.array(layer, s) for s in ref.sides])
        b = np.concatenate([dev.array(layer, s) for s in dev.sides])
        per_layer[int(layer)] = rel_error(b, a)
    lp = None
    if ref.logprobs is not None and dev.logprobs is not None:
        lp = float(np.abs(ref.logprobs - dev.logprobs).max())
    return {"rel_error": per_layer, "logprob_max_abs": lp}


def last_logits(model, ids: List[int]) -> torch.Tensor:
    """The float32 logits [vocab] after the token ids, on the CPU."""
    device = model.norm.weight.device
    out = model(torch.tensor([ids], device=device), layers=[], logits=True)
    return out["logits"][0, -1].float().cpu()


def compare_tokens(ref_model, dev_logits: Callable, prompt: List[int], ref: List[int],
                   dev: List[int], tol: float) -> dict:
    """Greedy tokens of one prompt: equal, or where they first differ with the reference's
    margin there (its logit of its own pick minus its logit of the device's pick), the device's
    margin the other way (dev_logits(context ids) -> its logits [vocab] after them), and the two
    models' logit error on that context. A divergence is a near
    tie when the logits agree within `tol` (relative) and the reference margin is within twice
    the largest logit difference: rounding can flip such a pick."""
    n = min(len(ref), len(dev))
    first = next((i for i in range(n) if ref[i] != dev[i]), None)
    if first is None and len(ref) == len(dev):
        return {"equal": True, "tokens": len(ref), "verdict": "equal"}
    if first is None:
        return {"equal": False, "tokens": n, "first_diff": n, "verdict": "length differs"}
    ctx = prompt + ref[:first]
    a, b = last_logits(ref_model, ctx), dev_logits(ctx)
    err = float((b - a).abs().max())
    rel = rel_error(b.numpy(), a.numpy())
    margin = float(a[ref[first]] - a[dev[first]])
    tie = rel <= tol and margin <= 2 * err
    return {"equal": False, "tokens": n, "first_diff": first, "ref_margin": margin,
            "dev_margin": float(b[dev[first]] - b[ref[first]]), "logit_max_abs": err,
            "logit_rel_error": rel, "verdict": "near tie" if tie else "MISMATCH"}


def greedy(model, tok, prompts: List[List[int]], new: int) -> List[List[int]]:
    """`new` greedy tokens per prompt (end tokens ignored), through llama.generation."""
    from llama.generation import Generator, Sampling

    gen = Generator(model, tok)
    gen.stop = []  # fixed length: both sides decode exactly `new` tokens
    return [ids for ids, _, _ in gen.generate(prompts, Sampling(max_gen_len=new))]


def steered_greedy(model, prompt: List[int], vectors: Dict[int, torch.Tensor],
                   multiplier: float, new: int) -> Tuple[List[int], List[torch.Tensor]]:
    """`new` greedy tokens after `prompt` (end tokens ignored) with llama.model.Steer's addition
    of multiplier x vectors[layer] at every position, each step a whole forward; and the logits
    [vocab] each token was picked from."""
    from llama.model import Steer

    steer = Steer(vectors=vectors, multiplier=multiplier)
    out, steps = [], []
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([prompt + out]), layers=[], logits=True,
                           prompt_len=torch.tensor([len(prompt)]), steer=steer)["logits"][0, -1]
            steps.append(logits.float())
            out.append(int(logits.argmax()))
    return out, steps


def first_difference(ref: List[int], steps: List[torch.Tensor], got: List[int],
                     tie: float) -> dict:
    """Another engine's greedy ids against the reference's (steps: the reference's logits at
    each of its tokens): equal, or where they first differ with the reference's logit margin
    there (its own pick minus the other's), a near tie when that margin is under `tie`."""
    n = min(len(ref), len(got))
    first = next((i for i in range(n) if ref[i] != got[i]), None)
    if first is None:
        return {"verdict": "equal" if len(ref) == len(got) else "length differs", "tokens": n}
    margin = float(steps[first][ref[first]] - steps[first][got[first]])
    return {"verdict": "near tie" if margin < tie else "MISMATCH", "tokens": n,
            "first_diff": first, "ref_margin": margin}


def vllm_ok(run: dict, layers: List[str]) -> bool:
    """One vLLM run passes: steering changed at least 3 of the 4 texts, each steered text is the
    native one up to a near tie, and every rank reported a push at every steered layer."""
    changed = sum(s != u for s, u in zip(run["steered"], run["plain"]))
    close = all(x["verdict"] in ("equal", "near tie") for x in run["against_native"])
    pushed = all(push and set(push) == set(layers) and all(v > 0 for v in push.values())
                 for ranks in run["push"] for push in ranks)
    return changed >= 3 and close and pushed and bool(run["push"])


# ---- the Llama-3.1-8B-shaped model, ours and transformers' on the same weights ----

def hf_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape["dim"], num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"],
        intermediate_size=shape["ffn_dim"], vocab_size=shape["vocab_size"],
        rms_norm_eps=shape["norm_eps"], max_position_embeddings=shape["max_seq_len"],
        rope_parameters=dict(rope_type="llama3", rope_theta=shape["rope_theta"],
                             factor=shape["rope_scale_factor"], low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def twin_models(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(ours, transformers') models of `shape` with the same random weights on `device`.
    transformers draws them (its own init, on the device); ours uses the very same tensors, but
    for wq and wk, whose rows are permuted back to Meta's interleaved rotary layout (copies):
    about 1.1x the weights' memory in all. Needs llama.dist.setup(mp=1) first."""
    from transformers import LlamaForCausalLM

    from llama.model import ModelArgs, Transformer

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(hf_config(shape))
        hf = hf.to(device=device, dtype=dtype).eval()
        args = ModelArgs(**shape)
        ours = Transformer(args)  # on the CPU, uninitialised: untouched pages, never copied
    finally:
        torch.set_default_dtype(prev)
    hd = args.head_dim
    names = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    parts = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(args.n_layers):
        for meta, hf_name in parts.items():
            names[f"layers.{i}.{meta}.weight"] = f"model.layers.{i}.{hf_name}.weight"
    theirs = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in list(ours.named_parameters()):
            w = theirs[names[name]].detach()
            if name.endswith(("wq.weight", "wk.weight")):  # rotate-half rows -> interleaved
                w = w.reshape(-1, 2, hd // 2, args.dim).transpose(1, 2).reshape(-1, args.dim)
                w = w.contiguous()
            if w.shape != p.shape:
                raise RuntimeError(f"{name}: transformers' {tuple(w.shape)} != {tuple(p.shape)}")
            owner, attr = name.rsplit(".", 1)  # a new parameter: the CPU one is never touched
            setattr(ours.get_submodule(owner), attr, torch.nn.Parameter(w, requires_grad=False))
    return ours.to(device).eval(), hf


def block_weights(model) -> Tuple[int, int]:
    """(elements of the blocks' matrices, elements of the output layer)."""
    blocks = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith("layers.") and p.dim() == 2)
    return blocks, model.output.weight.numel()


def prefill_flops(model, batch: int, seq: int) -> float:
    """FLOPs of `batch` rows of `seq` tokens through every block: 2 per block weight per token,
    plus causal attention, 4 x n_heads x head_dim per (query, earlier-or-same key) pair per
    block (the counting of bench/bench_extract.py; norms, rotary and softmax not counted)."""
    a = model.params
    blocks, _ = block_weights(model)
    pairs = batch * seq * (seq + 1) // 2
    return float(2 * blocks * batch * seq + 4 * a.n_heads * a.head_dim * pairs * a.n_layers)


def decode_bytes(model, batch: int, prompt: int, new: int) -> float:
    """Bytes a decode step must read, summed over steps 2..new (the first token comes from the
    prefill): every block matrix and the output layer once per step, plus the keys and values of
    the positions attended to. Embedding rows, norms and activations are not counted."""
    a = model.params
    blocks, out = block_weights(model)
    size = model.output.weight.element_size()
    kv_row = 2 * a.n_layers * a.kv_heads * a.head_dim * size  # one position's k and v
    total = 0.0
    for step in range(1, new):
        total += (blocks + out) * size + batch * (prompt + step) * kv_row
    return total


def hf_states(hf, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' last-position state of every layer [layers + 1, B, dim] (embedding, blocks;
    the last block's raw output taken by a hook, as HF's last hidden state is normed)."""
    raw = {}
    hook = hf.model.layers[-1].register_forward_hook(
        lambda m, i, o: raw.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.inference_mode():
            hs = hf(input_ids=tokens, output_hidden_states=True, logits_to_keep=1).hidden_states
    finally:
        hook.remove()
    return torch.stack([h[:, -1] for h in hs[:-1]] + [raw["h"][:, -1]]).float().cpu()


def our_states(model, tokens: torch.Tensor) -> torch.Tensor:
    """Our last-position state of every layer [layers + 1, B, dim]."""
    out = model(tokens, layers=range(model.params.n_layers + 1))
    return torch.stack([out[i][:, -1] for i in range(model.params.n_layers + 1)]).float().cpu()


def hf_greedy(hf, prompts: torch.Tensor, new: int) -> List[List[int]]:
    """transformers' `generate`, greedy, exactly `new` tokens per row (equal-length prompts)."""
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


# ---- the torchrun worker ----

def worker(out: str, model: str, device: str, dtype: str, new: str) -> None:
    """One rank: check the process group's collectives, load MODEL at model-parallel size = the
    world, and (rank 0) write the last-position states of every layer on the PAIRS prompts and
    `new` greedy tokens of GEN_PROMPTS to OUT/mp{world}.npz and .json, with the logits on
    the parent's context (OUT/mp1.json: its tokens) where its tokens first differ."""
    import torch.distributed as tdist

    from llama.checkpoint import load_model
    from llama.dist import setup, teardown
    from llama.tokenizer import load_tokenizer

    d = setup(mp=0, device=device)
    try:
        x = torch.full((4,), float(d.rank + 1), device=d.device)
        tdist.all_reduce(x)
        got = float(x[0])
        ids = torch.tensor([d.rank], device=d.device)
        tdist.broadcast(ids, 0)
        lm = load_model(model, d, dtype)
        tok = load_tokenizer(lm.tokenizer_path)
        states = our_states(lm.model, prompt_batch(tok, d.device))
        prompts = [tok.encode(p, bos=True) for p in GEN_PROMPTS]
        tokens = greedy(lm.model, tok, prompts, int(new))
        with open(os.path.join(out, "mp1.json")) as f:  # the parent's tokens at MP 1
            ref = json.load(f)
        logits = {}  # where this run first leaves MP 1's tokens: the logits on MP 1's context
        for i, (mine, theirs) in enumerate(zip(tokens, ref)):
            first = next((j for j, (x, y) in enumerate(zip(mine, theirs)) if x != y), None)
            if first is not None:
                logits[f"logits_{i}"] = last_logits(lm.model, prompts[i] + theirs[:first]).numpy()
        if d.is_main:
            want = d.world * (d.world + 1) / 2
            np.savez(os.path.join(out, f"mp{d.world}.npz"), states=states.numpy(), **logits)
            with open(os.path.join(out, f"mp{d.world}.json"), "w") as f:
                json.dump({"world": d.world, "mp": d.mp, "backend": tdist.get_backend(),
                           "all_reduce_ok": got == want, "broadcast_ok": int(ids[0]) == 0,
                           "tokens": tokens}, f)
    finally:
        teardown()


def prompt_batch(tok, device: torch.device) -> torch.Tensor:
    """The PAIRS statements (true side) as one right-padded batch, cut to the shortest: equal
    lengths, so the last position is every row's last real token."""
    rows = [tok.encode(stem + yes, bos=True) for stem, yes, _ in PAIRS]
    n = min(map(len, rows))
    return torch.tensor([r[:n] for r in rows], device=device)


def read_worker(out: str, world: int) -> Dict:
    """The worker's results: its JSON, "states" and "logits" {prompt: [vocab]} where it left the
    parent's tokens."""
    with open(os.path.join(out, f"mp{world}.json")) as f:
        res = json.load(f)
    arrays = np.load(os.path.join(out, f"mp{world}.npz"))
    res["states"] = arrays["states"]
    res["logits"] = {int(k.split("_")[1]): torch.from_numpy(arrays[k]) for k in arrays.files
                     if k.startswith("logits_")}
    return res


if __name__ == "__main__":
    worker(*sys.argv[1:])
