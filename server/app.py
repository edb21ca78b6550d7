"""The HTTP routes (FastAPI): OpenAI's /v1/models, /v1/completions, /v1/chat/completions, plus
/v1/vectors and /health.

    app = build_app(Served(...))

Requests are checked (server/schemas.py), turned into a Job and handed to the scheduler thread;
its events come back through an asyncio queue. Streaming answers are server-sent events as
OpenAI sends them (`data: {chunk}` ... `data: [DONE]`); a client that goes away cancels its job,
which frees its row. Every route needs `Authorization: Bearer KEY` when the server has a key.
`/` is left free: a `server/static/` folder, when present, is served there.

Text is text (llama.tokenizer.as_text): a completion prompt is marked as scripts/generate.py marks
it, and Tokenizer.render_chat marks every message's content, so a `<|im_end|>` a user types is the
tokens that spell it, and the chat template's own markers are the only special tokens.
"""
import asyncio
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llama.errors import LlamaError

from . import schemas
from .scheduler import Job, Scheduler
from .schemas import ApiError, Limits

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


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, refused past `limit` bytes (413) or when not JSON (400)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def build_app(served: Served) -> FastAPI:
    app = FastAPI(title="llama-ccs", docs_url=None, redoc_url=None, openapi_url=None)
    limits, tok = served.limits, served.tokenizer

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: "
                                       f"{e.detail}", kind=kind))

    @app.middleware("http")
    async def auth(request: Request, call_next):
        """The API key check, and a 500 JSON error (never a traceback) if a route fails."""
        if served.api_key is not None and request.url.path.startswith(("/v1", "/health")):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
                return error_response(ApiError(401, "missing or wrong API key (send "
                                               "Authorization: Bearer KEY)",
                                               code="invalid_api_key"))
        try:
            return await call_next(request)
        except Exception as e:  # a bug: the client gets a JSON error, the server goes on
            return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                           kind="server_error"))

    @app.get("/health")
    async def health():
        sched = served.scheduler
        status = "ok" if sched.is_alive() else "stopped"
        return {"status": status, **sched.load(), "error": sched.error}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": limits.model_id, "object": "model",
                                            "created": 0, "owned_by": "llama-ccs",
                                            "context": limits.context}]}

    @app.get("/v1/vectors")
    async def vectors():
        return {"object": "list", "data": served.vectors_info, "probe": served.probe_info,
                "conventions": CONVENTIONS}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, served.max_body)
        schemas.check_model(body, limits)
        prompt = schemas.completion_prompt(body)
        ids = tok.encode(tok.as_text(prompt), bos=True)  # text, as scripts/generate.py reads it
        return await answer(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, served.max_body)
        schemas.check_model(body, limits)
        messages = schemas.chat_messages(body)
        if tok.chat_source == "none":
            raise ApiError(400, "this model's tokenizer has no chat format: use /v1/completions",
                           "messages")
        try:  # render_chat marks the contents as text: only the template's markers are special
            ids = tok.encode(tok.render_chat(messages), bos=True)
        except LlamaError as e:
            raise ApiError(400, str(e), "messages") from None
        return await answer(request, body, ids, chat=True)

    async def answer(request: Request, body: dict, ids, chat: bool):
        params = schemas.common(body, limits, len(ids), chat)
        stream = schemas.boolean(body, "stream")
        usage_chunk = isinstance(body.get("stream_options"), dict) and \
            bool(body["stream_options"].get("include_usage"))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass  # the event loop is closed: the server is gone

        job = Job(ids, params, emit)
        if not served.scheduler.is_alive():
            raise ApiError(503, "the server is shutting down", kind="server_error")
        served.scheduler.submit(job)
        shape = Shape(chat, limits.model_id, job, tok)
        if stream:
            return StreamingResponse(stream_events(job, events, shape, usage_chunk),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return JSONResponse({}, status_code=499)
                    continue
                if event["type"] == "error":
                    raise ApiError(503, event["message"], kind="server_error")
                shape.add(event)
                if event["type"] == "done":
                    return shape.whole()
        finally:
            job.cancelled.set()  # a no-op once done; frees the row if the handler was cancelled

    if os.path.isdir(STATIC):
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
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
                yield sse(ApiError(503, event["message"], kind="server_error").body())
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

    def add(self, event: dict):
        if event["type"] == "done":
            self.finish = event["finish"]
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
        return self._envelope([choice], True)

    def chunk_usage(self) -> dict:
        out = self._envelope([], True)
        out["usage"] = self.usage()
        return out
