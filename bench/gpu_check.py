"""The one command to run on a first GPU: does the CUDA path compute what the CPU computes, do the
process groups work, and how close to the device's peak do extraction and decoding run.

    python bench/gpu_check.py [--device cuda] [--out DIR] [--dtype bfloat16] [--model GGUF]
        [--peak_tflops T --peak_tbps B]

(a) Extraction (activations.extract.run, every layer, last token, zero-shot log-probabilities)
on the
    device in --dtype against the CPU in float32, on SmolLM2-135M (--model) and on a tiny random
    grouped-query-attention checkpoint: relative error per layer, within TOLERANCE[dtype].
(b) Greedy generation (llama.generation) of 32 tokens on the device against the CPU: equal, or
    where they first differ, with the CPU's logit margin there (a near tie may flip).
(c) Process groups: the in-process group (nccl on CUDA, gloo on the CPU) at model-parallel size
    1, then a torchrun subprocess (bench/gpu_parts.py) at MP 2 when two GPUs are present (always on
    the CPU), else MP 1: collectives, states and tokens against the in-process MP 1 run.
(d) A Llama-3.1-8B-shaped model with random bfloat16 weights shared with transformers: extraction
    FLOP/s (every layer's last-position state) as a share of the device's bfloat16 peak, decode
    bytes/s as a share of its memory bandwidth, each side by side with transformers.
(e) vLLM (the .venv-vllm/ of `make setup-vllm`, --vllm_python; bench/gpu_vllm.py in a
    subprocess) at tensor parallel size 1, and 2 when two GPUs are present, float32, with this
    project's steering plugin: steered and unsteered greedy text differ, the steered text equals
    the native engine's (CPU float32) or first differs at a near tie (native logit margin <
    VLLM_TIE, the vLLM issue's rule), every rank reports steering_push, and a throughput line
    (64 requests of 64 tokens, unsteered and every one steered). Skipped with one line when the
    venv is absent, and on --device cpu unless --vllm yes (tests/on_vllm check vLLM on the CPU).
(f) Everything in DIR/gpu_check.md (and DIR/gpu_check.json; DIR/errors.txt for a failed part).

Peaks come from a table of known GPUs (bench/gpu_parts.PEAKS, by torch.cuda.get_device_name),
or --peak_tflops/--peak_tbps; an unknown device is reported against what it reaches in isolation
(a large matmul and a copy) only. --device cpu uses tiny shapes everywhere (gloo, float32) and
runs in about a minute: the test suite runs it so that this file cannot rot. Exit status 0 when
every check passes, 1 when one fails (the report says which), 2 for bad flags.
"""
import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

try:
    import numpy as np
    import torch

    import gpu_parts as parts
    from llama.errors import LlamaError, cli
    from llama.layout import DTYPES
except ImportError as e:  # the project or a dependency is not installed: what to run
    raise SystemExit(f"error: {e}: run `pip install -r requirements-dev.txt` in the llama-ccs "
                     "clone's root folder") from None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Largest relative error per layer accepted against the float32 CPU result. bfloat16 keeps 8
# significant bits (unit roundoff 2^-8 = 3.9e-3); each block rounds its weights, activations and
# residual sum, so the error grows with depth. Measured with bfloat16 on the CPU against float32:
# 1.4e-3 at SmolLM2's embedding growing to 1.9e-2 at its block 30, 1.1e-2 at the tiny model's
# last block; 5e-2 leaves 2.5x room for other kernels. float32 on another device differs only
# in summation order (1e-4 is far above that, far below a bug).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
NEW_TOKENS = 32
VLLM_TIE = 1e-3  # the largest native logit margin at which vLLM may pick the other token
VLLM_PYTHON = os.path.join(ROOT, ".venv-vllm", "bin", "python")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every command of the project
        raise LlamaError(message)


def flags(argv):
    ap = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--device", default="cuda", help="cuda or cpu (tiny shapes, gloo)")
    ap.add_argument("--out", default="gpu_check", help="folder for the report")
    ap.add_argument("--dtype", default=None,
                    help="device compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--model", default=None,
                    help="the real model for (a) and (b) (default: SmolLM2-135M's GGUF)")
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="the device's dense bfloat16 TFLOP/s, overriding the table")
    ap.add_argument("--peak_tbps", type=float, default=None,
                    help="the device's memory bandwidth in TB/s, overriding the table")
    ap.add_argument("--vllm", default="auto", choices=("auto", "yes", "no"),
                    help="(e), the vLLM part: auto runs it on cuda when --vllm_python exists")
    ap.add_argument("--vllm_python", default=VLLM_PYTHON,
                    help="the python of the venv with vLLM (make setup-vllm: .venv-vllm/)")
    a = ap.parse_args(argv)
    try:  # (a), (b) and (d) compare against transformers: a dependency of the tests' set-up
        import transformers  # noqa: F401
    except ImportError:
        raise LlamaError("bench/gpu_check.py compares against transformers, which is not "
                         "installed: run `pip install -r requirements-dev.txt` (or `make "
                         "setup-dev`) first") from None
    if a.device not in ("cuda", "cpu"):
        raise LlamaError(f"--device {a.device!r}: cuda or cpu")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise LlamaError("--device cuda: torch sees no CUDA device (--device cpu runs the "
                         "tiny-shape check)")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    if a.dtype not in TOLERANCE:
        raise LlamaError(f"--dtype {a.dtype!r}: {', '.join(TOLERANCE)}")
    for name in ("peak_tflops", "peak_tbps"):
        v = getattr(a, name)
        if v is not None and not v > 0:
            raise LlamaError(f"--{name} {v}: must be positive")
    if a.model is not None and not os.path.exists(a.model):
        raise LlamaError(f"--model {a.model}: no such file or folder")
    if a.vllm == "yes" and not os.path.isfile(a.vllm_python):
        raise LlamaError(f"--vllm yes: {a.vllm_python} not found (`make setup-vllm` builds "
                         ".venv-vllm/; or give --vllm_python)")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise LlamaError(f"--out {a.out}: exists and is not a folder")
    return a


def guarded(name, fn, errors):
    """fn() -> its result, or {"error": one line} with the traceback kept for errors.txt: a part
    that fails must not cost the others their figures."""
    t, cpu = time.perf_counter(), time.process_time()
    try:
        res = fn()
    except Exception as e:  # noqa: BLE001: reported, never hidden
        errors.append(f"== {name}\n{traceback.format_exc()}")
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    res["seconds"] = round(time.perf_counter() - t, 1)
    res["cpu_seconds"] = round(time.process_time() - cpu, 1)
    failed = f" ({res['error']})" if "error" in res else ""
    print(f"{name}: done in {res['seconds']} s (CPU {res['cpu_seconds']} s){failed}", flush=True)
    return res


def device_info(a, d) -> dict:
    if d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device)
        props = torch.cuda.get_device_properties(d.device)
        info = {"name": name, "count": torch.cuda.device_count(),
                "memory_gib": props.total_memory / 2 ** 30, "cuda": torch.version.cuda}
        rates = parts.reachable_rates(d.device, torch.bfloat16, 8192, 2048)
    else:
        info = {"name": platform.processor() or platform.machine() or "cpu",
                "count": 1, "threads": torch.get_num_threads()}
        rates = parts.reachable_rates(d.device, torch.float32, 512, 64)
    entry = parts.peak_for(info["name"]) if d.device.type == "cuda" else None
    info["peak_source"] = entry[0] if entry else "unknown"
    info["peak_flops"] = entry[1] if entry else None
    info["peak_bytes_per_s"] = entry[2] if entry else None
    if a.peak_tflops:
        info["peak_flops"], info["peak_source"] = a.peak_tflops * 1e12, "--peak_tflops"
    if a.peak_tbps:
        info["peak_bytes_per_s"] = a.peak_tbps * 1e12
        info["peak_source"] += " / --peak_tbps" if a.peak_tflops else "--peak_tbps"
    info.update(rates, torch=torch.__version__, backend=torch.distributed.get_backend())
    return info


def check_model(name, path, a, d, tmp) -> dict:
    """(a) and (b) on one checkpoint: the CPU float32 run against the device run."""
    from llama.checkpoint import load_model
    from activations.extract import Extraction, run
    from llama.tokenizer import load_tokenizer

    cpu = dataclasses.replace(d, device=torch.device("cpu"))
    ref = load_model(path, cpu, "float32")
    dev = load_model(path, d, a.dtype)
    data = parts.write_pairs(os.path.join(tmp, "pairs.csv"))
    out = {}
    for side, lm, device in (("cpu", ref, "cpu"), ("dev", dev, a.device)):
        out[side] = os.path.join(tmp, f"{name}-{side}")
        run(Extraction(str(path), data, out[side], layers="all", zero_shot=True, device=device,
                       overwrite=True, commit_every=1e9), lm)
    res = {"model": str(path), "layers": ref.args.n_layers, "dim": ref.args.dim,
           "heads": f"{ref.args.n_heads}/{ref.args.kv_heads}", "pairs": len(parts.PAIRS)}
    res.update(parts.compare_caches(out["cpu"], out["dev"]))
    worst = max(res["rel_error"].values())
    res["worst_rel_error"], res["tolerance"] = worst, TOLERANCE[a.dtype]
    res["extraction_ok"] = worst <= TOLERANCE[a.dtype]
    tok = load_tokenizer(ref.tokenizer_path)
    prompts = [tok.encode(p, bos=True) for p in parts.GEN_PROMPTS]
    ref_ids = parts.greedy(ref.model, tok, prompts, NEW_TOKENS)
    dev_ids = parts.greedy(dev.model, tok, prompts, NEW_TOKENS)
    res["generation"] = [
        parts.compare_tokens(ref.model, lambda ids: parts.last_logits(dev.model, ids), p, r, g,
                             TOLERANCE[a.dtype]) for p, r, g in zip(prompts, ref_ids, dev_ids)]
    res["generation_ok"] = all(g["verdict"] in ("equal", "near tie") for g in res["generation"])
    return res


def check_groups(a, d, tiny, tmp) -> dict:
    """(c): the in-process group at MP 1, then torchrun at MP 2 (MP 1 with one GPU)."""
    import torch.distributed as tdist

    from llama.checkpoint import load_model
    from llama.tokenizer import load_tokenizer

    x = torch.ones(3, device=d.device)
    tdist.all_reduce(x)
    res = {"mp1_backend": tdist.get_backend(), "mp1_world": tdist.get_world_size(),
           "mp1_all_reduce_ok": bool((x == tdist.get_world_size()).all())}
    lm = load_model(tiny, d, a.dtype)
    tok = load_tokenizer(lm.tokenizer_path)
    states = parts.our_states(lm.model, parts.prompt_batch(tok, d.device)).numpy()
    prompts = [tok.encode(p, bos=True) for p in parts.GEN_PROMPTS]
    tokens = parts.greedy(lm.model, tok, prompts, NEW_TOKENS)
    world = 2 if a.device == "cpu" or torch.cuda.device_count() >= 2 else 1
    out = os.path.join(tmp, "torchrun")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "mp1.json"), "w") as f:
        json.dump(tokens, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), os.path.join(HERE, "gpu_parts.py"), out, tiny, a.device, a.dtype,
           str(NEW_TOKENS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    res.update(torchrun_world=world, torchrun_s=round(time.perf_counter() - t, 1),
               torchrun_exit=p.returncode)
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-20:]
        raise RuntimeError(f"torchrun MP {world} exited {p.returncode}: " + " | ".join(tail))
    got = parts.read_worker(out, world)
    res.update(torchrun_backend=got["backend"], torchrun_all_reduce_ok=got["all_reduce_ok"],
               torchrun_broadcast_ok=got["broadcast_ok"])
    res["rel_error"] = {i: parts.rel_error(got["states"][i], states[i])
                        for i in range(len(states))}
    res["worst_rel_error"], res["tolerance"] = max(res["rel_error"].values()), TOLERANCE[a.dtype]
    res["generation"] = [
        parts.compare_tokens(lm.model, lambda ids, i=i: got["logits"][i], prompts[i], tokens[i],
                             got["tokens"][i], TOLERANCE[a.dtype]) for i in range(len(prompts))]
    res["ok"] = (res["mp1_all_reduce_ok"] and got["all_reduce_ok"] and got["broadcast_ok"]
                 and res["worst_rel_error"] <= TOLERANCE[a.dtype]
                 and all(g["verdict"] in ("equal", "near tie") for g in res["generation"]))
    return res


def check_speed(a, d, tmp) -> dict:
    """(d): the 8B-shaped twins, extraction FLOP/s and decode bytes/s, ours and transformers'."""
    from llama.tokenizer import load_tokenizer

    cuda = d.device.type == "cuda"
    shape = parts.LLAMA31_8B if cuda else parts.TINY_8B
    dtype = torch.bfloat16 if cuda else DTYPES[a.dtype]
    batch, seq = (8, 512) if cuda else (4, 64)
    prompt, new = (128, 64) if cuda else (32, 16)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d.device)
    t = time.perf_counter()
    ours, hf = parts.twin_models(shape, d.device, dtype)
    res = {"shape": {k: shape[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                           "ffn_dim", "vocab_size")},
           "dtype": str(dtype).replace("torch.", ""), "build_s": time.perf_counter() - t,
           "tolerance": TOLERANCE[str(dtype).replace("torch.", "")],
           "params": sum(p.numel() for p in ours.parameters())}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, shape["vocab_size"], (batch, seq), generator=g).to(d.device)
    parts.our_states(ours, tokens[:1, :16]), parts.hf_states(hf, tokens[:1, :16])  # warm-up
    ours_s, mine = parts.best_time(lambda: parts.our_states(ours, tokens), d.device)
    hf_s, theirs = parts.best_time(lambda: parts.hf_states(hf, tokens), d.device)
    flops = parts.prefill_flops(ours, batch, seq)
    res["extract"] = {"batch": batch, "seq": seq, "flops": flops, "ours_s": ours_s,
                      "hf_s": hf_s, "ours_flops_per_s": flops / ours_s,
                      "hf_flops_per_s": flops / hf_s,
                      "rel_error_vs_hf": max(parts.rel_error(mine[i], theirs[i])
                                             for i in range(len(mine)))}
    tok = load_tokenizer(parts.write_tokenizer(os.path.join(tmp, "tokenizer")))
    res["decode"] = []
    for rows in (1, 8) if cuda else (1, 4):
        ids = torch.randint(3, shape["vocab_size"], (rows, prompt), generator=g)
        lists, on_dev = ids.tolist(), ids.to(d.device)
        parts.greedy(ours, tok, lists, 2), parts.hf_greedy(hf, on_dev, 2)  # warm-up
        times = {}
        for who, fn in (("ours", lambda n: parts.greedy(ours, tok, lists, n)),
                        ("hf", lambda n: parts.hf_greedy(hf, on_dev, n))):
            one, _ = parts.best_time(lambda: fn(1), d.device, 2)
            full, out = parts.best_time(lambda: fn(new), d.device, 2)
            times[who] = (max(full - one, 1e-9), out)  # the decode steps, prefill left out
        moved = parts.decode_bytes(ours, rows, prompt, new)
        res["decode"].append({
            "batch": rows, "prompt": prompt, "new": new, "bytes": moved,
            "ours_s": times["ours"][0], "hf_s": times["hf"][0],
            "ours_bytes_per_s": moved / times["ours"][0], "hf_bytes_per_s": moved / times["hf"][0],
            "ours_tokens_per_s": rows * (new - 1) / times["ours"][0],
            "hf_tokens_per_s": rows * (new - 1) / times["hf"][0],
            "rows_agree": sum(x == y for x, y in zip(times["ours"][1], times["hf"][1]))})
    if cuda:
        res["max_memory_gib"] = torch.cuda.max_memory_allocated(d.device) / 2 ** 30
    del ours, hf
    return res


def vllm_skipped(a):
    """Why (e) does not run, in one line, or None when it does."""
    if a.vllm == "no":
        return "vLLM part skipped: --vllm no"
    if a.vllm == "auto" and a.device != "cuda":
        return ("vLLM part skipped on --device cpu (tests/on_vllm check vLLM on the CPU; "
                "--vllm yes runs it here)")
    if not os.path.isfile(a.vllm_python):
        return (f"vLLM part skipped: {a.vllm_python} not found (`make setup-vllm` builds "
                ".venv-vllm/, or give --vllm_python)")
    return None


def check_vllm(a, d, model, tmp) -> dict:
    """(e): vLLM at TP 1 (and 2 with two GPUs) against the native engine, steered."""
    from llama.checkpoint import load_model
    from llama.tokenizer import load_tokenizer

    hf = os.path.join(tmp, "vllm-hf")
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "llama.convert", model, hf, "--to", "hf"], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=900)
    ref = load_model(model, dataclasses.replace(d, device=torch.device("cpu")), "float32")
    tok = load_tokenizer(ref.tokenizer_path)
    prompts = [tok.encode(p, bos=True) for p in parts.GEN_PROMPTS]
    g = torch.Generator().manual_seed(1)
    vectors = {}
    for layer in (10, 20):
        v = torch.randn(ref.args.dim, generator=g)
        vectors[layer] = v / v.norm() * 40
    native = [parts.steered_greedy(ref.model, p, vectors, 1.0, NEW_TOKENS) for p in prompts]
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    res = {"tie": VLLM_TIE, "runs": {}}
    for tp in (1, 2) if gpus >= 2 else (1,):
        spec = {"hf": hf, "dtype": "float32", "tp": tp, "prompts": prompts, "new": NEW_TOKENS,
                "vectors": {str(k): v.tolist() for k, v in vectors.items()}, "multiplier": 1.0,
                "requests": 64, "throughput_new": 64}
        paths = [os.path.join(tmp, f"vllm-tp{tp}.{x}.json") for x in ("spec", "out")]
        with open(paths[0], "w") as f:
            json.dump(spec, f)
        p = subprocess.run([a.vllm_python, os.path.join(HERE, "gpu_vllm.py"), *paths],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if p.returncode:
            tail = (p.stderr or p.stdout).strip().splitlines()[-20:]
            raise RuntimeError(f"vLLM at TP {tp} exited {p.returncode}: " + " | ".join(tail))
        with open(paths[1]) as f:
            got = json.load(f)
        got["against_native"] = [parts.first_difference(ids, steps, mine, VLLM_TIE)
                                 for (ids, steps), mine in zip(native, got["steered"])]
        got["ok"] = parts.vllm_ok(got, [str(x) for x in vectors])
        res["runs"][str(tp)] = got
    return res


def main(argv=None) -> int:
    a = flags(argv)
    from llama.dist import setup, teardown

    os.makedirs(a.out, exist_ok=True)
    errors, started, cpu = [], time.perf_counter(), time.process_time()
    d = setup(mp=1, device=a.device)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            res = {"command": "python bench/gpu_check.py " + " ".join(argv or sys.argv[1:]),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "dtype": a.dtype, "device": a.device}
            res["info"] = guarded("device", lambda: device_info(a, d), errors)
            tiny = parts.make_tiny_gqa(os.path.join(tmp, "tiny-gqa"))
            res["models"] = {}
            model = a.model
            if model is None:
                try:
                    from llama.gguf import default_model_path

                    model = str(default_model_path())
                except LlamaError as e:
                    res["models"]["SmolLM2-135M"] = {"error": f"not run: {e}"}
            if model is not None:
                res["models"]["SmolLM2-135M" if a.model is None else os.path.basename(model)] = \
                    guarded("SmolLM2", lambda: check_model("real", model, a, d, tmp), errors)
            res["models"]["tiny GQA"] = guarded(
                "tiny GQA", lambda: check_model("tiny", tiny, a, d, tmp), errors)
            res["groups"] = guarded("process groups", lambda: check_groups(a, d, tiny, tmp),
                                    errors)
            res["speed"] = guarded("8B-shaped speed", lambda: check_speed(a, d, tmp),
                                   errors)
            skipped = vllm_skipped(a)
            if skipped or model is None:
                res["vllm"] = {"skipped": skipped or "vLLM part skipped: no SmolLM2 model"}
                print(res["vllm"]["skipped"], flush=True)
            else:
                res["vllm"] = guarded("vLLM", lambda: check_vllm(a, d, model, tmp), errors)
    finally:
        teardown()
    res["seconds"] = round(time.perf_counter() - started, 1)
    res["cpu_seconds"] = round(time.process_time() - cpu, 1)
    from gpu_report import verdicts, write_report

    res["verdicts"] = verdicts(res)
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    path = write_report(res, a.out)
    err_file = os.path.join(a.out, "errors.txt")
    if errors:
        with open(err_file, "w") as f:
            f.write("\n".join(errors))
    elif os.path.exists(err_file):
        os.remove(err_file)
    ok = all(v == "pass" for _, v in res["verdicts"])
    print(f"{path}: {'every check passes' if ok else 'some checks FAIL'} "
          f"({res['seconds']} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(cli(main))
