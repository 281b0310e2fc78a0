"""Every job's options, declared once, and the one way a job is configured and called.

Options are declared in sections (as ffcv-imagenet's ``Section``/``Param``):
a name, a type, a default, a help text and, where they apply, choices. A
default that library code owns (a clip's ``tau`` in ``loaders.sampling``, the
bank's negatives in ``vthcl.memory``) is referred to with :class:`From`, not
repeated. A command names the sections and options it takes
(:func:`command`; a command with modes, such as ``vthcl.eval``, has one entry
per mode: :func:`mode`), and :func:`parser` builds its argparse parser from
those declarations: one thing has one flag, one default and one help in
every command. A command's *recipe* sets its own defaults for a few options
where the job differs (fine-tuning's 100 epochs against pretraining's 200;
each job's output folder); ``--help`` shows them.

A configuration resolves in layers: the declared defaults, the command's
recipe, a YAML file (``--config``; its keys are option names with ``_``), then
the command line (or, from Python, keyword values). ``--print-config``
prints the result as YAML (itself a valid ``--config`` file) and exits 0.
The result is a :class:`Config` namespace, which the jobs' Python functions
take::

    from vthcl import options, train
    cfg = options.resolve("vthcl.train", data="shards/manifest.json", epochs=2)
    train.train(cfg)

Errors, one way: a job raises :class:`UsageError` for bad options or input
(the CLI prints ``PROG: error: MESSAGE`` on stderr and exits 2) or
:class:`JobError` when it cannot finish (exit 1). A command may have exit
codes of its own (make_shards: 3 when some inputs failed).

Messages go through :mod:`logging`, a logger per module
(``log = logging.getLogger(__name__)``); :func:`setup_logging`, called by
every CLI (:func:`cli`) and never by library code, prints them on stderr as
``module: message``. ``--quiet`` keeps warnings and errors and hides progress
bars; ``--verbose`` adds debug messages.

This module needs the standard library only (PyYAML when a file is read or
written), so every part of the project can import it cheaply.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad options or input, said in a sentence that names the file or option and the reason
    (the CLIs: ``PROG: error: MESSAGE``, exit 2)."""


class JobError(RuntimeError):
    """A job that started and cannot finish (the CLIs: ``PROG: error: MESSAGE``, exit 1)."""


# --------------------------------------------------------------------------- declarations
class From:
    """A value that other code owns, looked up (and its module imported) only
    when a parser or a configuration needs it: ``From("loaders.sampling",
    "ClipSpec.tau")`` (an attribute), ``From("vthcl.memory", "MemoryBank",
    "momentum")`` (a parameter's default)."""

    def __init__(self, module: str, name: str, param: str | None = None):
        self.module, self.name, self.param = module, name, param

    def get(self):
        obj = importlib.import_module(self.module)
        for part in self.name.split("."):
            obj = getattr(obj, part)
        if self.param is not None:
            obj = inspect.signature(obj).parameters[self.param].default
        return obj

    def __eq__(self, other):
        return isinstance(other, From) and (self.module, self.name, self.param) == (
            other.module, other.name, other.param)

    def __hash__(self):
        return hash((self.module, self.name, self.param))

    def __repr__(self):
        return f"From({self.module!r}, {self.name!r}" + (f", {self.param!r})" if self.param else ")")


def _value(x):
    return x.get() if isinstance(x, From) else x


@dataclass(frozen=True)
class Option:
    """One option: ``--name-with-dashes`` on the command line, ``name`` in a
    config file and as a Config attribute. ``type`` bool makes a
    ``--name/--no-name`` switch; ``append`` a flag given once per value;
    ``in_config=False`` keeps it on the command line (paths, trust)."""
    name: str
    type: Callable
    default: Any
    help: str
    choices: Sequence | From | None = None
    nargs: str | None = None
    metavar: str | None = None
    aliases: tuple[str, ...] = ()
    append: bool = False
    in_config: bool = True
    section: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def listed(self) -> bool:
        return self.append or self.nargs in ("+", "*")

    def get_default(self):
        """The declared default (looked up where another module owns it)."""
        return _value(self.default)


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    names: tuple[str, ...]


OPTIONS: dict[str, Option] = {}
SECTIONS: dict[str, Section] = {}


def section(name: str, title: str, *opts: Option) -> Section:
    """Declare a section of options; an option name is declared once in all
    the project (a declaration made again identically, as when a module
    runs as ``__main__`` and is imported too, is the same one)."""
    for o in opts:
        o = replace(o, section=name)
        if o.name in OPTIONS and OPTIONS[o.name] != o:
            raise ValueError(f"option {o.name!r} is declared twice (sections {OPTIONS[o.name].section!r} "
                             f"and {name!r}): one thing, one declaration")
        OPTIONS[o.name] = o
    SECTIONS[name] = Section(name, title, tuple(o.name for o in opts))
    return SECTIONS[name]


@dataclass(frozen=True)
class Positional:
    """A command's operand (``make_ffcv SHARDS OUT.beton``): required, its own help."""
    name: str
    help: str
    metavar: str | None = None


@dataclass
class Command:
    name: str
    description: str
    options: tuple[str, ...] = ()
    positionals: tuple[Positional, ...] = ()
    recipe: dict = field(default_factory=dict)
    required: tuple[str, ...] = ()
    modes: dict[str, "Command"] = field(default_factory=dict)
    mode: str | None = None

    @property
    def prog(self) -> str:
        return self.name if self.mode is None else f"{self.name} {self.mode}"

    def default(self, name: str):
        return self.recipe[name] if name in self.recipe else _value(OPTIONS[name].default)


COMMANDS: dict[str, Command] = {}
# every command takes these: they decide how a job runs, not what it computes
ALWAYS = ("config", "print_config", "quiet", "verbose")


def _names(items: Iterable[str | Section]) -> tuple[str, ...]:
    out: list[str] = []
    for item in list(ALWAYS) + list(items):
        names = item.names if isinstance(item, Section) else (item,)
        for n in names:
            if n not in OPTIONS:
                raise ValueError(f"{n!r} is not a declared option (vthcl.options)")
            if n not in out:
                out.append(n)
    return tuple(out)


def _make(name: str, description: str, options, positionals, recipe, required, mode=None) -> Command:
    cmd = Command(name, inspect.cleandoc(description or ""), _names(options), tuple(positionals), {},
                  tuple(required), mode=mode)
    where = f"{cmd.prog} (its recipe)"
    for k, v in (recipe or {}).items():
        if k not in cmd.options:
            raise ValueError(f"{where}: {k!r} is not one of its options")
        cmd.recipe[k] = _coerce(OPTIONS[k], v, where)
    return cmd


def command(name: str, description: str, options: Iterable[str | Section] = (),
            positionals: Sequence[Positional] = (), recipe: Mapping | None = None,
            required: Sequence[str] = ()) -> Command:
    """Register the command ``name`` (its module path: ``vthcl.train``) and
    the options it takes: option names or whole sections. The command line
    options ``--config``, ``--print-config``, ``--quiet`` and ``--verbose`` come
    with every command."""
    COMMANDS[name] = _make(name, description, options, positionals, recipe, required)
    return COMMANDS[name]


def mode(name: str, mode_name: str, description: str, options: Iterable[str | Section] = (),
         positionals: Sequence[Positional] = (), recipe: Mapping | None = None,
         required: Sequence[str] = ()) -> Command:
    """Register a mode of the command ``name`` (``vthcl.eval knn``): a
    subcommand with options of its own. A new mode is a module that declares
    its section, calls this and is imported by its command."""
    parent = COMMANDS.get(name)
    if parent is None:
        raise ValueError(f"{name}: register the command before its modes")
    parent.modes[mode_name] = _make(name, description, options, positionals, recipe, required, mode=mode_name)
    return parent.modes[mode_name]


def root_command(name: str) -> Command:
    """The registered command ``name``, its module (whose path it is) imported on first use."""
    if name not in COMMANDS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise
        if name not in COMMANDS:
            raise UsageError(f"no command {name!r}")
    return COMMANDS[name]


def get_command(name: str, mode_name: str | None = None) -> Command:
    """The command ``name``, or for a command with modes its mode ``mode_name``."""
    cmd = root_command(name)
    if not cmd.modes:
        return cmd
    if mode_name not in cmd.modes:
        raise UsageError(f"{name}: give a mode, one of {', '.join(cmd.modes)} (got {mode_name!r})")
    return cmd.modes[mode_name]


# --------------------------------------------------------------------------- resolving
class Config(argparse.Namespace):
    """A command's resolved options as attributes (``cfg.epochs``); ``vars(cfg)``
    holds them alone. ``command`` is the command's name (with its mode) and
    ``given`` the names a config file, the command line or a keyword set (the
    others hold their defaults)."""
    __slots__ = ("command", "given")

    def __init__(self, values: Mapping[str, Any], command: str = "", given: Iterable[str] = ()):
        super().__init__(**values)
        self.command = command
        self.given = frozenset(given)


def resolve(name: str, /, **values) -> Config:
    """The configuration of command ``name``: declared defaults < the
    command's recipe < the YAML file ``config`` < ``values``. Modes are
    chosen with ``mode=``; positionals are passed by name. Every value is
    checked against its declaration (type, choices); a bad one, an unknown
    name or a missing required one raises UsageError."""
    values = dict(values)
    cmd = get_command(name, values.get("mode"))
    takes = set(cmd.options) | {p.name for p in cmd.positionals} | ({"mode"} if cmd.mode else set())
    unknown = sorted(set(values) - takes)
    if unknown:
        raise UsageError(f"{cmd.prog} takes no option {', '.join(unknown)}")
    out: dict[str, Any] = {"mode": cmd.mode} if cmd.mode else {}
    out.update({n: cmd.default(n) for n in cmd.options})
    given: set[str] = set()
    if values.get("config"):
        from_file = read_config(values["config"], cmd)
        out.update(from_file)
        given |= set(from_file)
    for k, v in values.items():
        if k in OPTIONS and k in cmd.options:
            v = _coerce(OPTIONS[k], v, cmd.prog)
        elif k != "mode":
            v = os.fspath(v) if isinstance(v, os.PathLike) else v
        out[k] = v
        given.add(k)
    missing = [p.name for p in cmd.positionals if out.get(p.name) is None]
    missing += [OPTIONS[n].flag for n in cmd.required if out.get(n) is None]
    if missing:
        raise UsageError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    return Config(out, cmd.prog, given)


def take(name: str, cfg: Config | None, values: Mapping) -> Config:
    """What a job function takes: a resolved Config, or keyword values to resolve (not both)."""
    if cfg is None:
        return resolve(name, **values)
    if values:
        raise TypeError(f"{name}: pass a Config or keyword options, not both")
    return cfg


def as_dict(cfg) -> dict:
    """The options of a Config (or any namespace) as a plain dict."""
    return dict(vars(cfg))


def kwargs(cfg: Config) -> dict:
    """A Config as the keyword arguments of its job's function (``make(**kwargs(cfg))``): what was
    given (the file's values included, ``config`` itself not), so the function resolves the same
    configuration and knows what was given."""
    return {k: getattr(cfg, k) for k in cfg.given if k not in ("config", "print_config")}


def read_config(path: str | os.PathLike, cmd: Command) -> dict:
    """The options in the YAML file ``path``, checked against ``cmd``'s: a key
    that is not one of its options, or that only the command line may set,
    is refused with the file, line and reason."""
    import yaml
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        node = yaml.compose(text)
        loaded = yaml.safe_load(text)
    except OSError as e:
        raise UsageError(f"cannot read the config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not a YAML file: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"{path} is not a mapping of options (option: value, one a line)")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    unknown = sorted(str(k) for k in loaded if k not in cmd.options or not OPTIONS[k].in_config)
    if unknown:
        why = [f"line {lines.get(k, '?')}: {k}: " + ("given on the command line only" if k in cmd.options
                                                    else f"not an option of {cmd.prog}") for k in unknown]
        raise UsageError(f"unknown keys in {path}: {unknown} ({'; '.join(why)})")
    return {k: _coerce(OPTIONS[k], v, f"{path}, line {lines.get(k, '?')}") for k, v in loaded.items()}


def _coerce(o: Option, v, where: str):
    """``v`` checked against ``o``'s declaration (and converted: a number
    written as text, a path object); raises UsageError naming ``where``."""
    def bad(why: str):
        raise UsageError(f"{where}: {o.name}: {why}")

    if v is None:
        if _value(o.default) is None:
            return None
        bad("needs a value")
    if o.listed:
        return [_one(o, x, bad) for x in (v if isinstance(v, (list, tuple)) else [v])]
    return _one(o, v, bad)


def _one(o: Option, v, bad):
    t = o.type
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if t is bool:
        if not isinstance(v, bool):
            bad(f"{v!r} is not true or false")
    elif t in (int, float):
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            bad(f"{v!r} is not a number")
        try:
            n = t(v)
        except ValueError:
            bad(f"{v!r} is not {'an integer' if t is int else 'a number'}")
        if t is int and isinstance(v, float) and n != v:
            bad(f"{v!r} is not an integer")
        v = n
    elif t is str:
        if not isinstance(v, str):
            bad(f"{v!r} is not text")
    elif isinstance(v, str):  # a parsing type of its own (a size such as 1GB)
        try:
            v = t(v)
        except (ValueError, argparse.ArgumentTypeError) as e:
            bad(str(e))
    choices = _value(o.choices)
    if choices is not None and v not in choices:
        bad(f"{v!r} is not one of {', '.join(map(str, choices))}")
    return v


# --------------------------------------------------------------------------- parsers
class _Parser(argparse.ArgumentParser):
    """argparse, its errors raised as UsageError (the CLI says them once, its way)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return str(v)


def help_text(o: Option, cmd: Command) -> str:
    """``o``'s help in ``cmd``: the declared text, then the default there."""
    default = cmd.default(o.name)
    text = o.help + ("" if default is None else f" (default: {_show(default)})")
    return text.replace("%", "%%")


def _add(p: argparse.ArgumentParser, cmd: Command) -> None:
    for pos in cmd.positionals:
        p.add_argument(pos.name, metavar=pos.metavar or pos.name.upper(), help=pos.help.replace("%", "%%"))
    groups: dict[str, Any] = {}
    for name in cmd.options:
        o = OPTIONS[name]
        if o.section not in groups:
            groups[o.section] = p.add_argument_group(SECTIONS[o.section].title)
        kw: dict[str, Any] = {"dest": o.name, "default": argparse.SUPPRESS, "help": help_text(o, cmd)}
        if o.type is bool:  # --no-X where a config file or the default can turn X on
            negatable = o.in_config or cmd.default(o.name) is not False
            kw["action"] = argparse.BooleanOptionalAction if negatable else "store_true"
        else:
            choices = _value(o.choices)
            kw.update(type=o.type, nargs=o.nargs, metavar=o.metavar,
                      choices=None if choices is None else tuple(choices))
            if o.append:
                kw["action"] = "append"
        groups[o.section].add_argument(o.flag, *o.aliases, **kw)


def parser(name: str) -> argparse.ArgumentParser:
    """The argparse parser of command ``name``, built from the declarations
    (every default suppressed: what it parses is what the command line gave)."""
    cmd = root_command(name)
    p = _Parser(prog=cmd.name, description=cmd.description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if not cmd.modes:
        _add(p, cmd)
        return p
    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE", title="modes",
                           parser_class=_Parser)
    for m in cmd.modes.values():
        sp = sub.add_parser(m.mode, help=m.description.split("\n\n")[0], description=m.description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.prog = m.prog
        _add(sp, m)
    return p


def parse(name: str, argv: Sequence[str] | None = None) -> Config:
    """``argv`` (default: the process's arguments) parsed and resolved for command ``name``."""
    given = vars(parser(name).parse_args(argv))
    return resolve(name, **given)


def dump(cfg: Config) -> str:
    """``cfg`` as YAML, itself a ``--config`` file: the options that only the
    command line sets are written as comments."""
    import yaml
    lines = [f"# {cfg.command}: the resolved options"]
    for k, v in vars(cfg).items():
        if k in ("config", "print_config"):
            continue
        text = yaml.safe_dump({k: v}, default_flow_style=False, sort_keys=False, width=1 << 16).rstrip()
        keep = k in OPTIONS and OPTIONS[k].in_config
        lines += [line if keep else "# " + line for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def to_argv(cfg: Config, names: Iterable[str]) -> list[str]:
    """The command-line flags that give ``names`` their values in ``cfg``
    (for a command still called through its argv)."""
    argv: list[str] = []
    for n in names:
        o, v = OPTIONS[n], getattr(cfg, n)
        if v is None:
            continue
        if o.type is bool:
            argv.append(o.flag if v else "--no-" + o.flag[2:])
        elif o.append:
            for x in v:
                argv += [o.flag, str(x)]
        elif o.listed:
            argv += [o.flag, *map(str, v)]
        else:
            argv += [o.flag, str(v)]
    return argv


# --------------------------------------------------------------------------- logging and the CLI
PACKAGES = ("vthcl", "loaders", "shard_tools", "benchmarks", "tests", "__main__")


class _Stderr(logging.StreamHandler):
    """A handler on the process's stderr of the moment (a test's capture, tqdm's redirect)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Format(logging.Formatter):
    """``module: message``; ``module: warning: message`` from warnings up."""

    def __init__(self, prog: str | None):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        name = self.prog if record.name == "__main__" and self.prog else record.name
        level = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
        text = f"{name}: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(quiet: bool = False, verbose: bool = False, prog: str | None = None) -> None:
    """Messages of the project's modules on stderr: info and up (``quiet``:
    warnings and up; ``verbose``: debug too); other libraries' from warnings
    up; Python warnings through the same handler. Calling it again replaces
    what it set up. For CLIs only: library code never configures logging."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(h)
    handler = _Stderr()
    handler.setFormatter(_Format(prog))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)


def cli(name: str, job: Callable[[Config], int | None], argv: Sequence[str] | None = None) -> int:
    """The one command line: ``argv`` parsed for command ``name`` (its modes
    included), ``--print-config`` answered, logging set up, then
    ``job(cfg)`` with the progress bars kept apart from the messages.
    Returns the exit code: an int the job returns (anything else: 0), 2 for
    a UsageError (``PROG: error: MESSAGE``), 1 for a JobError."""
    setup_logging(prog=name)
    errors = logging.getLogger(name)
    try:
        cfg = parse(name, argv)
    except UsageError as e:
        errors.error(str(e))
        return EXIT_USAGE
    if cfg.print_config:
        print(dump(cfg), end="")
        return EXIT_OK
    setup_logging(cfg.quiet, cfg.verbose, prog=name)
    log.debug("%s: %s", cfg.command, as_dict(cfg))
    from tqdm.contrib.logging import logging_redirect_tqdm
    try:
        with logging_redirect_tqdm():
            code = job(cfg)
    except UsageError as e:
        errors.error(str(e))
        return EXIT_USAGE
    except JobError as e:
        errors.error(str(e))
        return EXIT_ERROR
    return code if isinstance(code, int) and not isinstance(code, bool) else EXIT_OK


def auto_device(device: str | None) -> str:
    """``device``, or cuda where torch sees a GPU and cpu elsewhere."""
    if device:
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# =========================================================================== the declarations
# Every option of every job. A command lists the sections (or single options) it takes.
RUN = section(
    "run", "how the job runs",
    Option("config", str, None, "a YAML file of options (keys: the option names with _); the command line wins",
           metavar="FILE", in_config=False),
    Option("print_config", bool, False, "print the resolved options as YAML (a --config file) and exit",
           in_config=False),
    Option("quiet", bool, False, "warnings and errors only: no progress bars, no info messages"),
    Option("verbose", bool, False, "debug messages too"),
)

JOB = section(
    "job", "the job",
    Option("out", str, None, "the folder the job writes into (vthcl.eval ava-map: a .json file, or a folder)",
           metavar="DIR", in_config=False),
    Option("seed", int, 0, "seed of the job's random draws: the same seed and options give the same result"),
    Option("device", str, None, "where to compute (default: cuda where a GPU is visible, else cpu)",
           choices=("cpu", "cuda")),
    Option("workers", int, None, "worker processes (threads for DALI and FFCV) for the CPU work: decoding, "
           "packing, converting; per rank in training (default: the cores this process may use; 0: in the main "
           "process)", metavar="N", aliases=("--num-workers",)),
    Option("resume", bool, False, "continue a stopped run where it was: vthcl.train from OUT/last.pt, exactly; "
           "make_shards keeps the complete shards and packs the rest"),
)

DATA = section(
    "data", "data",
    Option("data", str, None, "the shards to pretrain on: a manifest.json, a shard folder or a brace pattern "
           "(a .beton for --backend ffcv)", metavar="SHARDS", in_config=False),
    Option("train", str, None, "the labelled shards to fit on (a probe, kNN's neighbours, fine-tuning)",
           metavar="SHARDS", in_config=False),
    Option("val", str, None, "the labelled shards to test on", metavar="SHARDS", in_config=False),
    Option("backend", str, "pyav", "the clip loader (loaders.build_loader)", choices=From("loaders", "BACKENDS")),
    Option("num_videos", int, 1024, "how many videos: the synthetic backend's without --data; make_synthetic's "
           "to render", metavar="N"),
)

CLIP = section(
    "clip", "clips (loaders.sampling)",
    Option("tau", int, From("loaders.sampling", "ClipSpec.tau"),
           "the slow clip takes every tau-th frame of a window of slow_frames x tau frames"),
    Option("alpha", int, From("loaders.sampling", "ClipSpec.alpha"),
           "the fast clip takes every (tau/alpha)-th frame: alpha times the slow clip's frames"),
    Option("slow_frames", int, From("loaders.sampling", "ClipSpec.slow_frames"), "frames of the slow clip"),
    Option("crop_size", int, From("loaders", "build_loader", "crop_size"),
           "side of the square crop in pixels (vthcl.eval: a checkpoint's own unless given)"),
    Option("independent_crops", bool, False, "a crop of its own for the slow clip (the paper: one crop for both)"),
    Option("color_jitter", float, 0.0, "colour jitter drawn independently for the two clips: brightness, "
           "contrast and saturation factors in [1-S, 1+S], grayscale with p=0.2, one draw per clip (0: off)",
           metavar="S"),
)

MODEL = section(
    "model", "the model (vthcl.model)",
    Option("arch", str, From("vthcl.model", "VTHCL", "arch"),
           "slow and fast pathways (vthcl.eval: a checkpoint's own unless given)",
           choices=From("vthcl.model", "STAGE_BLOCKS")),
    Option("width", int, From("vthcl.model", "VTHCL", "width"),
           "stem channels, 64 in the paper (vthcl.eval: a checkpoint's own unless given)"),
    Option("levels", int, From("vthcl.model", "VTHCL", "levels"), "hierarchy levels: 1 (res5), 2 (res4, res5) "
           "or 3 (res3, res4, res5)", choices=(1, 2, 3)),
    Option("input", str, From("vthcl.model", "VTHCL", "input"),
           "RGB frames (the paper) or residual frames, x[t] - x[t-1]", choices=("rgb", "residual")),
    Option("head", str, From("vthcl.model", "VTHCL", "head"), "φ: fc-relu-fc (mlp, the paper's hierarchy) or "
           "one fc, a 1x1x1 convolution on the map (linear: the paper's single-level ICM setting)",
           choices=From("vthcl.model", "HEADS")),
)

METHOD = section(
    "method", "the loss and memory banks (vthcl.memory)",
    Option("num_negatives", int, From("vthcl.memory", "MemoryBank", "num_negatives"),
           "negatives drawn per step", metavar="N"),
    Option("temperature", float, From("vthcl.memory", "MemoryBank", "temperature"), "T of the NCE softmax"),
    Option("bank_momentum", float, From("vthcl.memory", "MemoryBank", "momentum"),
           "m of the bank update bank[i] <- normalise(m bank[i] + (1 - m) q)"),
    Option("level_weights", float, None, "the weight of each level's loss, res3 first (default: 1 each)",
           nargs="+", metavar="W"),
    Option("bank_dtype", str, "fp32", "how the banks are stored", choices=("fp32", "bf16")),
    Option("shard_banks", bool, False, "each rank keeps n/world_size rows of the banks"),
    Option("positive", str, From("vthcl.memory", "MemoryBank", "positive"),
           "the positive: the other pathway's bank entry (the paper) or, experimental, the other clip's "
           "current feature (docs/results.md)", choices=("bank", "batch")),
)

OPTIM = section(
    "optim", "optimisation",
    Option("epochs", int, 200, "passes over the training data", metavar="N"),
    Option("max_steps", int, None, "stop after this many steps (the schedule still spans --epochs)", metavar="N"),
    Option("batch_size", int, 256, "clips per step, all ranks together (split across them)", metavar="N"),
    Option("lr", float, None, "learning rate (unset: --base-lr x batch size / 256)"),
    Option("base_lr", float, 0.03, "the learning rate for a batch of 256, scaled linearly"),
    Option("momentum", float, 0.9, "SGD momentum"),
    Option("weight_decay", float, 1e-4, "SGD weight decay"),
    Option("precision", str, None, "autocast (default: bf16 on a GPU, fp32 on a CPU)",
           choices=("fp32", "bf16", "fp16")),
    Option("channels_last", bool, None, "channels_last_3d memory format (default: on a GPU)"),
    Option("compile", bool, False, "torch.compile the model"),
    Option("max_nonfinite", int, 5, "stop after this many non-finite losses in a row", metavar="N"),
)

RECORD = section(
    "record", "what a training run records",
    Option("log_every", int, 1, "a metrics.jsonl line every N steps", metavar="N"),
    Option("ckpt_every", int, 500, "OUT/last.pt every N steps (and at every epoch's end)", metavar="N"),
    Option("tensorboard", bool, True, "TensorBoard logs in OUT/tb"),
    Option("checkpoint", str, None, "a vthcl.train checkpoint: last.pt (vthcl.eval also: slow_encoder.pt)",
           metavar="FILE", in_config=False),
    Option("trust_checkpoint", bool, False, "load a checkpoint that needs full unpickling (one holding NumPy "
           "objects): it can run any code it carries, so only for files you trust", in_config=False),
)

EVAL = section(
    "eval", "evaluation (vthcl.eval)",
    Option("init", str, None, "the encoder's initial weights: vthcl:PATH (vthcl.train's last.pt or "
           "slow_encoder.pt; what --checkpoint gives), random, pyslowfast:PATH (a PySlowFast Slow R50 checkpoint), "
           "pytorchvideo:PATH (its slow_r50 state dict), imagenet2d:PATH (a torchvision ResNet-18/50 state dict "
           "inflated to 3D)", metavar="SPEC", in_config=False),
    Option("random_init", bool, False, "evaluate the same architecture untrained (the baseline)"),
    Option("single_frame", bool, False, "an appearance-only control: the centre frame repeated"),
    Option("num_clips", int, 10, "uniform clips averaged per video at test (finetune)", metavar="N"),
)

TASKS = section(
    "tasks", "downstream tasks (vthcl.eval detect, anticipate, ava-map)",
    Option("milestones", float, None, "epochs at which the learning rate is divided by 10 (default: the mode's)",
           nargs="+", metavar="EPOCH"),
    Option("warmup_epochs", float, 0.0, "a linear warm-up of the learning rate over the first N epochs",
           metavar="N"),
    Option("warmup_start_lr", float, 0.0, "the learning rate the warm-up starts from"),
    Option("dropout", float, 0.5, "dropout before the task's last layers"),
    Option("detection_score_thresh", float, 0.9, "detect: the person proposals scoring at least this are "
           "boxes (training: with IoU >= 0.9 to a ground-truth box; test: every one, a keyframe's best where "
           "none is)"),
    Option("eval_short_side", int, From("loaders.sampling", "KeyframeClips", "eval_short_side"),
           "detect: the short side of the whole frames evaluated", metavar="PX"),
    Option("tau_a", float, From("loaders.sampling", "ObservedClips", "tau_a"),
           "anticipate: seconds from the observed window's end to the segment's start"),
    Option("tau_o", float, From("loaders.sampling", "ObservedClips", "tau_o"),
           "anticipate: seconds observed"),
    Option("hidden", int, 512, "anticipate: the shared MLP's width", metavar="N"),
    Option("labelmap", str, None, "AVA's label map of evaluated classes (ava_action_list_v2.2*.pbtxt); make_shards "
           "records it with --layout ava", metavar="PBTXT", in_config=False),
    Option("exclusions", str, None, "AVA's keyframes to leave out (ava_*_excluded_timestamps_v2.2.csv)",
           metavar="CSV", in_config=False),
    Option("groundtruth", str, None, "ava-map: the ground-truth CSV (ava_val_v2.2.csv)", metavar="CSV",
           in_config=False),
    Option("detections", str, None, "ava-map: the detections CSV (video_id, sec, x1, y1, x2, y2, action_id, "
           "score)", metavar="CSV", in_config=False),
)

EXPORT = section(
    "export", "exporting an encoder (vthcl.export)",
    Option("to", str, None, "the layout to write", choices=("pyslowfast", "pytorchvideo")),
)

ICM = section(
    "icm", "Instance Correspondence Maps (vthcl.icm_maps)",
    Option("video", str, None, "draw the maps of this video's centre clip (one PNG per level)", metavar="FILE",
           in_config=False),
    Option("score", int, 0, "score the maps on K synthetic videos per class against the actor's position "
           "(OUT/icm_score.json: actor_auc per level and pathway, for the checkpoint and a random init)",
           metavar="K"),
)

DEMO = section(
    "demo", "the demo (vthcl.demo)",
    Option("quick", bool, False, "a small, fast run (fewer inputs, epochs and repeats): a smoke test"),
    Option("ablation", bool, False, "add a table over alpha and levels (longer)"),
    Option("paper", bool, False, "the paper's RGB input instead of the demo's residual-frame input"),
    Option("preset", str, "default", "signal: 3 seeds of longer pretraining, alpha=2 vs alpha=1 vs random; "
           "signal-aug: the same with independent colour jitter and crops for the two clips; signal-long: "
           "the signal preset with 3x the epochs (README: how long each takes)",
           choices=("default", "signal", "signal-aug", "signal-long")),
    Option("fresh", bool, False, "delete OUT first"),
)

BENCH = section(
    "bench", "benchmarks (benchmarks.run)",
    Option("suite", str, "all", "the suite to run", choices=("loader", "decode", "step", "e2e", "loss", "shards",
                                                              "scale", "all")),
    Option("videos", str, None, "the original videos the shards were packed from: a flat folder or a dataset "
           "tree", metavar="DIR", in_config=False),
    Option("shards", str, None, "packed shards (manifest.json, folder, pattern)", metavar="SHARDS",
           in_config=False),
)

SYNTHETIC = section(
    "synthetic", "synthetic videos (shard_tools.make_synthetic)",
    Option("task", str, "tempo", "tempo: short classified clips; ava, epic: long videos with AVA v2.2 or "
           "EPIC-Kitchens annotations (shard_tools/synthetic_tasks.py)", choices=("tempo", "ava", "epic")),
    Option("classes", int, 8, "classes: actor family x motion pattern (tempo)", metavar="N"),
    Option("frames", int, 96, "frames per video (tempo)", metavar="N"),
    Option("size", int, None, "rendered frame height in pixels (tempo 96, square; ava 96; epic 72)", metavar="PX"),
    Option("vp9", bool, False, "VP9/WebM videos and shards instead of H.264 (tempo)"),
    Option("val_fraction", float, 0.25, "the share of videos in OUT/val (tempo)"),
    Option("val_videos", int, None, "ava: val videos (3); epic: val videos per participant (1)", metavar="N"),
    Option("duration", float, None, "seconds per long video (ava 40, epic 60)"),
    Option("video_fps", int, None, "the frame rate the long videos are written at (ava 25, epic 50)"),
    Option("frame_width", int, None, "the long videos' frame width (ava 4:3, epic 16:9 of --size)", metavar="PX"),
    Option("participants", int, None, "epic: participants (2)", metavar="N"),
    Option("epic_columns", int, 100, "epic: pack the EPIC-55 or the EPIC-100 files (both are written)",
           choices=(55, 100)),
    Option("pack", bool, True, "pack OUT/train and OUT/val (--no-pack: write the videos and annotations only)"),
)

FFCV = section(
    "ffcv", "FFCV datasets (shard_tools.make_ffcv)",
    Option("quality", int, 90, "JPEG quality of the frames, 1..100"),
)


def parse_size(text: str) -> int:
    """A size in bytes: ``1GB`` (10^9), ``2GiB`` (2^30), ``500MB``, ``123``."""
    import re
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (try 1GB, 500MB, 2GiB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index((m.group(2) or " ").upper()))


PACK = section(
    "pack", "packing (shard_tools.make_shards; make_ffcv and ray_pack pass them on)",
    Option("layout", str, "auto", "how SRC is laid out: kinetics (youtube_id CSV), folders (class folders), "
           "csv (path,label), ava, epic (long videos with time-anchored events: events.jsonl); auto picks one of "
           "the first three", choices=("auto", "kinetics", "folders", "csv", "ava", "epic")),
    Option("annotations", str, None, "Kinetics annotation CSV, a path,label CSV, AVA's ava_{train,val}_v2.2.csv "
           "or EPIC-Kitchens' EPIC_train_action_labels.csv / EPIC_100_*.csv", metavar="CSV", in_config=False),
    Option("proposals", str, None, "ava: person proposals with scores (PySlowFast's predicted-box CSVs)",
           metavar="CSV", in_config=False),
    Option("time_offset", float, 0.0, "ava/epic: the annotations' time of each source's first frame (900 for "
           "AVA's 15-minute cuts)"),
    Option("margin", float, None, "ava/epic: seconds packed beyond the span the events need, at each end "
           "(default: half a 64-frame window at --fps)"),
    Option("frame_rate", float, None, "the rate of videos given as folders of numbered frames (12 for "
           "Something-Something V1)"),
    Option("split_file", str, None, "UCF101 trainlist/testlist or HMDB51 *_test_splitN.txt (a file, glob or "
           "folder; repeatable)", metavar="FILE", append=True, in_config=False),
    Option("split", str, None, "which split to take from --split-file (HMDB51) or the Kinetics CSV's split "
           "column", choices=("train", "val", "test")),
    Option("fps", float, None, "constant output frame rate (default 30)"),
    Option("short_side", int, None, "output short side in pixels, aspect kept (default 256; 0 keeps the size)",
           metavar="PX"),
    Option("codec", str, "h264", "vp9 shards decode on DALI's CPU decoder; copy keeps the stream as it is",
           choices=("h264", "vp9", "copy")),
    Option("gop", int, 16, "closed GOPs: a keyframe every N frames", metavar="N"),
    Option("crf", int, None, "quality (default: h264 23, vp9 32)"),
    Option("x264_preset", str, "veryfast", "x264's speed/size preset"),
    Option("bframes", int, None, "x264 B-frames (default: the preset's); 0: decode order is display order",
           metavar="N"),
    Option("b_refs", bool, False, "let x264 use B-frames as references (its B-pyramid); by default none is, so "
           "a loader skips decoding the B-frames a clip does not keep"),
    Option("samples_per_shard", int, None, "samples per shard (instead of --shard-size)", metavar="N"),
    Option("shard_size", parse_size, None, "bytes per shard, e.g. 1GB (the default)", metavar="SIZE"),
    Option("prefix", str, "train", "shard names: PREFIX-000000.tar"),
    Option("part", int, None, "pack part I (0-based) of --parts N: a deterministic slice of the inputs into "
           "files of its own in OUT; then shard_tools.merge_parts OUT", metavar="I"),
    Option("parts", int, None, "how many parts the inputs are packed in", metavar="N"),
    Option("min_frames", int, 1, "shorter videos are reported as failed", metavar="N"),
    Option("square_pixels", bool, False, "stretch non-square pixels to their display aspect (by default the "
           "stored grid is kept and the ratio recorded)"),
    Option("unlabeled", bool, False, "ignore labels: every sample gets label -1"),
)

RAY = section(
    "ray", "packing as Ray tasks (shard_tools.ray_pack)",
    Option("address", str, None, "a running Ray cluster (ray start --head, auto, ray://HOST:10001; default: a "
           "local instance)", in_config=False),
    Option("num_cpus", int, None, "CPUs of the local Ray instance (default: all); not with --address",
           metavar="N"),
)
