"""Every command's flags, read from the function it runs (`command(main)`, or
`command({"train": train, ...})` for subcommands) and parsed by argparse before any work.

Flags are the function's parameters (`--name value`, `--name=value`, `-` and `_` alike; values
may also come positionally: the required ones first, then the function's other parameters). A
dataclass parameter stands for its fields. Types come from annotations (int, float, str, bool,
Literal[...] choices, Optional[...], List[str]: a flag given several times), help from the
docstrings' `name: meaning` lines. Refused before the function runs, in one `error: ...` line
(exit 2): an unknown flag (the nearest one suggested), a missing one, a bad value. `-h` lists
every flag, one line each, and exits 0. ALIASES: the seed's spellings (`--ckpt_dir` for
`--model`); an error names a flag as the user typed it.
"""
import argparse
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
    "dtype": "compute_dtype",  # only where --dtype (the on-disk dtype) is not a flag itself
    "report": "html_report",  # a name the commands' own `report` module already holds
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


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

    @property
    def names(self) -> List[str]:
        return [self.name] + self.aliases


def _kind(tp, default):
    """(kind, choices) of an annotation (without one: of the default's type)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        rest = [a for a in args if a is not type(None)]
        return _kind(rest[0] if len(rest) == 1 else None, default)
    if origin is typing.Literal:
        return "str", tuple(str(a) for a in args)
    tp = type(default) if tp in (None, inspect.Parameter.empty) else tp
    if origin in (list, tuple) or tp in (list, tuple):
        return "list", None
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, "auto"), None


def doc_lines(doc: Optional[str], names) -> Dict[str, str]:
    """{name: meaning} of a docstring's `name: meaning` lines (continued on lines indented deeper;
    `a / b: ...` gives both); the key "": the text above the first of them."""
    out, cur, indent, about, head = {}, None, 0, [], True
    for line in inspect.cleandoc(doc or "").splitlines():
        m = re.match(r"(\s*)([a-z_]\w*(?:\s*/\s*[a-z_]\w*)*)\s*:\s+(\S.*)$", line)
        keys = [k.strip() for k in m.group(2).split("/")] if m else []
        if m and all(k in names for k in keys):
            cur, indent = keys, len(m.group(1))
            out.update({k: m.group(3).strip() for k in keys})
        elif cur and line.strip() and len(line) - len(line.lstrip()) > indent:
            for k in cur:
                out[k] += " " + line.strip()
        else:
            cur, head = None, head and not out and line.strip() not in ("Args:", "Flags:")
            about += [line] if head else []
    return {"": "\n".join(about).strip(), **out}


def flags(fn) -> Dict[str, Flag]:
    """{name: Flag} of fn's parameters, dataclass parameters expanded into their fields (help from
    the docstrings of the class and its bases, a subclass's last; then from fn's docstring)."""
    hints, params, out = typing.get_type_hints(fn), [], {}
    for p in inspect.signature(fn).parameters.values():
        tp = hints.get(p.name, p.annotation)
        if dataclasses.is_dataclass(tp):
            fields, field_hints, helps = dataclasses.fields(tp), typing.get_type_hints(tp), {}
            for base in reversed(tp.__mro__):
                helps.update(doc_lines(base.__doc__, {f.name for f in fields}))
            params += [(f.name, field_hints.get(f.name), f.default, p.name, helps.get(f.name, ""))
                       for f in fields]
        elif p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            params.append((p.name, tp, p.default, None, ""))
    for name, tp, default, owner, about in params:
        if name in out:
            raise TypeError(f"{fn.__name__}: flag {name} twice")
        required = default is dataclasses.MISSING or default is inspect.Parameter.empty
        default = None if required else default
        kind, choices = _kind(tp, default)
        kind = "str" if kind == "auto" and required and owner is None else kind
        out[name] = Flag(name, kind, default, required, choices, about, owner)
    helps = doc_lines(fn.__doc__, set(out))
    for name, f in out.items():
        f.help = helps.get(name, f.help)
        f.aliases = [alias for alias, to in ALIASES.items() if to == name and alias not in out]
    return out


def _convert(f: Flag, flag: str, raw: str):
    """raw as f's kind; a LlamaError naming the flag as typed when it is not one."""
    if f.kind != "str" and f.default is None and raw.lower() == "none":
        return None
    if f.choices and raw not in f.choices:
        raise LlamaError(f"{flag} {raw!r}: choose one of {', '.join(f.choices)}")
    if f.kind == "bool":
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise LlamaError(f"{flag} {raw!r} is not true or false")
    for kind, cast, what in (("int", int, "an integer"), ("float", float, "a number")):
        if f.kind in (kind, "auto"):
            try:
                return cast(raw)
            except ValueError:
                if f.kind == kind:
                    raise LlamaError(f"{flag} {raw!r} is not {what}") from None
    return raw


def _is_value(arg: str) -> bool:
    """Whether an argument is a value, not a flag: a negative number (-1e-3, -4,-2,0) is one."""
    return not arg.startswith("-") or arg == "-" or re.match(r"-\.?\d", arg) is not None


def _spelled(argv: List[str], bools: set) -> List[str]:
    """Flag names with `_` for `-`; a value starting with `-`, which argparse would read as a flag,
    joined to its flag; a bool flag's value joined to it (`--quiet false`), else `=true`."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg.partition("=")
            arg = "--" + key[2:].replace("-", "_") + eq + raw
        last = out[-1] if out else ""
        if (last in bools and arg.lower() in _TRUE + _FALSE) or (
                last.startswith("--") and "=" not in last and last not in bools
                and arg.startswith("-") and _is_value(arg)):
            out[-1] += "=" + arg
        else:
            out.append(arg)
    return [arg + "=true" if arg in bools else arg for arg in out]


def _parser(fl: Dict[str, Flag], prog: str, about: Optional[str] = None):
    """argparse for fl: each flag under each spelling, stored as (spelling, value) pairs, with one
    help row (its kind, state, meaning and aliases); `--noNAME` and `--no_NAME` turn a bool off."""
    req = [f.name.upper() if f.owner is None else f"--{f.name} {f.kind.upper()}"
           for f in fl.values() if f.required]
    parser = argparse.ArgumentParser(
        prog, " ".join(["%(prog)s", *req, "[flags]"]), about, add_help=False, allow_abbrev=False,
        exit_on_error=False, formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=999, width=9999))
    parser.add_argument("free", nargs="*", help=argparse.SUPPRESS)
    group, taken = parser.add_argument_group("flags"), {n for f in fl.values() for n in f.names}
    for f in fl.values():
        meta = "{" + ",".join(f.choices) + "}" if f.choices else f.kind.upper()
        state = ("required" if f.required else
                 f"on/off, default {'on' if f.default else 'off'}" if f.kind == "bool" else
                 "repeatable" if f.kind == "list" else
                 "optional" if f.default is None else f"default {f.default}")
        also = f" (also --{', --'.join(f.aliases)})" if f.aliases else ""
        row = f"{state}. {f.help}{also}".rstrip(". ").rstrip().replace("%", "%%")
        for spelling in (f"--{n}" for n in f.names):
            group.add_argument(
                spelling, dest=f.name, action="append", default=argparse.SUPPRESS,
                type=lambda raw, f=f, s=spelling: (s, _convert(f, s, raw)),
                metavar={"BOOL": "", "AUTO": "VALUE", "LIST": "VALUE ..."}.get(meta, meta),
                help=row if spelling == f"--{f.name}" else argparse.SUPPRESS)
        for n in ("no" + f.name, "no_" + f.name) if f.kind == "bool" else ():
            if n not in taken:
                group.add_argument(f"--{n}", dest=f.name, action="append_const", const=(
                    f"--{n}", False), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if about is not None:  # the help's own row; parse reads -h as any other unknown flag
        group.add_argument("-h", "--help", action="help", help="this help")
    return parser


def parse(fl: Dict[str, Flag], argv: List[str], prog: str = "") -> tuple:
    """argv -> ({name: value} of the flags given, {name: spelling typed}). Raises LlamaError."""
    bools = {f"--{n}" for f in fl.values() if f.kind == "bool" for n in f.names}
    try:
        ns, extra = _parser(fl, prog).parse_known_args(_spelled(argv, bools))
    except argparse.ArgumentError as e:  # argparse's own refusals, in our words
        msg = re.sub(r"ignored explicit argument (.*)", r"takes no value (\1 given)", e.message)
        raise LlamaError(f"{e.argument_name} " +
                         msg.replace("expected one argument", "needs a value")) from None
    for arg in (a.partition("=")[0] for a in extra if not _is_value(a)):
        names = [n for f in fl.values() for n in f.names]
        hit = difflib.get_close_matches(arg.lstrip("-"), names, n=1, cutoff=0.6)
        raise LlamaError(f"unknown flag {arg}" +
                         (f" (did you mean --{hit[0]}?)" if hit else " (see --help)"))
    pos, given = ns.free + extra, {k: v for k, v in vars(ns).items() if k != "free"}
    for name, pairs in given.items():
        if len(pairs) > 1 and fl[name].kind != "list":
            raise LlamaError(f"{pairs[1][0]} given twice")
    typed = {name: pairs[-1][0] for name, pairs in given.items()}
    vals = {name: [v for _, v in pairs] if fl[name].kind == "list" else pairs[0][1]
            for name, pairs in given.items()}
    # in order, as in a call: the required ones, then the function's own optional values
    free = [f for f in fl.values() if f.required and f.name not in vals] + [
        f for f in fl.values() if not (f.required or f.owner or f.name in vals)
        and f.kind not in ("bool", "list")]
    if len(pos) > len(free):
        raise LlamaError(f"unexpected argument {pos[len(free)]!r}")
    for f, raw in zip(free, pos):
        vals[f.name], typed[f.name] = _convert(f, f.name.upper(), raw), f.name.upper()
    for f in fl.values():
        if f.required and f.name not in vals:
            raise LlamaError(f"missing --{f.name}" + (f" ({f.help})" if f.help else ""))
    return vals, typed


def usage(fn, fl: Dict[str, Flag], prog: str) -> str:
    """-h: the usage line, the docstring's summary, then one line per flag."""
    return _parser(fl, prog, doc_lines(fn.__doc__, set(fl))[""]).format_help().rstrip()


def _rename(msg: str, typed: Dict[str, str]) -> str:
    """Errors name a flag as the user typed it (`--prompt_csv`, not `--data`)."""
    for name, spelling in typed.items():
        if spelling.startswith("--") and spelling != "--" + name:
            msg = re.sub(rf"--{name}(?!\w)", spelling, msg)
    return msg


def call(fn, vals: dict, fl: Dict[str, Flag]):
    """fn(**vals), each dataclass parameter built from the values of its fields."""
    hints = typing.get_type_hints(fn)
    kwargs = {name: value for name, value in vals.items() if not fl[name].owner}
    for owner in dict.fromkeys(f.owner for f in fl.values() if f.owner):
        kwargs[owner] = hints[owner](**{n: v for n, v in vals.items() if fl[n].owner == owner})
    return fn(**kwargs)


def _subcommands(subs: dict, argv: List[str], prog: str):
    """A {name: fn} table: the subcommand argv names (the key None: what runs otherwise)."""
    named = {k: v for k, v in subs.items() if k is not None}
    if argv and argv[0] in named:
        return command(named[argv[0]], argv[1:], f"{prog} {argv[0]}")
    if None in subs:
        return command(subs[None], argv, prog)
    if not argv or argv[0] in ("-h", "--help"):
        if os.environ.get("RANK", "0") == "0":
            print(f"usage: {prog} {{{','.join(named)}}} [flags]    ({prog} COMMAND -h: its flags)"
                  "\n")
            for k, v in named.items():
                about = doc_lines(v.__doc__, ())[""].splitlines()
                print(f"  {k:<12}{about[0] if about else ''}")
        raise SystemExit(0 if argv else 2)
    hit = difflib.get_close_matches(argv[0], list(named), n=1)
    fail(f"unknown command {argv[0]!r}" + (f" (did you mean {hit[0]}?)" if hit else
                                           f" (choose one of {', '.join(named)})"))


def command(fn, argv: Optional[List[str]] = None, prog: Optional[str] = None):
    """Parse argv (default sys.argv[1:]) for fn, or for a {name: fn} of subcommands (the key None:
    what runs when the first argument names no subcommand), then run it. Bad flags and LlamaError
    / OSError become one `error: ...` line and exit 2; Ctrl-C, `error: interrupted` and exit 130
    (while the command runs, Ctrl-C is a KeyboardInterrupt, so the command can keep its work)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or (os.path.relpath(sys.argv[0]) if sys.argv[0] else "command")
    if isinstance(fn, dict):
        return _subcommands(fn, argv, prog)
    fl = flags(fn)
    if "-h" in argv or "--help" in argv:
        if os.environ.get("RANK", "0") == "0":
            print(usage(fn, fl, prog))
        raise SystemExit(0)
    typed = {}
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    try:
        vals, typed = parse(fl, argv, prog)
        return call(fn, vals, fl)
    except (LlamaError, OSError, KeyboardInterrupt) as e:
        report(e, lambda msg: _rename(msg, typed))
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, before)
