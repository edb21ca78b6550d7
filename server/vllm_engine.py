"""The vLLM engine behind the server's routes: `llama-ccs serve --engine vllm`.

    sched = VllmScheduler(engine_args, tokenizer, vectors)   # a thread holding vLLM's AsyncLLM
    sched.start(); sched.ready.wait()
    sched.submit(job)                # the same Job and events as server/scheduler.Scheduler

The engine boundary: the routes (server/app.py) hand a checked request to a scheduler as a Job
and read its events back ({"type": "token" | "done" | "error"}); `Scheduler` (the native engine)
and `VllmScheduler` implement the same methods (submit, load, stop, is_alive, halt, error), so a
route or a request field is written once. Here each Job becomes one AsyncLLM request: its prompt
ids (with a cache_salt when steered: server/vllm_steer.cache_salt), its sampling settings, and its
steering as SamplingParams.extra_args (server/vllm_steer.request_args: the vectors as applied),
which the plugin adds inside vLLM's compiled model. Tokens come back one at a time and go through
Job.accept (stop strings, max_tokens, text held back) as on the native engine; the "done" event
carries steering_push, per layer, measured in the worker (vllm_steer.Steering.take). A Job's
prompt_logprobs (echo) come from vLLM's prompt_logprobs at the end of the prefill, put in the
native engine's layout (`prompt_scores`); max_tokens 0 asks vLLM for one token and drops it
(`scoring`). A steered request always asks for its sampled token's log-probability: vLLM samples
from NaN logits without a word, so a push that overflows is seen there and ends that request
alone with the native engine's error (`fail`); the plugin zeroes its KV-cache blocks
(vllm_steer.clear_nonfinite). Prompt forms, n and aliases are resolved before a Job is made
(server/schemas.py, server/app.py), the same for both engines.

Not on this engine yet (refused at start-up or with a 400 naming the field): probe read-outs,
steering at layer 0 (the embedding output), scale "residual" (it needs the residual norms the
native engine measures with its own model).
"""
import asyncio
import math
import secrets
import threading
from typing import Dict, List, Optional

import torch

from llama.generation import end_tokens

from .vllm_steer import cache_salt, request_args


# temperatures below this are greedy, as llama.generation.pick makes them on the native engine
# (vLLM would raise them to 0.01 and sample); 1e-5 to 0.01 is refused (server/schemas.py)
GREEDY_BELOW = 1e-5


class VllmScheduler(threading.Thread):
    def __init__(self, engine_args, tokenizer, vectors: Dict[str, Dict[int, torch.Tensor]]):
        super().__init__(name="vllm", daemon=True)
        self.engine_args = engine_args
        self.tokenizer = tokenizer
        self.vectors = vectors
        self.stop_ids = end_tokens(tokenizer)
        self.halt = threading.Event()
        self.ready = threading.Event()
        self.error: Optional[str] = None
        self.on_error = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.engine = None
        self.running = 0
        self.dropped = 0

    # ------------------------------------------------------------------ called from HTTP side
    def submit(self, job):
        if self.loop is None or self.halt.is_set():
            job.emit({"type": "error", "status": 503, "param": None,
                      "message": self.error or "the server is shutting down"})
            return
        asyncio.run_coroutine_threadsafe(self._serve(job), self.loop)

    def load(self) -> dict:
        return {"running": self.running, "waiting": 0, "dropped": self.dropped}

    def stop(self, timeout: Optional[float] = None):
        """Stop the engine (its requests end); wait for the thread (at most `timeout` s)."""
        self.halt.set()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self.is_alive():
            self.join(timeout=60 if timeout is None else timeout)

    # ------------------------------------------------------------------ the engine's thread
    def run(self):
        from vllm.v1.engine.async_llm import AsyncLLM

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.engine = AsyncLLM.from_engine_args(self.engine_args)
            self.ready.set()
            self.loop.run_forever()
        except Exception as e:
            self.error = f"the vLLM engine stopped: {type(e).__name__}: {e}"
        finally:
            self.halt.set()
            self.ready.set()
            if self.engine is not None:
                self.engine.shutdown()
            if self.error and self.on_error is not None:
                self.on_error()

    def params(self, job, tag: str):
        """vLLM's SamplingParams for a Job (greedy at temperature 0, as the native engine)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = job.params
        extra = None
        if p.steer is not None and p.steer.multiplier != 0:
            s = p.steer
            vecs = {x: self.vectors[s.vector][x] for x in s.layers}
            extra = request_args(vecs, s.multiplier, s.ablate, s.positions, tag=tag)
        greedy = p.temperature < GREEDY_BELOW
        return SamplingParams(
            temperature=0.0 if greedy else p.temperature,
            top_p=1.0 if greedy else p.top_p, seed=p.seed,
            ignore_eos=True, stop_token_ids=[] if p.ignore_eos else self.stop_ids,
            extra_args=extra, output_kind=RequestOutputKind.DELTA,
            **scoring(p, extra is not None)), extra

    async def _serve(self, job):
        tag = "ccs-" + secrets.token_hex(8)
        params, extra = self.params(job, tag)
        prompt = {"prompt_token_ids": job.prompt_ids}
        if extra is not None:
            prompt["cache_salt"] = cache_salt(extra)
        self.running += 1
        try:
            async for out in self.engine.generate(prompt, params, tag):
                if job.cancelled.is_set():
                    self.dropped += 1
                    await self.engine.abort(tag)
                    return
                if out.prompt_logprobs is not None and job.prompt_logprobs is None:
                    job.prompt_logprobs = prompt_scores(out.prompt_logprobs, job.prompt_ids,
                                                        job.params.prompt_logprobs)
                done = self._tokens(job, out.outputs[0])
                if done:
                    await self.engine.abort(tag)
                    break
            if job.finish is None:  # vLLM ended it first: its max_tokens is the job's
                job.finish = "length"
            push = None
            if extra is not None:
                taken = await self.engine.collective_rpc("llama_ccs_take", args=([tag],))
                got = [t[tag] for t in taken if t.get(tag)]
                push = got[0]["push"] if got else {}
            if job.finish == "error":  # its error event is sent
                return
            event = {"type": "done", "finish": job.finish}
            if extra is not None:
                event["steering_push"] = push
            job.emit(event)
        except Exception as e:
            job.emit({"type": "error", "status": 500, "param": None,
                      "message": f"the vLLM engine failed: {type(e).__name__}: {e}"})
        finally:
            job.done = True
            self.running -= 1

    def _tokens(self, job, completion) -> bool:
        """Feed a delta's tokens through Job.accept; True once the job has finished (an end
        token, max_tokens, a stop string, non-finite logits; max_tokens 0: the prompt scored,
        the one token vLLM generates dropped)."""
        lps = completion.logprobs or [None] * len(completion.token_ids)
        for token, lp in zip(completion.token_ids, lps):
            if lp is not None and not math.isfinite(lp[token].logprob):
                fail(job, f"non-finite logits at step {len(job.ids) + 1}")
                return True
            if job.params.max_tokens == 0:
                job.finish = "length"
                return True
            if token in self.stop_ids and not job.params.ignore_eos:
                job.finish = "stop"
                rest = job.flush()
                if rest:
                    job.emit(rest)
                return True
            logprob, top = None, None
            if lp is not None and job.params.logprobs is not None:
                logprob = float(lp[token].logprob)
                ranked = sorted(lp.items(), key=lambda kv: -kv[1].logprob)
                top = [(int(t), float(v.logprob)) for t, v in ranked
                       if v.rank is not None and v.rank <= job.params.logprobs]
                top = top[:job.params.logprobs] if job.params.logprobs > 0 else None
            job.emit(job.accept(token, logprob, top, self.tokenizer))
            if job.finish is not None:
                return True
        return False


def scoring(p, steered: bool) -> dict:
    """SamplingParams' max_tokens, logprobs and prompt_logprobs for a Job's Params. max_tokens 0
    (echo, the prompt scored only) asks vLLM for one token, which is dropped, as vLLM's own server
    does; a steered request always asks for the chosen token's log-probability, so that logits
    a push made non-finite end it (vLLM samples from NaN logits without a word); prompt scores
    are asked for with k >= 1, as Engine.score_prompt gives at least the most likely token."""
    logprobs = p.logprobs if p.logprobs is not None else (0 if steered else None)
    prompt = None if p.prompt_logprobs is None else max(p.prompt_logprobs, 1)
    return {"max_tokens": max(p.max_tokens, 1), "logprobs": logprobs, "prompt_logprobs": prompt}


def prompt_scores(scores, ids: List[int], top: int) -> List[list]:
    """vLLM's prompt_logprobs (per position: None, then {token: Logprob(logprob, rank)} holding
    the top k and the prompt's own token) -> Engine.score_prompt's layout: for positions 1..S-1,
    [log p(ids[i] | ids[:i]), [[token, logprob], ...] the max(top, 1) most likely, most likely
    first] (natural log of the softmax of the raw logits on both engines)."""
    k = max(top, 1)
    out = []
    for i in range(1, len(ids)):
        here = scores[i]
        ranked = sorted(((v.rank, int(t), float(v.logprob)) for t, v in here.items()
                         if v.rank is not None and v.rank <= k), key=lambda r: r[0])
        out.append([float(here[ids[i]].logprob), [[t, v] for _, t, v in ranked[:k]]])
    return out


def fail(job, message: str):
    """End a job with an error event, as the native scheduler does: 400 naming
    steering.multiplier when steered (the push overflowed), else 500."""
    if job.params.steer is not None:
        job.emit({"type": "error", "status": 400, "param": "steering.multiplier",
                  "message": f"{message}: the steering overflowed the model's numbers "
                             "(lower steering.multiplier)"})
    else:
        job.emit({"type": "error", "status": 500, "param": None, "message": message})
    job.finish = "error"


def engine_args(model: str, context: int, max_batch: int, tensor_parallel_size: int,
                dtype: str, layers: List[int]):
    """vLLM's AsyncEngineArgs for serve --engine vllm (the steered layers in additional_config,
    so the plugin wraps them)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from .vllm_steer import steering_config

    return AsyncEngineArgs(model=model, dtype=dtype, max_model_len=context,
                           max_num_seqs=max_batch, tensor_parallel_size=tensor_parallel_size,
                           seed=0, enable_prefix_caching=True,
                           additional_config=steering_config(layers) if layers else {})
