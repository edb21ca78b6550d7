"""Continuous batching: requests join the running decode batch as rows free up.

    sched = Scheduler(engine, tokenizer, channel, max_batch=8)
    sched.start()                       # a thread on rank 0
    sched.submit(job)                   # from the HTTP side; job.emit(event) reports back
    sched.stop()

Each turn of the loop: waiting jobs are admitted first come, first served while rows are free
(each prefilled on its own row: its prompt's keys and values, its first token); then one decode
step runs every row in use, each at its own position (one token each), and rows whose job ended
(an end token, max_tokens, a stop string, or a client that went away) are freed. Every running
row advances on every step, so a long request never holds the others back.

Tokens are picked per row by llama.generation.pick, the rule Generator uses (greedy at
temperature 0, else temperature and nucleus sampling; any temperature > 0 is safe) from the row's
own seeded generator, so a seeded request gives the same tokens whatever else shares its batch,
and what scripts/generate.py gives for that one prompt. A row whose logits are not finite (a
steering push that overflows the model's numbers) ends alone with an error event,
`non-finite logits at step N` as Generator says it; its keys and values are cleared when its row
is freed (Engine "free"), so nothing of it reaches the row's next request.

If the loop itself fails (a bug, a lost rank), every job it holds gets an error event, the other
ranks are told to stop with the error, and `on_error` is called (the server then exits non-zero).

A probe read-out scores each generated token's own hidden state, which exists once the token has
been fed back: a token's event waits one step for its score, and a row that ends by length or
stop string stays one more step to score its last token.
"""
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from llama.generation import end_tokens, pick

from steering.settings import SteerSettings

from .engine import Engine, StepChannel

IDLE_BEAT_S = 30.0  # an idle rank 0 tells the other ranks it is alive this often


def steer_json(settings: Optional[SteerSettings]) -> Optional[dict]:
    """A row's steering as a step carries it to every rank."""
    return None if settings is None else settings.to_json()


@dataclass
class Params:
    """One request's generation settings (validated by server/schemas.py)."""
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    logprobs: Optional[int] = None  # None: no log-probabilities; k: the chosen token's and top k
    probe: bool = False
    steer: Optional[SteerSettings] = None  # checked (steering/settings.py)
    ignore_eos: bool = False  # end tokens are generated like any other (benchmarks)
    prompt_logprobs: Optional[int] = None  # k: score the prompt's tokens, top k (echo); max_tokens
    # may then be 0 (the prompt is scored, nothing generated)


def nonfinite_error(job, message: str) -> dict:
    """The error event of a job whose logits turned non-finite (both engines): 400 naming
    steering.multiplier when steered (the push overflowed the model's numbers), else 500."""
    if job.params.steer is not None:
        return {"type": "error", "status": 400, "param": "steering.multiplier",
                "message": f"{message}: the steering overflowed the model's numbers "
                           "(lower steering.multiplier)"}
    return {"type": "error", "status": 500, "param": None, "message": message}


class Job:
    """One request in the scheduler. Events passed to emit (from the scheduler thread):
    {"type": "token", "token": id, "text": new text (may be ""), "logprob", "top_logprobs",
     "probe"} per generated token; {"type": "done", "finish": "stop" | "length"} at the end
    (a steered job's also "steering_push": {layer: push}, Engine.push of the residual stream
    its own forwards met);
    {"type": "error", "message", "status", "param"} when it cannot go on (its logits turned
    non-finite: 400 naming steering.multiplier when steered, else 500; the server stops under
    it: 503)."""

    def __init__(self, prompt_ids: List[int], params: Params, emit: Callable[[dict], None],
                 streamed: bool = False):
        """streamed: its events are sent on as they come (server-sent events); otherwise only
        the whole answer is read, and an engine may hand its events over late (the vLLM engine
        fetches a probed job's scores once it has finished: vllm_engine.ProbeHold)."""
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.emit = emit
        self.streamed = streamed
        self.cancelled = threading.Event()
        self.ids: List[int] = []
        self.text = ""  # the completion so far, stop string cut
        self.sent = 0  # characters of text already in events
        self.finish: Optional[str] = None
        self.prompt_probe: Optional[float] = None
        self.prompt_logprobs: Optional[list] = None  # Engine.score_prompt's, when asked for
        self.probe_threshold = 0.0  # the probe's decision threshold (engine.Probe.threshold)
        self.pending: Optional[dict] = None  # a token event waiting for its probe score
        self.done = False  # its "done" event was sent
        self.steered: dict = {}  # layer -> [sum |h|, sum |h . u|, positions] (steering_push)
        seed = params.seed if params.seed is not None else int(time.time_ns() % (2 ** 31))
        self.gen = torch.Generator().manual_seed(seed)

    def accept(self, token: int, logprob, top, tokenizer) -> dict:
        """Add a sampled token (not an end token); returns its event (finish set when a stop
        string or max_tokens ends the job)."""
        self.ids.append(token)
        full = tokenizer.decode(self.ids)
        cut = [i for i in (full.find(s) for s in self.params.stop) if i >= 0]
        if cut:
            full, self.finish = full[: min(cut)], "stop"
        elif len(self.ids) >= self.params.max_tokens:
            self.finish = "length"
        self.text = full
        if self.finish is not None:
            ready = len(full)
        else:  # hold back a possible start of a stop string and an unfinished UTF-8 character
            hold = max([k for s in self.params.stop for k in range(1, len(s))
                        if full.endswith(s[:k])] + [0])
            ready = len(full) - hold
            while ready > self.sent and full[ready - 1] == "\ufffd":
                ready -= 1
        new = full[self.sent: ready] if ready > self.sent else ""
        self.sent = max(self.sent, ready)
        return {"type": "token", "token": token, "text": new, "logprob": logprob,
                "top_logprobs": top, "probe": None}

    def add_sums(self, sums: Optional[dict]):
        """Add one forward's residual-stream sums of this job's row (Engine.run's "steered")."""
        for layer, values in (sums or {}).items():
            have = self.steered.setdefault(layer, [0.0, 0.0, 0.0])
            for k, v in enumerate(values):
                have[k] += v

    def margins(self, scores: List[Optional[float]]) -> List[Optional[float]]:
        """Probe scores relative to the probe's decision threshold: score - threshold (> 0: the
        probe's positive class), the calibrated read-out the playground and the report colour."""
        return [None if s is None else s - self.probe_threshold for s in scores]

    def flush(self) -> Optional[dict]:
        """The text still held back when the job ends at an end token."""
        if self.sent < len(self.text):
            new, self.sent = self.text[self.sent:], len(self.text)
            return {"type": "token", "token": None, "text": new, "logprob": None,
                    "top_logprobs": None, "probe": None}
        return None


@dataclass
class Row:
    job: Job
    pos: int  # where the next fed token goes (tokens in the cache so far)
    token: int  # the token to feed next
    draining: bool = False  # finished; fed once more only to score its last token


class Scheduler(threading.Thread):
    def __init__(self, engine: Engine, tokenizer, channel: StepChannel, max_batch: int,
                 on_error: Optional[Callable[[], None]] = None):
        super().__init__(name="scheduler", daemon=True)
        self.on_error = on_error  # called (from this thread) when the loop fails
        self.engine = engine
        self.tokenizer = tokenizer
        self.channel = channel
        self.max_batch = max_batch
        self.stop_ids = end_tokens(tokenizer)
        self.waiting: "queue.Queue[Job]" = queue.Queue()
        self.rows: List[Row] = []
        self.halt = threading.Event()
        self.wake = threading.Event()  # set when a job arrives
        self.error: Optional[str] = None
        self.dropped = 0  # jobs whose client went away before they ended
        self.admitting: Optional[Job] = None  # off the queue, not yet in a row

    # ------------------------------------------------------------------ called from HTTP side
    def submit(self, job: Job):
        self.waiting.put(job)
        self.wake.set()

    def load(self) -> dict:
        return {"running": len(self.rows), "waiting": self.waiting.qsize(),
                "dropped": self.dropped}

    def stop(self, timeout: Optional[float] = None):
        """Stop after the current step; jobs still running or waiting get an error event; the
        other ranks are told to stop. timeout: seconds to wait for the loop (after a failure it
        may be stuck telling a rank that is itself stuck)."""
        self.halt.set()
        if self.is_alive():
            self.join(timeout)

    # ------------------------------------------------------------------ the loop
    def step(self, step: dict) -> Optional[dict]:
        self.channel.send(step)
        return self.engine.run(step)

    def run(self):
        last_beat = time.monotonic()
        try:
            while not self.halt.is_set():
                admitted = self._admit()
                if self.rows:
                    self._decode()
                elif not admitted:
                    if time.monotonic() - last_beat > IDLE_BEAT_S:
                        self.step({"op": "idle"})
                        last_beat = time.monotonic()
                    self.wake.wait(timeout=0.05)  # wait for work without spinning
                    self.wake.clear()
                    continue
                last_beat = time.monotonic()
        except Exception as e:  # a bug or a lost rank: fail the jobs, never hang their clients
            self.error = f"the scheduler stopped: {type(e).__name__}: {e}"
        finally:
            self._fail_all(self.error or "the server is shutting down")
            if self.error and self.on_error is not None:
                self.on_error()  # first: telling the other ranks can block (one may be stuck)
            try:
                self.channel.send({"op": "stop", "error": self.error})
            except Exception:
                pass  # another rank is gone already

    def _fail_all(self, message: str):
        jobs = [r.job for r in self.rows] + ([self.admitting] if self.admitting else [])
        self.rows, self.admitting = [], None
        while True:
            try:
                jobs.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        for job in jobs:
            if not job.done:
                job.emit({"type": "error", "message": message, "status": 503, "param": None})
                job.done = True

    def _admit(self) -> bool:
        admitted = False
        while len(self.rows) < self.max_batch:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                break
            if job.cancelled.is_set():
                self.dropped += 1
                continue
            admitted = True
            row = len(self.rows)
            self.admitting = job
            out = self.step({"op": "prefill", "row": row, "ids": job.prompt_ids,
                             "steer": steer_json(job.params.steer),
                             "score": job.params.prompt_logprobs})
            if job.params.probe:
                job.prompt_probe = self.engine.probe.score(out["states"])[0]
                job.probe_threshold = self.engine.probe.threshold
            job.prompt_logprobs = out.get("prompt")
            job.add_sums(out["steered"][0])
            self.rows.append(Row(job, len(job.prompt_ids), -1))
            self.admitting = None
            if job.params.max_tokens > 0:
                self._sample([(row, out["logits"][0:1])])
            elif not torch.isfinite(out["logits"]).all():  # scores of numbers gone past float32
                self._fail(job, "non-finite logits at step 1")
            else:  # the prompt scored, nothing to generate
                job.finish = "length"
                self._finish(job)
            self._free()
        return admitted

    def _decode(self):
        rows = self.rows
        out = self.step({"op": "decode", "tokens": [r.token for r in rows],
                         "pos": [r.pos for r in rows],
                         "plen": [len(r.job.prompt_ids) for r in rows],
                         "steer": [steer_json(r.job.params.steer) for r in rows]})
        scores = self.engine.probe.score(out["states"]) if out["states"] is not None else None
        live = []
        for i, r in enumerate(rows):
            r.pos += 1
            if not r.draining:  # a last token fed only to be scored: not one the request used
                r.job.add_sums(out["steered"][i])
            if r.job.pending is not None:  # the fed token's own state is now known
                r.job.pending["probe"] = scores[i]
                r.job.emit(r.job.pending)
                r.job.pending = None
            if r.draining:
                self._finish(r.job)
            else:
                live.append(i)
        self._sample([(i, out["logits"][i: i + 1]) for i in live])
        self._free()

    def _sample(self, rows: List[tuple]):
        """Pick the next token of each (row index, its logits [1, vocab])."""
        for i, row_logits in rows:
            r = self.rows[i]
            job, p = r.job, r.job.params
            token = int(pick(row_logits, p.temperature, p.top_p, job.gen)[0])
            if token < 0:
                self._fail(job, f"non-finite logits at step {len(job.ids) + 1}")
                continue
            if token in self.stop_ids and not p.ignore_eos:
                job.finish = "stop"
                rest = job.flush()
                if rest:
                    job.emit(rest)
                self._finish(job)
                continue
            logprob, top = None, None
            if p.logprobs is not None:
                lp = torch.log_softmax(row_logits[0], -1)
                logprob = float(lp[token])
                if p.logprobs > 0:
                    vals, ids = lp.topk(p.logprobs)
                    top = [(int(t), float(v)) for t, v in zip(ids, vals)]
            event = job.accept(token, logprob, top, self.tokenizer)
            r.token = token
            if p.probe:
                job.pending = event
                r.draining = job.finish is not None
            else:
                job.emit(event)
                if job.finish is not None:
                    self._finish(job)

    def _fail(self, job: Job, message: str):
        """End one job with an error event (its row is freed and cleared like any other)."""
        job.emit(nonfinite_error(job, message))
        job.finish, job.done = "error", True

    def _finish(self, job: Job):
        if job.finish is None:
            job.finish = "stop"
        event = {"type": "done", "finish": job.finish}
        if job.params.steer is not None:  # measured in the forwards that steered it
            event["steering_push"] = self.engine.push(job.params.steer.to_json(), job.steered)
        job.emit(event)
        job.done = True

    def _free(self):
        """Drop rows whose job is over (or whose client left): each freed row's keys and values
        are cleared and the last row moved into its place, so the rows in use stay 0..n-1."""
        for i in reversed(range(len(self.rows))):
            r = self.rows[i]
            if not (r.job.done or r.job.cancelled.is_set()):
                continue
            self.dropped += not r.job.done
            last = len(self.rows) - 1
            self.step({"op": "free", "row": i, "last": last})
            self.rows[i] = self.rows[last]
            self.rows.pop()
