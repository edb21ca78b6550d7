"""bench/bench_serve.py's "offline" configuration: vLLM's engine alone, no HTTP, run with the
python of the venv that has vLLM (bench_serve starts it in a subprocess):

    .venv-vllm/bin/python bench/vllm_offline.py HF_DIR MAX_SEQS

It loads HF_DIR as plain vLLM does in bench_serve (float32, compiled, prefix caching on, seed 0,
MAX_SEQS sequences at most, no plugin: VLLM_PLUGINS="" in its environment), prints the line
`ready`, then answers each line of standard input, a JSON object {"prompts": [text, ...],
"new": tokens, "waves": k}, with one JSON line {"tokens": completion tokens, "wall_s": seconds}:
k times all the prompts at once through LLM.generate (greedy, end tokens ignored), one wave after
the other, as k requests per client from len(prompts) clients. This is the ceiling of any server
on vLLM's engine with these settings on this machine: the same forward passes with no HTTP, no
server process, no clients. An empty line or the end of input stops it.
"""
import json
import os
import sys
import time


def answer(llm, order: dict) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=int(order["new"]), ignore_eos=True)
    tokens = 0
    start = time.perf_counter()
    for _ in range(int(order["waves"])):
        outs = llm.generate(order["prompts"], params, use_tqdm=False)
        tokens += sum(len(out.outputs[0].token_ids) for out in outs)
    return {"tokens": tokens, "wall_s": time.perf_counter() - start}


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: vllm_offline.py HF_DIR MAX_SEQS")
    replies = os.fdopen(os.dup(1), "w")  # the answers; vLLM's own output goes to stderr
    os.dup2(2, 1)
    from vllm import LLM

    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=2048,
              max_num_seqs=int(sys.argv[2]), seed=0, enable_prefix_caching=True)
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print(json.dumps(answer(llm, json.loads(line))), file=replies, flush=True)


if __name__ == "__main__":
    main()
