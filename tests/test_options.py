"""One way to configure and call every job: the declarations, the parsers built from them, config files,
the CLI's errors and logging; and what the package's source may not hold (messages printed to stderr, dated
notes)."""
from __future__ import annotations

import ast
import importlib
import io
import logging
import re
import tokenize
from pathlib import Path

import pytest

from tests.conftest import REPO
from vthcl import options
from vthcl.options import UsageError

# Phase 2 of the options work converts these (they are being rewritten meanwhile); until then they keep their
# own parsers and messages. A strict xfail: converting one fails its xfail, and it leaves this list.
PENDING: set[str] = set()
PENDING_FILES = {f"{m.replace('.', '/')}.py" for m in PENDING}


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: name -> module (read as text: tomllib needs Python 3.11)."""
    text = (REPO / "pyproject.toml").read_text()
    block = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r'^([\w-]+)\s*=\s*"([\w.]+):main"', block, re.M)}


SCRIPTS = console_scripts()
COMMANDS = sorted(m for m in SCRIPTS.values() if m not in PENDING)


def _xfail_pending(module: str):
    return pytest.param(module, marks=pytest.mark.xfail(module in PENDING, strict=True,
                                                         reason="phase 2 converts it to vthcl.options"))


def test_every_job_has_a_console_script():
    assert set(SCRIPTS) == {"vthcl-train", "vthcl-eval", "vthcl-demo", "vthcl-icm-maps", "vthcl-make-shards",
                            "vthcl-merge-parts", "vthcl-ray-pack", "vthcl-make-ffcv", "vthcl-make-synthetic",
                            "vthcl-bench", "vthcl-export", "vthcl-reindex"}
    for module in SCRIPTS.values():
        assert callable(importlib.import_module(module).main)


@pytest.mark.parametrize("module", [_xfail_pending(m) for m in sorted(SCRIPTS.values())])
def test_each_job_takes_its_options_from_the_declarations(module):
    importlib.import_module(module)
    assert module in options.COMMANDS


def _actions(parser):
    """(command, action) for every option of ``parser`` and of its modes' parsers."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for sub in action.choices.values():
                yield from _actions(sub)
        elif action.option_strings and action.dest != "help":
            yield parser.prog, action


def test_the_same_option_has_the_same_flags_default_and_help_in_every_command():
    """Walk the parsers of every job: an option (dest) has the same flags, type, choices and help text in
    every command that takes it, that text is its declaration's, and a flag means one option everywhere. Its
    default is the declared one except where a command's recipe sets its own (then --help says so)."""
    seen: dict[str, tuple] = {}
    flags: dict[str, str] = {}
    for module in COMMANDS:
        for prog, action in _actions(options.parser(module)):
            o = options.OPTIONS.get(action.dest)
            assert o is not None, f"{prog}: {action.option_strings} is not declared in vthcl.options"
            text = action.help.replace("%%", "%")
            assert text.startswith(o.help), f"{prog} {o.flag}: help differs from the declaration"
            shown = re.fullmatch(r"( \(default: (.*)\))?", text[len(o.help):])
            assert shown, f"{prog} {o.flag}: help differs from the declaration"
            default = shown.group(2)
            cmd = options.get_command(*prog.split(" ", 1))
            if o.name in cmd.recipe:
                assert default == options._show(cmd.recipe[o.name]), (prog, o.flag)
            else:
                declared = o.get_default()
                assert default == (None if declared is None else options._show(declared)), (prog, o.flag)
            shape = (tuple(action.option_strings[:1]), action.type, action.choices, action.nargs, o.help)
            assert seen.setdefault(o.name, shape) == shape, f"{prog}: {o.flag} differs from another command's"
            for flag in action.option_strings:
                assert flags.setdefault(flag, o.name) == o.name, f"{flag} names two options"
    # what every command shares is there in every command
    for name in ("config", "print_config", "quiet", "verbose"):
        assert name in seen
    assert {"workers", "seed", "out", "device"} <= set(seen)
    assert flags["--num-workers"] == "workers"  # the old spelling, kept as an alias


def test_layers_default_recipe_file_command_line(tmp_path):
    cfg = options.resolve("vthcl.eval", mode="finetune", train="a", val="b", random_init=True)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.out) == (100, 64, 0.1, "runs/eval")  # the recipe
    assert options.resolve("vthcl.train").epochs == 200  # the declared default
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nbatch_size: 8\nweight_decay: 1e-5\n")
    cfg = options.parse("vthcl.train", ["--config", str(f), "--batch-size", "4"])
    assert (cfg.epochs, cfg.batch_size, cfg.weight_decay) == (7, 4, 1e-5)  # a number as text is converted
    assert cfg.given == {"config", "epochs", "batch_size", "weight_decay"}
    assert options.parse("vthcl.train", ["--num-workers", "3"]).workers == 3


def test_print_config_is_a_config_file(tmp_path, capsys):
    from vthcl.train import main
    argv = ["--data", "x", "--epochs", "3", "--level-weights", "1", "0.5", "--no-tensorboard", "--print-config"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "epochs: 3\n" in text and "# data: x\n" in text and "tensorboard: false\n" in text
    (tmp_path / "c.yaml").write_text(text)
    again = options.resolve("vthcl.train", config=tmp_path / "c.yaml", data="x")
    first = options.parse("vthcl.train", argv)
    assert {k: v for k, v in vars(again).items() if k not in ("config", "print_config")} == {
        k: v for k, v in vars(first).items() if k not in ("config", "print_config")}


@pytest.mark.parametrize("text,match", [
    ("epochs: many\n", r"bad\.yaml, line 1: epochs: 'many' is not an integer"),
    ("epochs: 2\nbackend: tape\n", r"bad\.yaml, line 2: backend: 'tape' is not one of dali, pyav"),
    ("compile: maybe\n", r"compile: 'maybe' is not true or false"),
    ("- epochs\n", r"bad\.yaml is not a mapping"),
    ("epochs: [1\n", r"bad\.yaml: not a YAML file"),
    ("epochs: 2\nvideo: x.mp4\n", r"unknown keys in .*bad\.yaml: \['video'\] \(line 2: video: not an option of "
                                  r"vthcl\.train\)"),
    ("data: /elsewhere\n", r"\['data'\] \(line 1: data: given on the command line only\)"),
    ("trust_checkpoint: true\n", r"trust_checkpoint: given on the command line only"),
])
def test_a_bad_config_file_names_the_file_line_and_reason(tmp_path, text, match):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(UsageError, match=match):
        options.resolve("vthcl.train", config=tmp_path / "bad.yaml")


def test_keywords_are_checked_like_the_command_line():
    with pytest.raises(UsageError, match="takes no option num_workers"):
        options.resolve("vthcl.train", num_workers=2)
    with pytest.raises(UsageError, match="levels: 4 is not one of 1, 2, 3"):
        options.resolve("vthcl.train", levels=4)
    with pytest.raises(UsageError, match="--train, --val are required"):
        options.resolve("vthcl.eval", mode="knn")
    with pytest.raises(UsageError, match="give a mode, one of linear, knn, retrieval, finetune"):
        options.resolve("vthcl.eval")
    assert options.resolve("vthcl.train", data=Path("/a/b")).data == "/a/b"


def test_defaults_owned_elsewhere_are_read_from_there():
    from loaders import build_loader
    from loaders.sampling import ClipSpec
    from vthcl.memory import MemoryBank
    cfg = options.resolve("vthcl.train")
    assert (cfg.tau, cfg.alpha, cfg.slow_frames) == (ClipSpec().tau, ClipSpec().alpha, ClipSpec().slow_frames)
    import inspect
    assert cfg.crop_size == inspect.signature(build_loader).parameters["crop_size"].default
    bank = inspect.signature(MemoryBank).parameters
    assert (cfg.num_negatives, cfg.temperature, cfg.bank_momentum) == (
        bank["num_negatives"].default, bank["temperature"].default, bank["momentum"].default)


@pytest.mark.parametrize("module,argv,message", [
    ("vthcl.train", ["--bogus"], r"vthcl\.train: error: unrecognized arguments: --bogus \(see vthcl\.train --help\)"),
    ("vthcl.train", ["--backend", "pyav", "--quiet"], r"vthcl\.train: error: --data SHARDS is required"),
    ("vthcl.eval", ["knn", "--train", "a", "--val", "b"],
     r"vthcl\.eval: error: give --init \(or --checkpoint\), or --random-init"),
    ("benchmarks.run", ["--suite", "e2e"], r"benchmarks\.run: error: --suite e2e needs --shards"),
    ("shard_tools.make_synthetic", [], r"shard_tools\.make_synthetic: error: .*OUT"),
])
def test_a_usage_error_is_one_line_on_stderr_and_exit_2(module, argv, message, capsys):
    assert importlib.import_module(module).main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_logging_quiet_and_verbose(capsys):
    log = logging.getLogger("vthcl.somewhere")
    try:
        options.setup_logging(prog="x")
        log.info("said")
        log.debug("hidden")
        options.setup_logging(quiet=True)
        log.info("not said")
        log.warning("warned")
        options.setup_logging(verbose=True)
        log.debug("details")
        err = capsys.readouterr().err
        assert err.splitlines() == ["vthcl.somewhere: said", "vthcl.somewhere: warning: warned",
                                    "vthcl.somewhere: details"]
    finally:
        options.setup_logging()


# ----------------------------------------------------------------------------- the source
SOURCES = sorted(str(p.relative_to(REPO)) for d in ("vthcl", "loaders", "shard_tools", "benchmarks")
                 for p in (REPO / d).rglob("*.py"))
DATE = re.compile(r"\b(19|20)\d\d-(0[1-9]|1[0-2])(-[0-3]\d)?\b|\b(January|February|March|April|May|June|July|"
                  r"August|September|October|November|December) (19|20)\d\d\b")


def _stderr_prints(tree: ast.AST) -> list[int]:
    """Lines that write a message to stderr themselves: print(..., file=sys.stderr), a tqdm bar's
    write(..., file=sys.stderr), sys.stderr.write(...), traceback.print_exc()."""
    def is_stderr(node):
        return isinstance(node, ast.Attribute) and node.attr == "stderr" and isinstance(node.value, ast.Name) \
            and node.value.id == "sys"
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if any(k.arg == "file" and is_stderr(k.value) for k in node.keywords):
            lines.append(node.lineno)
        elif isinstance(node.func, ast.Attribute) and (
                (node.func.attr == "write" and is_stderr(node.func.value))
                or (node.func.attr == "print_exc" and getattr(node.func.value, "id", "") == "traceback")):
            lines.append(node.lineno)
    return lines


def _xfail_pending_file(path: str):
    return pytest.param(path, marks=pytest.mark.xfail(path in PENDING_FILES, strict=True,
                                                      reason="phase 2 moves its messages to logging"))


@pytest.mark.parametrize("path", [_xfail_pending_file(p) for p in SOURCES])
def test_messages_go_through_logging(path):
    assert _stderr_prints(ast.parse((REPO / path).read_text())) == []


def test_the_scan_finds_what_it_looks_for():
    source = ("import sys, traceback\nprint('a', file=sys.stderr)\nbar.write('b', file=sys.stderr)\n"
              "sys.stderr.write('c')\ntraceback.print_exc()\nprint('result')\n# 2026-12-01\n")
    assert _stderr_prints(ast.parse(source)) == [2, 3, 4, 5]
    assert _dated_notes(source) == [7]


def _dated_notes(source: str) -> list[int]:
    """Lines of comments and string literals (docstrings, messages, help) that carry a date."""
    return [tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type in (tokenize.COMMENT, tokenize.STRING) and DATE.search(tok.string)]


@pytest.mark.parametrize("path", SOURCES)
def test_no_dated_notes_in_the_code(path):
    """History and measurements with their dates live in docs/ and commit messages."""
    assert _dated_notes((REPO / path).read_text()) == []
