"""Request bodies checked field by field into one request model per route
(`CompletionRequest`, `ChatRequest`), and OpenAI-style errors.

A completion's `prompt` is a string, a list of strings, a list of token ids or a list of lists of
token ids (`read_prompts`): text is read as scripts/generate.py reads it (marked as text, BOS
added when the model adds one), token ids are used verbatim (no BOS added), as a client that
tokenized for itself (lm-eval's `local-completions`) means them. `n` samples per prompt; `echo`
returns the prompt before the completion and lets max_tokens be 0 (the prompt scored, nothing
generated). `model` names the served model or a steered alias (--alias, server/aliases.py).

Every refusal is an ApiError: HTTP status, a message naming the field, its OpenAI `type` and
`param` (dotted: `steering.multiplier`, `messages.2.content`), sent as
{"error": {"message", "type", "param", "code"}}. Unknown top-level fields are ignored, as
OpenAI-compatible servers do (clients send extras); unknown fields inside `steering` are refused.
"""
import math
from dataclasses import dataclass, field, replace
from typing import List, Optional

from pydantic import BaseModel, ConfigDict

from llama.errors import LlamaError

from steering.settings import SteerError, SteerSettings

from .scheduler import Params

STEER_KEYS = ("vector", "layers", "multiplier", "scale", "ablate", "positions")
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes
ROLES = ("system", "user", "assistant")
MAX_STOPS = 4
MAX_N = 16  # samples per prompt
MAX_CHOICES = 256  # prompts x n in one request


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (status, message, param,
                                                                       kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


@dataclass
class Limits:
    """What the loaded model and server allow."""
    model_id: str
    context: int  # tokens a row holds: prompt + max_tokens at most
    n_layers: int
    vectors: dict  # name -> {layer: tensor}
    has_probe: bool
    residual_norms: dict = None  # layer -> mean residual-stream norm (scale "residual")
    engine: str = "native"  # or "vllm" (server/vllm_engine.py)
    vocab: int = 0  # token ids a request may send: 0..vocab-1 (the model's and tokenizer's)
    aliases: dict = field(default_factory=dict)  # steered alias name -> its steering settings


def _number(body: dict, key: str, default, lo=None, lo_open=False, hi=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(key, f"{v!r} is not a finite number")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise bad(key, f"{v} is {'not above' if lo_open else 'below'} {lo}")
    if hi is not None and v > hi:
        raise bad(key, f"{v} is above {hi}")
    return float(v)


def _int(body: dict, key: str, default, lo=None, hi=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(key, f"{v!r} is not an integer")
    if lo is not None and v < lo:
        raise bad(key, f"{v} is below {lo}")
    if hi is not None and v > hi:
        raise bad(key, f"{v} is above {hi}")
    return v


def boolean(body: dict, key: str, default=False, param=None):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(param or key, f"{v!r} is not true or false")
    return v


def check_model(body: dict, limits: Limits) -> Optional[dict]:
    """The request's `model`: absent or the served model -> None; a steered alias -> its
    steering settings (400 when the request carries `steering` too: the alias fixes it);
    anything else -> 404 naming the models served."""
    model = body.get("model")
    if model is None or model == limits.model_id:
        return None
    if isinstance(model, str) and model in limits.aliases:
        if body.get("steering") is not None:
            raise ApiError(400, f"steering: model {model!r} is a steered alias (its steering is "
                           f"fixed); send steering to {limits.model_id!r} instead", "steering")
        return limits.aliases[model]
    served = ", ".join(repr(m) for m in [limits.model_id, *limits.aliases])
    raise ApiError(404, f"model {model!r} does not exist: this server serves {served}", "model",
                   code="model_not_found")


def steering(spec, limits: Limits) -> Optional[SteerSettings]:
    """The `steering` field -> SteerSettings (checked: steering/settings.py) or None. JSON types
    are checked here; what a setting may be, there (a SteerError names its field)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise bad("steering", "expected an object {vector, layers, multiplier, ...}")
    unknown = [k for k in spec if k not in STEER_KEYS]
    if unknown:
        raise bad(f"steering.{unknown[0]}", f"unknown field (known: {', '.join(STEER_KEYS)})")
    name = spec.get("vector")
    if not isinstance(name, str):
        raise bad("steering.vector", "the name of a loaded vector is required (GET /v1/vectors)")
    if name not in limits.vectors:
        have = ", ".join(sorted(limits.vectors)) or "none loaded"
        raise bad("steering.vector", f"no vector named {name!r} (loaded: {have})")
    layers = spec.get("layers", sorted(limits.vectors[name]))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if (not isinstance(layers, list) or not layers
            or any(isinstance(x, bool) or not isinstance(x, int) for x in layers)):
        raise bad("steering.layers", f"{layers!r} is not a non-empty list of layer numbers")
    settings = SteerSettings(name, tuple(layers), spec.get("multiplier", 1.0),
                             spec.get("scale", "raw"), spec.get("ablate", False),
                             spec.get("positions", "all"))
    try:
        return settings.check(limits.n_layers, limits.vectors[name], limits.residual_norms)
    except SteerError as e:
        raise bad(f"steering.{e.field}", str(e)) from None


def common(body: dict, limits: Limits, n_prompt: int, chat: bool, echo: bool = False) -> Params:
    """The settings both endpoints share; n_prompt: the prompt's length in tokens. echo (a
    completion that returns its prompt): max_tokens may be 0, and `logprobs` also scores the
    prompt's tokens (Params.prompt_logprobs). Chat has n = 1 and no echo."""
    if chat and body.get("n", 1) != 1:
        raise bad("n", "only n = 1 is supported")
    if chat and body.get("echo"):
        raise bad("echo", "echo is not supported")
    scoring_only = echo and body.get("max_tokens") == 0
    room = limits.context - n_prompt
    if room < (0 if scoring_only else 1):
        raise bad("messages" if chat else "prompt", f"the prompt has {n_prompt} tokens: no room "
                  f"to generate within the context of {limits.context}")
    # OpenAI's and vLLM's rule: max_completion_tokens (chat) wins over max_tokens
    key = ("max_completion_tokens" if chat and body.get("max_completion_tokens") is not None
           else "max_tokens")
    max_tokens = _int(body, key, room if chat else min(16, room), lo=0 if echo else 1)
    if max_tokens > room:
        raise bad(key, f"prompt ({n_prompt} tokens) + {key} ({max_tokens}) exceeds the context "
                  f"of {limits.context} tokens")
    temperature = _number(body, "temperature", 1.0, lo=0)
    top_p = _number(body, "top_p", 1.0, lo=0, lo_open=True, hi=1)
    seed = _int(body, "seed", None, *SEED_RANGE)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", f"expected a non-empty string or a list of up to {MAX_STOPS}")
    if chat:
        logprobs = boolean(body, "logprobs")
        top = _int(body, "top_logprobs", 0, lo=0, hi=20)
        if top and not logprobs:
            raise bad("top_logprobs", "needs logprobs: true")
        logprobs = top if logprobs else None
    else:
        logprobs = _int(body, "logprobs", None, lo=0, hi=5)
    probe = boolean(body, "probe")
    if probe and not limits.has_probe:
        raise bad("probe", "no probe is loaded (start the server with --probe "
                  "RUN/probes/METHOD.safetensors)")
    return Params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                  stop=stop, logprobs=logprobs, probe=probe,
                  steer=steering(body.get("steering"), limits),
                  ignore_eos=boolean(body, "ignore_eos"),
                  prompt_logprobs=logprobs if echo else None)


@dataclass
class Prompt:
    text: str  # what echo returns: the prompt as given, or its token ids decoded
    ids: List[int]  # what the model reads


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _token_prompt(ids: List[int], param: str, tok, vocab: int) -> Prompt:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise bad(param, f"token {i} is {t}: not in the vocabulary (0..{vocab - 1})")
    return Prompt(tok.decode(ids), list(ids))


def _text_prompt(text: str, param: str, tok) -> Prompt:
    if not text:
        raise bad(param, "the prompt is empty")
    return Prompt(text, tok.encode(tok.as_text(text), bos=True))


def read_prompts(prompt, tok, vocab: int) -> List[Prompt]:
    """`prompt` in any of its four forms -> one Prompt per prompt. vocab: token ids must lie in
    0..vocab-1. ApiError 400 naming `prompt` or `prompt.I` when a form is wrong or empty."""
    if isinstance(prompt, str):
        return [_text_prompt(prompt, "prompt", tok)]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", "expected a string, a list of strings, a list of token ids or a "
                  "list of lists of token ids")
    if _is_ids(prompt):
        return [_token_prompt(prompt, "prompt", tok, vocab)]
    if len(prompt) > MAX_CHOICES:
        raise bad("prompt", f"{len(prompt)} prompts: at most {MAX_CHOICES} in one request")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append(_text_prompt(p, f"prompt.{i}", tok))
        elif _is_ids(p):
            out.append(_token_prompt(p, f"prompt.{i}", tok, vocab))
        else:
            raise bad(f"prompt.{i}", "expected a non-empty string or a non-empty list of token "
                      "ids")
    return out


def refuse_scoring(body: dict, engine: str):
    """The completions fields an engine other than the native one does not serve yet (echo,
    n > 1, a list or token-id prompt): a 400 naming the field, never silently ignored."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        raise bad("prompt", f"a list or token-id prompt is not served on --engine {engine} yet: "
                  "send one string")
    if body.get("n") not in (None, 1):
        raise bad("n", f"n > 1 is not served on --engine {engine} yet")
    if body.get("echo"):
        raise bad("echo", f"echo is not served on --engine {engine} yet")


def choices_per_prompt(body: dict, n_prompts: int) -> int:
    """`n`: samples per prompt (1..MAX_N; prompts x n at most MAX_CHOICES)."""
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise bad("n", f"{n!r} is not an integer from 1 to {MAX_N}")
    if n * n_prompts > MAX_CHOICES:
        raise bad("n", f"{n_prompts} prompts x n {n} = {n * n_prompts} choices: at most "
                  f"{MAX_CHOICES} in one request")
    return n


def echo_flag(body: dict, stream: bool, n_choices: int) -> bool:
    """`echo`; streaming is refused with echo or with several choices (one choice per stream)."""
    echo = boolean(body, "echo")
    if stream and echo:
        raise ApiError(400, "stream: not supported with echo (send stream: false)", "stream")
    if stream and n_choices > 1:
        raise ApiError(400, "stream: one prompt and n = 1 only (send several prompts or n > 1 "
                       "with stream: false)", "stream")
    return echo


def chat_messages(body: dict) -> List[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "expected a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages.{i}", "expected an object {role, content}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad(f"messages.{i}.role", f"{role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages.{i}.content", "only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages.{i}.content", "expected a string")
        out.append({"role": role, "content": content})
    return out


def streaming(body: dict) -> dict:
    """`stream` and `stream_options.include_usage`."""
    options = body.get("stream_options")
    return {"stream": boolean(body, "stream"),
            "include_usage": isinstance(options, dict) and bool(options.get("include_usage"))}


class CompletionRequest(BaseModel):
    """POST /v1/completions, checked: each prompt as token ids (read_prompts) with its
    generation settings (`settings`, one per prompt: the context room depends on its length),
    `n` samples of each, `echo`; `prompt_ids` and `params` are the first prompt's (a stream has
    one prompt). `model`: the name asked for (the served model's or an alias's)."""
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    prompt: str
    prompt_ids: List[int]
    params: Params
    prompts: List[Prompt]
    settings: List[Params]
    model: str
    n: int = 1
    echo: bool = False
    stream: bool = False
    include_usage: bool = False

    @classmethod
    def check(cls, body: dict, limits: Limits, tok) -> "CompletionRequest":
        """body: the parsed JSON object; ApiError on the first field that is wrong."""
        steer = check_model(body, limits)
        if limits.engine != "native":
            refuse_scoring(body, limits.engine)
        prompts = read_prompts(body.get("prompt"), tok, limits.vocab)
        n = choices_per_prompt(body, len(prompts))
        flow = streaming(body)
        echo = echo_flag(body, flow["stream"], n * len(prompts))
        settings = [common(body, limits, len(p.ids), chat=False, echo=echo) for p in prompts]
        if steer is not None:  # a steered alias (the request carries no steering field)
            settings = [replace(p, steer=steer) for p in settings]
        return cls(prompt=prompts[0].text, prompt_ids=prompts[0].ids, params=settings[0],
                   prompts=prompts, settings=settings, model=body.get("model") or
                   limits.model_id, n=n, echo=echo, **flow)


class ChatRequest(BaseModel):
    """POST /v1/chat/completions, checked: the messages rendered by the model's chat template
    (every content marked as text: Tokenizer.render_chat) as token ids, and the settings."""
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    messages: List[dict]
    prompt_ids: List[int]
    params: Params
    model: str
    stream: bool = False
    include_usage: bool = False

    @classmethod
    def check(cls, body: dict, limits: Limits, tok) -> "ChatRequest":
        """body: the parsed JSON object; ApiError on the first field that is wrong."""
        steer = check_model(body, limits)
        messages = chat_messages(body)
        if tok.chat_source == "none":
            raise ApiError(400, "this model's tokenizer has no chat format: use /v1/completions",
                           "messages")
        try:  # render_chat marks the contents as text: only the template's markers are special
            ids = tok.encode(tok.render_chat(messages), bos=True)
        except LlamaError as e:
            raise ApiError(400, str(e), "messages") from None
        params = common(body, limits, len(ids), chat=True)
        if steer is not None:
            params = replace(params, steer=steer)
        return cls(messages=messages, prompt_ids=ids, params=params,
                   model=body.get("model") or limits.model_id, **streaming(body))
