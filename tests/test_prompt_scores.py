"""The server's prompt scores (echo with logprobs) in-process: they come from the prefill the
scheduler runs anyway (the model's forward calls are counted), and equal a transformers forward
on the same ids to 1e-4."""
import threading

import pytest
import torch
from tiny import hf_model, make_hf

from llama.generation import Generator
from server.engine import Engine, StepChannel
from server.scheduler import Job, Params, Scheduler

IDS = [5, 77, 140, 3, 250, 19, 60, 201, 33]


@pytest.fixture(scope="module")
def served(tmp_path_factory, dist1):
    path = make_hf(tmp_path_factory.mktemp("scores") / "gqa", "gqa")
    gen = Generator.build(path, dist1)
    engine = Engine(gen.model, {}, {}, None, max_batch=2, length=320)
    calls = []
    hook = gen.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    sched = Scheduler(engine, gen.tokenizer, StepChannel(), max_batch=2)
    sched.start()
    yield {"sched": sched, "calls": calls, "oracle": hf_model(path)}
    sched.stop()
    hook.remove()


def run(sched, ids, params) -> tuple:
    """Submit one job and wait for its end -> (job, events)."""
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        if event["type"] in ("done", "error"):
            done.set()

    job = Job(ids, params, emit)
    sched.submit(job)
    assert done.wait(120), events
    return job, events


def reference(model, ids) -> torch.Tensor:
    """[S-1] log p(ids[i] | ids[:i]) for i = 1..S-1 from transformers, and the [S-1, vocab]
    log-probabilities."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], -1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logprobs


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_prompt_scores_come_from_the_prefill(served, max_tokens):
    before = len(served["calls"])
    job, events = run(served["sched"], IDS, Params(max_tokens=max_tokens, temperature=0.0,
                                                   logprobs=3, prompt_logprobs=3))
    assert events[-1] == {"type": "done", "finish": "length"}
    assert len([e for e in events if e["type"] == "token"]) == max_tokens
    assert len(served["calls"]) - before == 1  # one forward: the prefill, nothing else
    want, full = reference(served["oracle"], IDS)
    got = torch.tensor([s[0] for s in job.prompt_logprobs])
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    for (logprob, top), row in zip(job.prompt_logprobs, full):
        values, tokens = row.topk(3)
        assert [t for t, _ in top] == tokens.tolist()  # most likely first, argmax included
        assert max(v for _, v in top) == pytest.approx(float(values[0]), abs=1e-4)
        assert logprob <= max(v for _, v in top) + 1e-6


def test_unscored_prefill_returns_no_prompt_scores(served):
    job, events = run(served["sched"], IDS, Params(max_tokens=2, temperature=0.0))
    assert job.prompt_logprobs is None
    assert len([e for e in events if e["type"] == "token"]) >= 1


def test_long_prompts_are_scored_in_chunks(served):
    from server.engine import SCORE_ROWS

    ids = torch.randint(3, 320, (SCORE_ROWS + 40,), generator=torch.Generator().manual_seed(2))
    ids = ids.tolist()  # logits of SCORE_ROWS positions at a time: two chunks
    job, _ = run(served["sched"], ids, Params(max_tokens=0, prompt_logprobs=1))
    want, _ = reference(served["oracle"], ids)
    got = torch.tensor([s[0] for s in job.prompt_logprobs])
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
