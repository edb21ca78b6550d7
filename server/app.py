"""The HTTP routes (FastAPI): OpenAI's /v1/models, /v1/completions, /v1/chat/completions, plus
/v1/vectors and /health, and vLLM's /tokenizer_info, /tokenize and /detokenize
(server/tokenizer_api.py).

    app = build_app(Served(...))   # `router`'s routes; the Served in app.state

The routes are module-level functions on one APIRouter, as vLLM's OpenAI entrypoint has them; a
POST route's body is read here (size limit, JSON) and checked into its request model
(server/schemas.py: CompletionRequest, ChatRequest) by a dependency, so a bad field is a 400
naming it (never FastAPI's own 422). A checked request becomes a Job handed to the scheduler
thread;
its events come back through an asyncio queue. Streaming answers are server-sent events as
OpenAI sends them (`data: {chunk}` ... `data: [DONE]`); a client that goes away cancels its job,
which frees its row. Every route needs `Authorization: Bearer KEY` when the server has a key.
`/` is left free: a `server/static/` folder, when present, is served there.

`model` may name a steered alias (--alias, server/aliases.py): the request is steered as the
alias says, and /v1/models lists it. /v1/completions takes every prompt form, `n` and `echo`
(server/schemas.py); a whole (not streamed) completion is answered by `complete_many`, one job
per prompt and sample.

Text is text (llama.tokenizer.as_text): a completion prompt is marked as scripts/generate.py marks
it, and Tokenizer.render_chat marks every message's content, so a `<|im_end|>` a user types is the
tokens that spell it, and the chat template's own markers are the only special tokens.
"""
import asyncio
import dataclasses
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from . import completion, tokenizer_api
from .aliases import model_list
from .scheduler import Job, Scheduler
from .schemas import ApiError, ChatRequest, CompletionRequest, Limits, check_model

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


@dataclass
class Served:
    """What the routes serve."""
    scheduler: Scheduler
    tokenizer: object
    limits: Limits
    vectors_info: list  # GET /v1/vectors entries
    probe_info: Optional[dict]
    api_key: Optional[str] = None
    max_body: int = 1 << 20  # bytes
    read_timeout: float = 30.0  # seconds a request's body may take to arrive
    check_host: bool = False  # loopback only, no key: the Host header must name a loopback address


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_json(request: Request, limit: int, timeout: float = 30.0) -> dict:
    """The body as a JSON object, refused past `limit` bytes (413), when its Content-Type is not
    application/json (415: a web page's form or text/plain post cannot reach a route), when it
    takes over `timeout` seconds to arrive (408) or when it is not a JSON object (400)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"Content-Type {kind or 'missing'}: send application/json")
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s") from None
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


router = APIRouter()


def served_by(request: Request) -> Served:
    """The Served of the app handling `request` (build_app puts it in app.state)."""
    return request.app.state.served


async def completion_request(request: Request) -> CompletionRequest:
    served = served_by(request)
    body = await read_json(request, served.max_body, served.read_timeout)
    return CompletionRequest.check(body, served.limits, served.tokenizer)


async def chat_request(request: Request) -> ChatRequest:
    served = served_by(request)
    body = await read_json(request, served.max_body, served.read_timeout)
    return ChatRequest.check(body, served.limits, served.tokenizer)


@router.get("/health")
async def health(request: Request):
    """200 while the scheduler runs; 503 once it has stopped (a failure or a shutdown)."""
    sched = served_by(request).scheduler
    alive = sched.is_alive() and not sched.halt.is_set()
    return JSONResponse({"status": "ok" if alive else "stopped", **sched.load(),
                         "error": sched.error}, status_code=200 if alive else 503)


@router.get("/v1/models")
async def show_models(request: Request):
    """The served model, then each steered alias with its steering settings."""
    return {"object": "list", "data": model_list(served_by(request).limits)}


@router.get("/tokenizer_info")
async def show_tokenizer(request: Request):
    served = served_by(request)
    return tokenizer_api.tokenizer_info(served.tokenizer, served.limits)


@router.post("/tokenize")
async def tokenize(request: Request):
    served = served_by(request)
    body = await read_json(request, served.max_body, served.read_timeout)
    check_model(body, served.limits)  # a model it does not serve: 404
    return tokenizer_api.tokenize(body, served.tokenizer, served.limits)


@router.post("/detokenize")
async def detokenize(request: Request):
    served = served_by(request)
    body = await read_json(request, served.max_body, served.read_timeout)
    check_model(body, served.limits)
    return tokenizer_api.detokenize(body, served.tokenizer, served.limits.vocab)


@router.get("/v1/vectors")
async def show_vectors(request: Request):
    served = served_by(request)
    return {"object": "list", "data": served.vectors_info, "probe": served.probe_info,
            "conventions": CONVENTIONS}


@router.post("/v1/completions")
async def create_completion(request: Request,
                            body: CompletionRequest = Depends(completion_request)):
    if body.stream:  # one prompt, n = 1, no echo
        return await answer(request, body, chat=False)
    return await complete_many(request, body)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request, body: ChatRequest = Depends(chat_request)):
    return await answer(request, body, chat=True)


async def answer(request: Request, body, chat: bool):
    """Hand a checked request to the scheduler; its events become the response (whole, or
    server-sent events when streaming)."""
    served = served_by(request)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is closed: the server is gone

    job = Job(body.prompt_ids, body.params, emit, streamed=body.stream)
    if not served.scheduler.is_alive():
        raise ApiError(503, "the server is shutting down", kind="server_error")
    served.scheduler.submit(job)
    shape = Shape(chat, body.model, job, served.tokenizer)
    if body.stream:
        return StreamingResponse(stream_events(job, events, shape, body.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    watch = asyncio.ensure_future(watch_disconnect(request, job, events))
    try:
        while True:
            event = await events.get()
            if event["type"] == "gone":
                return JSONResponse({}, status_code=499)  # no one reads it
            if event["type"] == "error":
                raise event_error(event)
            shape.add(event)
            if event["type"] == "done":
                return shape.whole()
    finally:
        watch.cancel()
        job.cancelled.set()  # a no-op once done; frees the row if the handler was cancelled


async def watch_disconnect(request: Request, job: Job, events: asyncio.Queue):
    """Cancel the job (its row is freed at the next step) when the client of a whole (not
    streamed) answer goes away, and tell its handler ("gone"): the body is read, so the next
    message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            events.put_nowait({"type": "gone"})
            return


async def complete_many(request: Request, body: CompletionRequest):
    """A whole /v1/completions answer: one job per prompt and sample (choice i * n + j), all
    waited for; a client that leaves cancels them all. Sample j of a seeded request uses seed +
    j (n samples, not one repeated). With echo the prompt's text leads each choice's text and,
    with `logprobs`, the prompt's own scores lead its `logprobs` (each prompt's first sample
    scores it, in its prefill)."""
    served = served_by(request)
    plans = []
    for prompt, params in zip(body.prompts, body.settings):
        for j in range(body.n):
            seed = None if params.seed is None else params.seed + j
            plans.append((prompt, params if j == 0 else dataclasses.replace(
                params, seed=seed, prompt_logprobs=None)))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emitter(index):
        def emit(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:
                pass  # the event loop is closed: the server is gone
        return emit

    jobs = [Job(prompt.ids, params, emitter(k)) for k, (prompt, params) in enumerate(plans)]
    if not served.scheduler.is_alive():
        raise ApiError(503, "the server is shutting down", kind="server_error")
    shapes = [Shape(False, body.model, job, served.tokenizer) for job in jobs]
    for job in jobs:
        served.scheduler.submit(job)
    watch = asyncio.ensure_future(watch_disconnect_all(request, jobs, events))
    try:
        left = len(jobs)
        while left:
            k, event = await events.get()
            if event["type"] == "gone":
                return JSONResponse({}, status_code=499)  # no one reads it
            if event["type"] == "error":
                raise event_error(event)
            shapes[k].add(event)
            left -= event["type"] == "done"
    finally:
        watch.cancel()
        for job in jobs:
            job.cancelled.set()  # a no-op once done; frees the rows of an abandoned request
    return completion_object(shapes, plans, body, served.tokenizer)


async def watch_disconnect_all(request: Request, jobs: list, events: asyncio.Queue):
    """watch_disconnect for complete_many's jobs: all cancelled when the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
                job.cancelled.set()
            events.put_nowait((None, {"type": "gone"}))
            return


def completion_object(shapes: list, plans: list, body: CompletionRequest, tok) -> dict:
    """The text_completion object of complete_many's finished jobs."""
    choices = []
    for k, (shape, (prompt, _)) in enumerate(zip(shapes, plans)):
        choice = shape.whole()["choices"][0]
        choice["index"] = k
        if body.echo:
            first = shapes[k - k % body.n].job  # the sample that scored this prompt
            choice["text"] = prompt.text + choice["text"]
            choice["logprobs"] = completion.echo_logprobs(tok, prompt, first.prompt_logprobs,
                                                          choice["logprobs"])
        choices.append(choice)
    out = shapes[0]._envelope(choices, False)
    prompt_tokens = sum(len(prompt.ids) for prompt in body.prompts)
    generated = sum(len(shape.tokens) for shape in shapes)
    out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                    "total_tokens": prompt_tokens + generated}
    return out


async def api_error(request: Request, e: ApiError):
    return error_response(e)


async def http_error(request: Request, e: HTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: "
                                   f"{e.detail}", kind=kind))


LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_PATHS = ("/v1", "/health", "/tokenize", "/detokenize", "/tokenizer_info")  # behind the key


def host_name(header: str) -> str:
    """A Host header's name: "[::1]:8000" -> "::1", "localhost:8000" -> "localhost"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]")[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def guard(request: Request, call_next):
    """The Host check (a keyless loopback server answers only loopback names: DNS rebinding),
    the API key check, and a 500 JSON error (never a traceback) if a route fails."""
    served = served_by(request)
    if served.check_host and host_name(request.headers.get("host", "")) not in LOOPBACK:
        return error_response(ApiError(421, f"Host {request.headers.get('host', '')!r}: this "
                                       "server answers only loopback host names (127.0.0.1, "
                                       "localhost, [::1])", code="misdirected_request"))
    key = served.api_key
    if key is not None and request.url.path.startswith(API_PATHS):
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return error_response(ApiError(401, "missing or wrong API key (send "
                                           "Authorization: Bearer KEY)",
                                           code="invalid_api_key"))
    try:
        return await call_next(request)
    except Exception as e:  # a bug: the client gets a JSON error, the server goes on
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                       kind="server_error"))


def build_app(served: Served) -> FastAPI:
    """The app: `router`'s routes over `served`, OpenAI-shaped errors, the key check, and
    server/static/ at `/` when present."""
    app = FastAPI(title="llama-ccs", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.middleware("http")(guard)
    app.include_router(router)
    app.router.default = static_or_404(STATIC if os.path.isdir(STATIC) else None)
    return app


def static_or_404(folder: Optional[str]):
    """What answers a path no route has: a GET of a file under `folder` (the playground), else
    404. (A known path with another method is the router's 405.)"""
    from fastapi.staticfiles import StaticFiles

    files = StaticFiles(directory=folder, html=True) if folder else None

    async def app(scope, receive, send):
        if files is None or scope["method"] not in ("GET", "HEAD"):
            raise HTTPException(404, "Not Found")
        await files(scope, receive, send)

    return app


CONVENTIONS = {
    "layers": "0 is the embedding output, L the output of block L (the residual stream after it)",
    "scale": {"raw": "multiplier x the vector as loaded is added",
              "residual": "multiplier x the unit vector x the layer's mean residual-stream norm "
                          "(residual_norms) is added: multiplier 0.5 pushes by half the norm"},
    "ablate": "h - multiplier x (h . u) u, u the unit vector (multiplier 1 removes the "
              "component)",
    "positions": {"all": "every position, the prompt included",
                  "generated": "the generated tokens only"},
    "probe": "score = h . weight + bias at probe.layer, for the prompt's last token "
             "(probe_prompt_score) and every generated token (probe_scores); margin = score - "
             "probe.threshold, > 0: the probe's positive class (probe_margins, "
             "probe_prompt_margin)",
}


async def stream_events(job: Job, events: asyncio.Queue, shape: "Shape", usage_chunk: bool):
    try:
        if shape.chat:  # OpenAI opens a chat stream with the assistant role
            yield sse(shape.chunk_start())
        while True:
            event = await events.get()
            if event["type"] == "error":
                yield sse(event_error(event).body())
                break
            shape.add(event)
            if event["type"] == "token":
                yield sse(shape.chunk_token(event))
            else:
                yield sse(shape.chunk_end())
                if usage_chunk:
                    yield sse(shape.chunk_usage())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left mid-stream frees its row


def event_error(event: dict) -> ApiError:
    """A scheduler's error event as the answer's error: 400 for the request's own doing, 500 or
    503 (the server's) otherwise."""
    status = event.get("status", 503)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ApiError(status, event["message"], event.get("param"), kind=kind)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Shape:
    """OpenAI's response objects for one job, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str, job: Job, tok):
        self.chat, self.model, self.job, self.tok = chat, model, job, tok
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.tokens, self.logprobs, self.tops, self.probes = [], [], [], []
        self.finish = None
        self.push = None  # {layer: steering_push} when the engine reports it (--engine vllm)

    def add(self, event: dict):
        if event["type"] == "done":
            self.finish = event["finish"]
            self.push = event.get("steering_push")
        elif event["token"] is not None:
            self.tokens.append(event["token"])
            self.logprobs.append(event["logprob"])
            self.tops.append(event["top_logprobs"])
            self.probes.append(event["probe"])

    def _piece(self, token: int) -> str:
        return self.tok.decode([token])

    def _logprobs(self, start: int) -> Optional[dict]:
        if self.job.params.logprobs is None:
            return None
        rows = range(start, len(self.tokens))
        if self.chat:
            return {"content": [{
                "token": self._piece(self.tokens[i]), "logprob": self.logprobs[i],
                "bytes": list(self._piece(self.tokens[i]).encode()),
                "top_logprobs": [{"token": self._piece(t), "logprob": v,
                                  "bytes": list(self._piece(t).encode())}
                                 for t, v in (self.tops[i] or [])]} for i in rows]}
        return {"tokens": [self._piece(self.tokens[i]) for i in rows],
                "token_logprobs": [self.logprobs[i] for i in rows],
                "top_logprobs": [self._top(self.tops[i]) for i in rows]}

    def _top(self, top) -> Optional[dict]:
        """{token text: logprob}, most likely first; tokens of the same text keep the larger."""
        if not top:
            return None
        out = {}
        for t, v in top:
            out.setdefault(self._piece(t), v)
        return out

    def _probe(self, choice: dict, start: int, whole: bool):
        if self.job.params.probe:
            choice["probe_scores"] = self.probes[start:]
            choice["probe_margins"] = self.job.margins(self.probes[start:])
            if whole or start == 0:
                choice["probe_prompt_score"] = self.job.prompt_probe
                choice["probe_prompt_margin"] = self.job.margins([self.job.prompt_probe])[0]

    def usage(self) -> dict:
        n = len(self.job.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": len(self.tokens),
                "total_tokens": n + len(self.tokens)}

    def _envelope(self, choices: list, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + \
            (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def whole(self) -> dict:
        text = self.job.text
        choice = {"index": 0, "finish_reason": self.finish, "logprobs": self._logprobs(0),
                  "token_ids": self.tokens}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._probe(choice, 0, True)
        if self.push is not None:
            choice["steering_push"] = self.push
        out = self._envelope([choice], False)
        out["usage"] = self.usage()
        return out

    def _chunk(self, delta: str, start: int, finish=None, first=False) -> dict:
        choice = {"index": 0, "finish_reason": finish, "logprobs": self._logprobs(start)}
        if self.chat:
            choice["delta"] = ({"role": "assistant", "content": delta} if first
                               else {"content": delta} if delta or finish is None else {})
        else:
            choice["text"] = delta
        return choice

    def chunk_start(self) -> dict:
        choice = self._chunk("", 0, first=True)
        choice["logprobs"] = None
        return self._envelope([choice], True)

    def chunk_token(self, event: dict) -> dict:
        start = len(self.tokens) - (1 if event["token"] is not None else 0)
        choice = self._chunk(event["text"], start)
        self._probe(choice, start, False)
        return self._envelope([choice], True)

    def chunk_end(self) -> dict:
        choice = self._chunk("", len(self.tokens), finish=self.finish)
        choice["logprobs"] = None
        if self.push is not None:
            choice["steering_push"] = self.push
        return self._envelope([choice], True)

    def chunk_usage(self) -> dict:
        out = self._envelope([], True)
        out["usage"] = self.usage()
        return out
