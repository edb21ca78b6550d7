"""Every command's flags, parsed from the function it runs, before any work starts.

    from llama.cli import command
    def main(model: str, layers: str = "all", zero_shot: bool = False):
        '''Extract hidden states.

        model: a Meta dir, Hugging Face dir or .gguf file
        layers: all, 12 or 10,20,23
        zero_shot: also store each answer's log-probability
        '''
    command(main)                  # or command({"train": train, ...}) for subcommands

Flags are the function's parameters (`--name value`, `--name=value`; `-` and `_` alike); values
may also be given positionally: the required ones first, then the function's other parameters.
A parameter annotated with a dataclass stands for all of its fields (each a flag, help from the
class docstring); the function receives the filled dataclass. Types come from annotations (int,
float, str, bool, Literal[...] choices, Optional[...], List[str] for a flag given several times),
else from the default. Help text: the docstring's `name: meaning` lines. Refused before the
function runs, in one `error: ...` line: an unknown flag (the nearest valid one suggested), a
missing required one, a value of the wrong type or outside its choices. `-h`/`--help` lists every
flag and exits 0.

ALIASES names one thing once across commands: a command with a flag `model` also accepts
`--ckpt_dir`; an error then names the flag as the user typed it.
"""
import dataclasses
import difflib
import inspect
import os
import re
import signal
import sys
import threading
import typing
from typing import Dict, List, Optional

from .errors import LlamaError, fail, report

ALIASES = {  # seed spelling -> the name every command uses
    "ckpt_dir": "model",
    "prompt_csv": "data",
    "save_activations_path": "output",
    "tokenizer": "tokenizer_path",
    "model_dtype": "compute_dtype",
    "report": "html_report",  # a name the commands' own `report` module already holds
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _quit(signum, frame):
    fail("interrupted", 130)  # nothing started yet, so nothing to keep, and no traceback


if threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _quit)  # Ctrl-C while a command imports torch: one line too


@dataclasses.dataclass
class Flag:
    name: str
    kind: str  # int, float, str, bool, list, auto (int, float or str, as the value reads)
    default: object = None
    required: bool = False
    choices: Optional[tuple] = None
    help: str = ""
    owner: Optional[str] = None  # the dataclass parameter this flag is a field of
    aliases: List[str] = dataclasses.field(default_factory=list)


def _kind(tp, default):
    """(kind, choices) from an annotation (or the default's type when there is none)."""
    if tp is inspect.Parameter.empty or tp is None:
        if isinstance(default, bool):
            return "bool", None
        if isinstance(default, (list, tuple)):
            return "list", None
        return {int: "int", float: "float", str: "str"}.get(type(default), "auto"), None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        rest = [a for a in args if a is not type(None)]
        return _kind(rest[0] if len(rest) == 1 else inspect.Parameter.empty, default)
    if origin is typing.Literal:
        return "str", tuple(str(a) for a in args)
    if origin in (list, tuple) or tp in (list, tuple):
        return "list", None
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, "auto"), None


def doc_lines(doc: Optional[str], names) -> Dict[str, str]:
    """`name: meaning` lines of a docstring (continuation lines indented deeper); `a / b: ...`
    gives both."""
    out, cur, indent = {}, None, 0
    for line in (doc or "").splitlines():
        m = re.match(r"(\s*)([a-z_]\w*(?:\s*/\s*[a-z_]\w*)*)\s*:\s+(\S.*)$", line)
        keys = [k.strip() for k in m.group(2).split("/")] if m else []
        if m and all(k in names for k in keys):
            cur, indent = keys, len(m.group(1))
            for k in keys:
                out[k] = m.group(3).strip()
        elif cur and line.strip() and len(line) - len(line.lstrip()) > indent:
            for k in cur:
                out[k] += " " + line.strip()
        else:
            cur = None
    return out


def _summary(doc: Optional[str], names) -> str:
    """The docstring up to its first `name:` line or `Args:`."""
    keep = []
    for line in inspect.cleandoc(doc or "").splitlines():
        m = re.match(r"\s*([a-z_]\w*)(?:\s*/\s*[a-z_]\w*)*\s*:\s", line)
        if line.strip() in ("Args:", "Flags:") or (m and m.group(1) in names):
            break
        keep.append(line)
    return "\n".join(keep).strip()


def flags(fn, optional=()) -> Dict[str, Flag]:
    """{name: Flag} of fn's parameters, dataclass parameters expanded into their fields; the
    fields named in `optional` lose their requirement (None when not given)."""
    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters
    out = {}
    for p in params.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        tp = hints.get(p.name, p.annotation)
        if dataclasses.is_dataclass(tp):
            fhints = typing.get_type_hints(tp)
            fields = dataclasses.fields(tp)
            helps = {}
            for base in reversed(tp.__mro__):  # a subclass may change a field's default and help
                helps.update(doc_lines(base.__doc__, {f.name for f in fields}))
            for f in fields:
                if f.name in out:
                    raise TypeError(f"{fn.__name__}: flag {f.name} twice")
                default = f.default if f.default is not dataclasses.MISSING else None
                kind, choices = _kind(fhints.get(f.name), default)
                required = f.default is dataclasses.MISSING and f.name not in optional
                out[f.name] = Flag(f.name, kind, default, required, choices, helps.get(f.name, ""),
                                   p.name)
            continue
        default = None if p.default is p.empty else p.default
        kind, choices = _kind(tp, default)
        kind = "str" if kind == "auto" and p.default is p.empty else kind
        out[p.name] = Flag(p.name, kind, default, p.default is p.empty, choices)
    helps = doc_lines(fn.__doc__, set(out))
    for name, f in out.items():
        f.help = helps.get(name, f.help)
    for alias, target in ALIASES.items():
        if target in out and alias not in out:
            out[target].aliases.append(alias)
    return out


def _convert(f: Flag, flag: str, raw: str):
    if f.kind != "str" and f.default is None and raw.lower() == "none":
        return None
    if f.choices and raw not in f.choices:
        raise LlamaError(f"{flag} {raw!r}: choose one of {', '.join(f.choices)}")
    if f.kind == "bool":
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise LlamaError(f"{flag} {raw!r} is not true or false")
    if f.kind in ("int", "auto"):
        try:
            return int(raw)
        except ValueError:
            if f.kind == "int":
                raise LlamaError(f"{flag} {raw!r} is not an integer")
    if f.kind in ("float", "auto"):
        try:
            return float(raw)
        except ValueError:
            if f.kind == "float":
                raise LlamaError(f"{flag} {raw!r} is not a number")
    return raw


def _is_value(arg: str) -> bool:
    """Whether an argument after a flag is its value: a flag is not; a negative number (or a list
    of numbers, -4,-2,0) is."""
    return not arg.startswith("-") or arg == "-" or re.match(r"-\.?\d", arg) is not None


def parse(fl: Dict[str, Flag], argv: List[str], prog: str = "") -> tuple:
    """argv -> ({name: value} of the flags given, {name: spelling typed}). Raises LlamaError."""
    names = {}
    for f in fl.values():
        for n in [f.name] + f.aliases:
            names[n] = f.name
    if any(f.kind == "bool" for f in fl.values()):
        for f in fl.values():
            if f.kind == "bool":
                names.setdefault("no" + f.name, "!" + f.name)
                names.setdefault("no_" + f.name, "!" + f.name)
    vals, typed, pos, i = {}, {}, [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            if arg.startswith("-") and not _is_value(arg):
                raise LlamaError(f"unknown flag {arg}" + _near(arg.lstrip("-"), fl))
            pos.append(arg)
            continue
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in names:
            raise LlamaError(f"unknown flag --{key}" + _near(key, fl))
        target = names[key]
        if target.startswith("!"):
            if eq:
                raise LlamaError(f"--{key} takes no value")
            vals[target[1:]], typed[target[1:]] = False, "--" + key
            continue
        f = fl[target]
        if not eq:
            if f.kind == "bool":
                if i < len(argv) and argv[i].lower() in _TRUE + _FALSE:
                    raw, i = argv[i], i + 1
                else:
                    raw = "true"
            elif i < len(argv) and _is_value(argv[i]):
                raw, i = argv[i], i + 1
            else:
                raise LlamaError(f"--{key} needs a value")
        value = _convert(f, "--" + key, raw)
        if f.kind == "list":
            vals.setdefault(f.name, []).append(value)
        elif f.name in vals:
            raise LlamaError(f"--{key} given twice")
        else:
            vals[f.name] = value
        typed[f.name] = "--" + key
    # in order, as in a call: the required ones, then the function's own optional values
    free = [f for f in fl.values() if f.required] + [
        f for f in fl.values()
        if not f.required and f.owner is None and f.kind not in ("bool", "list")]
    free = [f for f in free if f.name not in vals]
    if len(pos) > len(free):
        raise LlamaError(f"unexpected argument {pos[len(free)]!r}")
    for f, raw in zip(free, pos):
        vals[f.name], typed[f.name] = _convert(f, f.name.upper(), raw), f.name.upper()
    missing = [f for f in fl.values() if f.required and f.name not in vals]
    if missing:
        f = missing[0]
        raise LlamaError(f"missing --{f.name}" + (f" ({f.help})" if f.help else ""))
    return vals, typed


def _near(key: str, fl: Dict[str, Flag]) -> str:
    names = [n for f in fl.values() for n in [f.name] + f.aliases]
    hit = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean --{hit[0]}?)" if hit else " (see --help)"


def usage(fn, fl: Dict[str, Flag], prog: str) -> str:
    req = " ".join(f.name.upper() if f.owner is None else f"--{f.name} {f.kind.upper()}"
                   for f in fl.values() if f.required)
    lines = [f"usage: {prog} {req} [flags]".replace("  ", " ")]
    about = _summary(fn.__doc__, set(fl))
    if about:
        lines += ["", about]
    lines += ["", "flags:"]
    rows = []
    for f in fl.values():
        kind = "{" + ",".join(f.choices) + "}" if f.choices else f.kind.upper()
        kind = {"BOOL": "", "AUTO": "VALUE", "LIST": "VALUE ..."}.get(kind, kind)
        left = f"--{f.name} {kind}".rstrip()
        if f.required:
            state = "required"
        elif f.kind == "bool":
            state = "on/off, default on" if f.default else "on/off, default off"
        elif f.kind == "list":
            state = "repeatable"
        else:
            state = "optional" if f.default is None else f"default {f.default}"
        also = f" (also --{', --'.join(f.aliases)})" if f.aliases else ""
        rows.append((left, f"{state}. {f.help}{also}".rstrip(". ").rstrip()))
    rows.append(("-h, --help", "this help"))
    width = min(max(len(a) for a, _ in rows) + 2, 34)
    for left, right in rows:
        pad = " " * (width - len(left)) if len(left) < width else "  "
        lines.append(f"  {left}{pad}{right}")
    return "\n".join(lines)


def _rename(msg: str, typed: Dict[str, str]) -> str:
    """Errors name a flag as the user typed it (`--prompt_csv`, not `--data`)."""
    for name, spelling in typed.items():
        if spelling.startswith("--") and spelling != "--" + name:
            msg = re.sub(rf"--{name}(?!\w)", spelling, msg)
    return msg


def call(fn, vals: dict, fl: Dict[str, Flag]):
    """fn(**vals) with dataclass parameters filled from their fields."""
    kwargs, groups = {}, {}
    for name, f in fl.items():
        if f.owner:
            groups.setdefault(f.owner, {})[name] = vals.get(name, f.default)
        elif name in vals:
            kwargs[name] = vals[name]
    hints = typing.get_type_hints(fn)
    for owner, fields in groups.items():
        kwargs[owner] = hints[owner](**fields)
    return fn(**kwargs)


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def command(fn, argv: Optional[List[str]] = None, prog: Optional[str] = None, optional=()):
    """Parse argv (default sys.argv[1:]) for fn, or for a {name: fn} of subcommands (the key None:
    what runs when the first argument names no subcommand), then run it. Bad flags and LlamaError
    / OSError become one `error: ...` line and exit 2; Ctrl-C, `error: interrupted` and exit 130.
    optional: dataclass fields this command does not require (see flags)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or (os.path.relpath(sys.argv[0]) if sys.argv[0] else "command")
    if isinstance(fn, dict):
        subs = {k: v for k, v in fn.items() if k is not None}
        if argv and argv[0] in subs:
            return command(subs[argv[0]], argv[1:], f"{prog} {argv[0]}")
        if None in fn:
            return command(fn[None], argv, prog)
        if not argv or argv[0] in ("-h", "--help"):
            if _main_rank():
                print(f"usage: {prog} {{{','.join(subs)}}} [flags]    "
                      f"({prog} COMMAND -h: its flags)\n")
                for k, v in subs.items():
                    print(f"  {k:<12}{(_summary(v.__doc__, set()) + chr(10)).splitlines()[0]}")
            raise SystemExit(0 if argv else 2)
        hit = difflib.get_close_matches(argv[0], list(subs), n=1)
        fail(f"unknown command {argv[0]!r}" + (f" (did you mean {hit[0]}?)" if hit else
                                               f" (choose one of {', '.join(subs)})"))
    fl = flags(fn, optional)
    if "-h" in argv or "--help" in argv:
        if _main_rank():
            print(usage(fn, fl, prog))
        raise SystemExit(0)
    typed = {}
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    try:  # Ctrl-C is a KeyboardInterrupt inside the command, so it can keep what it has done
        vals, typed = parse(fl, argv, prog)
        return call(fn, vals, fl)
    except (LlamaError, OSError, KeyboardInterrupt) as e:
        report(e, lambda msg: _rename(msg, typed))
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, before)
