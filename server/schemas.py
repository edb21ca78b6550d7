"""Request bodies checked field by field, and OpenAI-style errors.

Every refusal is an ApiError: HTTP status, a message naming the field, its OpenAI `type` and
`param` (dotted: `steering.multiplier`, `messages.2.content`), sent as
{"error": {"message", "type", "param", "code"}}. Unknown top-level fields are ignored, as
OpenAI-compatible servers do (clients send extras); unknown fields inside `steering` are refused.
"""
import math
from dataclasses import dataclass
from typing import List, Optional

from .scheduler import Params

STEER_KEYS = ("vector", "layers", "multiplier", "scale", "ablate", "positions")
ROLES = ("system", "user", "assistant")
MAX_STOPS = 4


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


def check_model(body: dict, limits: Limits):
    model = body.get("model")
    if model is not None and model != limits.model_id:
        raise ApiError(404, f"model {model!r} does not exist: this server serves "
                       f"{limits.model_id!r}", "model", code="model_not_found")


def steering(spec, limits: Limits) -> Optional[dict]:
    """The `steering` field -> {vector, layers, multiplier, scale, ablate, positions} or None."""
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
    have = sorted(limits.vectors[name])
    layers = spec.get("layers", have)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if (not isinstance(layers, list) or not layers
            or any(isinstance(x, bool) or not isinstance(x, int) for x in layers)):
        raise bad("steering.layers", f"{layers!r} is not a non-empty list of layer numbers")
    for x in layers:
        if not 0 <= x <= limits.n_layers:
            raise bad("steering.layers", f"layer {x} is not in the model (layers "
                      f"0..{limits.n_layers})")
        if x not in limits.vectors[name]:
            raise bad("steering.layers", f"vector {name!r} has no layer {x} (it has "
                      f"{', '.join(map(str, have))})")
    mult = spec.get("multiplier", 1.0)
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult):
        raise bad("steering.multiplier", f"{mult!r} is not a finite number")
    choices = {"scale": ("raw", "residual"), "positions": ("all", "generated")}
    out = {"vector": name, "layers": sorted(set(layers)), "multiplier": float(mult)}
    for key, allowed in choices.items():
        v = spec.get(key, allowed[0])
        if v not in allowed:
            raise bad(f"steering.{key}", f"{v!r} is not one of {', '.join(allowed)}")
        out[key] = v
    out["ablate"] = boolean(spec, "ablate", False, "steering.ablate")
    return out


def common(body: dict, limits: Limits, n_prompt: int, chat: bool) -> Params:
    """The settings both endpoints share; n_prompt: the prompt's length in tokens."""
    if body.get("n", 1) != 1:
        raise bad("n", "only n = 1 is supported")
    if body.get("echo"):
        raise bad("echo", "echo is not supported")
    room = limits.context - n_prompt
    if room < 1:
        raise bad("messages" if chat else "prompt", f"the prompt has {n_prompt} tokens: no room "
                  f"to generate within the context of {limits.context}")
    key = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
    max_tokens = _int(body, key, room if chat else min(16, room), lo=1)
    if max_tokens > room:
        raise bad(key, f"prompt ({n_prompt} tokens) + {key} ({max_tokens}) exceeds the context "
                  f"of {limits.context} tokens")
    temperature = _number(body, "temperature", 1.0, lo=0)
    top_p = _number(body, "top_p", 1.0, lo=0, lo_open=True, hi=1)
    seed = _int(body, "seed", None)
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
                  ignore_eos=boolean(body, "ignore_eos"))


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt", "expected a string (one prompt per request)")
    if not prompt:
        raise bad("prompt", "the prompt is empty")
    return prompt


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
