"""Hydra entry point: ``python -m hrnn_lit [overrides]`` (config root: conf/).

Errors a user can fix come out as one line and exit status 2: hrnn_lit's own (``HrnnError``),
unknown options of a config group (``model=nope``), and unknown config keys, which Hydra
reports either at composition (``key=value`` on a key the config lacks) or, after
``+key=value``, as a ``TypeError`` of the class that receives it. Both become
``error: unknown key K; did you mean M?`` with M the closest key of the composed config;
under a node built from a ``_target_`` (``model.net``: the network's own arguments) with no
close key, the line says how to add K: ``+K=value``. A multirun's first job is composed
before the sweep starts, so the same line stops it early.
"""

from __future__ import annotations

import difflib
import io
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hrnn_lit.errors import HrnnError

CONF = Path(__file__).resolve().parents[1] / "conf"

_UNKNOWN_AT_COMPOSE = re.compile(r"Could not override '([^']+)'")
_UNKNOWN_KWARG = re.compile(r"unexpected keyword argument '([^']+)'")
_FULL_KEY = re.compile(r"full_key: (\S+)")
_UNKNOWN_OPTION = re.compile(r"Could not find '([^']+/[^']+)'")


def config_keys(cfg: DictConfig) -> list[str]:
    """Every dotted key of a config (interpolations left unresolved), Hydra's node excluded."""
    keys: list[str] = []

    def walk(node, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            keys.append(key)
            if isinstance(v, dict):
                walk(v, f"{key}.")

    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    walk(container, "")
    return keys


def unknown_key_line(key: str, keys: list[str], add: str | None = None) -> str:
    """``error: unknown key K[; did you mean M?]``: M is the sibling of K with the closest
    name, or, where K's parent is itself unknown, the closest key of the config. ``add``:
    the hint used where no sibling is close (``add_hint``: K's parent takes arguments the
    config leaves out, which ``+K=value`` adds)."""
    keys = [k for k in keys if k != key]  # a key added with +key=value is in the config
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    if siblings:
        match = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1)]
    else:
        match = difflib.get_close_matches(key, keys, n=1)
    hint = f"; did you mean {match[0]}?" if match else f"; {add}" if add else ""
    return f"error: unknown key {key}{hint}"


def _arguments(target: str) -> list[str] | None:
    """Keyword arguments of the callable a ``_target_`` names; None where it takes any
    (``**kwargs``) or cannot be imported (quietly: this only picks a hint)."""
    import importlib
    import inspect

    parts = target.split(".")
    try:
        for i in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        else:
            return None
        for name in parts[i:]:
            obj = getattr(obj, name)
        params = inspect.signature(obj).parameters.values()
    except Exception:
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def add_hint(key: str, value: str, cfg: DictConfig | None) -> str | None:
    """For a key the config lacks under a node that is built from a ``_target_`` (e.g.
    ``model.net``, whose keys are the network's own arguments): ``+key=value`` where the
    target takes that argument, the closest argument it takes otherwise; else None."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if cfg is not None and parent else None
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        return None
    target = str(node["_target_"])
    args = _arguments(target)
    if args is None:
        return f"a key {parent} leaves out is added with +{key}={value}"
    if leaf in args:
        return f"{target} takes {leaf}: add it with +{key}={value}"
    match = difflib.get_close_matches(leaf, args, n=1)
    return f"did you mean +{parent}.{match[0]}={value}?" if match else None


def _overrides(argv: list[str]) -> list[str]:
    """The ``key=value`` overrides of a command line (Hydra's flags and their values left out)."""
    takes_value = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir"}
    takes_value |= {"-c", "--cfg", "-p", "--package", "--info", "--experimental-rerun"}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in takes_value:
            skip = True
        elif not arg.startswith("-") and "=" in arg:
            out.append(arg)
    return out


def _composed(overrides: list[str]) -> DictConfig | None:
    """conf/ composed with these overrides (None where they do not compose)."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=overrides)
    except Exception:
        return None


def compose_error_line(message: str, overrides: list[str]) -> str | None:
    """Hydra's "Key ... is not in struct" and "Could not find 'group/option'" failures as
    one line, else None."""
    option = _UNKNOWN_OPTION.search(message)
    if option is not None:
        group, name = option.group(1).rsplit("/", 1)
        known = re.findall(r"^\t(\S+)$", message.partition("Available options")[2], re.M)
        match = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {group}={match[0]}? " if match else ""
        return f"error: unknown option {group}={name}; {hint}options: {', '.join(known)}"
    m = _UNKNOWN_AT_COMPOSE.search(message)
    if m is None or "not in struct" not in message:
        return None
    key = m.group(1)
    others = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    value = next((o.split("=", 1)[1] for o in overrides if o not in others), "...")
    cfg = _composed(others)
    keys = config_keys(cfg) if cfg is not None else []
    line = unknown_key_line(key, keys)
    if line.endswith(key):  # no close key: an argument the config leaves out? (imports it)
        line = unknown_key_line(key, keys, add_hint(key, value, cfg))
    return line


def first_job_overrides(argv: list[str]) -> list[str]:
    """The overrides of a multirun's first job: each sweep (``a,b``, ``range``, ``choice``)
    replaced by its first value; sweeps that cannot be enumerated (``interval``) left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(_overrides(argv)):
        if not o.is_sweep_override():
            out.append(o.input_line)
            continue
        try:
            out.append(f"{o.get_key_element()}={next(o.sweep_string_iterator())}")
        except Exception:  # an interval sweep: no first value
            continue
    return out


def multirun_error_line(argv: list[str]) -> str | None:
    """Compose a multirun's first job as Hydra will, and turn an unknown key or option into
    one line (None: it composes, or fails otherwise and Hydra reports it)."""
    from hydra import compose, initialize_config_dir

    overrides: list[str] = []
    try:
        overrides = first_job_overrides(argv)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose("config", overrides=overrides)
    except Exception as e:
        text = "\n".join(str(x) for x in (e, e.__cause__) if x is not None)
        try:
            return compose_error_line(text, overrides)
        except Exception:
            return None
    return None


def kwarg_error_line(error: BaseException, cfg: DictConfig) -> str | None:
    """An instantiated class's "unexpected keyword argument" failure as one line, else None."""
    text = "\n".join(str(e) for e in (error, error.__cause__) if e is not None)
    m, node = _UNKNOWN_KWARG.search(text), _FULL_KEY.search(text)
    if m is None or node is None:
        return None
    return unknown_key_line(f"{node.group(1)}.{m.group(1)}", config_keys(cfg))


class _HeldStderr:
    """Keeps what is written to stderr until the task starts, so that a composition error
    that hrnn_lit rewrites as one line is not printed twice."""

    def __init__(self) -> None:
        self.real = sys.stderr
        self.buffer = io.StringIO()
        sys.stderr = self.buffer

    def release(self) -> str:
        """Restore stderr; return what was held (not yet written)."""
        if sys.stderr is self.buffer:
            sys.stderr = self.real
        text, self.buffer = self.buffer.getvalue(), io.StringIO()
        return text


_held: _HeldStderr | None = None


def _release_stderr() -> None:
    if _held is not None:
        sys.stderr.write(_held.release())


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    _release_stderr()
    from hrnn_lit.quiet import quiet
    from hrnn_lit.run import run  # heavy imports after Hydra has parsed the command line

    quiet()
    try:
        results = run(cfg)
    except HrnnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        line = kwarg_error_line(e, cfg)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(2)
    metric = cfg.get("optimized_metric")
    return results.get(metric) if metric else None


def cli() -> None:
    """``main`` with composition errors about unknown keys turned into one line."""
    global _held
    argv = sys.argv[1:]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if multirun:  # a sweep's jobs print as they go: check its first job's config up front
        line = multirun_error_line(argv)
        if line is not None:
            print(line, file=sys.stderr)
            sys.exit(2)
    _held = None if multirun else _HeldStderr()
    try:
        main()
    except SystemExit as e:
        held = _held.release() if _held is not None else ""
        line = compose_error_line(held, _overrides(argv)) if e.code not in (0, None) else None
        if line is not None:
            print(line, file=sys.stderr)
            sys.exit(2)
        sys.stderr.write(held)
        raise
    finally:
        _release_stderr()


if __name__ == "__main__":
    cli()
