"""bench/gpu_check.py's vLLM part, run with the python of the venv that has vLLM (the .venv-vllm/
of `make setup-vllm`; gpu_check starts it in a subprocess):

    .venv-vllm/bin/python bench/gpu_vllm.py SPEC.json OUT.json

SPEC.json (written by gpu_check): {"hf": Hugging Face folder, "dtype", "tp": tensor parallel size,
"prompts": [[token ids]], "new": greedy tokens, "vectors": {layer: [dim floats]}, "multiplier",
"requests": throughput requests, "throughput_new": their tokens}, optionally "pp": pipeline
parallel size (default 1) and "probe": {"layer", "weight": [dim floats], "bias"}. vLLM (compiled,
prefix caching on) with this project's steering plugin (server/vllm_steer.py) wrapping the
vectors' layers (and the probe's): greedy ids of the prompts unsteered and steered, each steered
request's steering_push from every rank (collective_rpc llama_ccs_take: under pipeline
parallelism each stage reports its own layers), with a probe each steered request's probe scores
per position ("scores": [[position, score], ...], llama_ccs_scores merged over the ranks), then
`requests` requests of `throughput_new` greedy tokens sent at once, unsteered and every one
steered: completion tokens/s. OUT.json gets it all.
"""
import json
import os
import sys
import time


def generate(llm, prompts, new, vectors=None, multiplier=1.0, tag="r", probe=False):
    """Greedy ids per prompt (end tokens ignored) and the wall seconds; vectors: steer each;
    probe: read the probe at each steered request's tokens."""
    from vllm import SamplingParams

    from server.vllm_steer import cache_salt, request_args

    reqs, params = [], []
    for i, ids in enumerate(prompts):
        extra = None if vectors is None else request_args(vectors, multiplier, tag=f"{tag}-{i}",
                                                          probe=probe)
        reqs.append({"prompt_token_ids": ids,
                     **({"cache_salt": cache_salt(extra)} if extra else {})})
        params.append(SamplingParams(temperature=0, max_tokens=new, ignore_eos=True,
                                     extra_args=extra))
    t = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t


def main(spec_path: str, out_path: str):
    import torch
    import vllm
    from vllm import LLM

    from server.vllm_engine import merged_scores
    from server.vllm_steer import steering_config

    with open(spec_path) as f:
        spec = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    vectors = {int(k): torch.tensor(v) for k, v in spec["vectors"].items()}
    probe = spec.get("probe")
    t = time.perf_counter()
    llm = LLM(model=spec["hf"], dtype=spec["dtype"], tensor_parallel_size=spec["tp"],
              pipeline_parallel_size=spec.get("pp", 1), max_model_len=1024, seed=0,
              enable_prefix_caching=True,
              additional_config=steering_config(vectors, probe and probe["layer"]))
    res = {"tp": spec["tp"], "pp": spec.get("pp", 1), "vllm": vllm.__version__,
           "start_s": time.perf_counter() - t,
           "compiled": not llm.llm_engine.vllm_config.model_config.enforce_eager}
    if probe:
        llm.collective_rpc("llama_ccs_set_probe", args=(probe["weight"], probe["bias"]))
    prompts, new, m = spec["prompts"], spec["new"], spec["multiplier"]
    res["plain"], _ = generate(llm, prompts, new)
    res["steered"], _ = generate(llm, prompts, new, vectors, m, tag="steer", probe=bool(probe))
    tags = [f"steer-{i}" for i in range(len(prompts))]
    taken = llm.collective_rpc("llama_ccs_take", args=(tags,))  # one dict per rank
    res["push"] = [[(rank.get(tag) or {}).get("push") for rank in taken] for tag in tags]
    if probe:
        scores = merged_scores(llm.collective_rpc("llama_ccs_scores", args=(tags,)))
        res["scores"] = [scores.get(tag, []) for tag in tags]
    many = [prompts[i % len(prompts)] for i in range(spec["requests"])]
    for name, vecs in (("plain", None), ("steered", vectors)):
        ids, wall = generate(llm, many, spec["throughput_new"], vecs, m, tag="speed")
        res[f"{name}_tokens_per_s"] = sum(map(len, ids)) / wall
    llm.collective_rpc("llama_ccs_take", args=([f"speed-{i}" for i in range(len(many))],))
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
