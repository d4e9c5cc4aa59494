"""The `jaxinduct` command: one typed config per command, and a main(config) that calls the Python API.

Each command is a frozen dataclass whose fields are its flags: names, types, defaults and
help all come from the fields (a default is written once, in the field), parsed by tyro.
`ScanConfig` (`jaxinduct.engine.scan`) is also the scan engine's own input, so a scan
started from Python and one started from the shell take the same value.

Every command also reads its config from a YAML file (``--config FILE``; flags given on the
command line override it) and can print the config it resolved (``--print-config``) as
YAML that ``--config`` reads back (docs/configs/ ships an example; tpu_configs/ is meant
to hold one such file per topology).

Why tyro (draccus and jsonargparse were the alternatives): it derives a complete CLI from
type annotations and field docstrings alone (nested dataclasses, unions, literals,
tuples, and one-word spellings such as ``--mesh ckpt=4,head=2`` through a constructor
spec), accepts a default instance, which is how a YAML file (or a training preset) seeds
the command line, and asks nothing of the config types: no base class, decorator or
parser object, so they stay plain frozen dataclasses that the Python API takes as they are.

Commands import their modules only when they run: `--help`, `--print-config` and
`export` start without loading JAX; `show`, `report` and `scores` load it with the score
registry (whose scores are JAX functions) when they present scores.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tyro
import yaml

from jaxinduct import __version__
from jaxinduct.errors import ConfigError, JaxInductError

# --- the commands ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScoresConfig:
    """List every score jaxinduct computes: name, kind, family and what it measures
    (docs/scores.md defines each)."""


def _train(config: Any) -> int:
    from jaxinduct.train.trainer import PRESETS, train

    if config.list_presets:
        for name, preset in PRESETS.items():
            m = preset.model
            shape = f"{m.n_layers}L {m.n_heads}H d_model={m.d_model} ctx={m.n_ctx}"
            kind = "attn-only" if m.attn_only else "MLP"
            print(f"{name:16s} {shape}, {kind}, {m.positional.value} positions, {preset.data.kind} data, {preset.steps} steps")
        return 0
    if config.out is None:
        raise JaxInductError("train needs --out DIR (where the Orbax trajectory is written)")
    settings = config.resolved()
    result = train(settings, config.out, progress=config.progress)
    print(f"trajectory: {result.out}")
    if result.resumed_from == settings.steps:
        print("the run was already complete; nothing was trained")
    elif result.resumed_from is not None:
        print(f"resumed after committed step {result.resumed_from}")
    print(f"{len(result.steps_saved)} committed checkpoints, steps {result.steps_saved[0]}..{result.steps_saved[-1]}")
    if result.final_loss is not None:
        print(f"final training loss {result.final_loss:.3f}  ({result.seconds:.0f} s)")
    if result.prefix_matching is not None:
        print("prefix_matching at the last step (layer x head; an induction head scores near 1):")
        for layer, row in enumerate(result.prefix_matching):
            print(f"  layer {layer}: " + "  ".join(f"{v:5.2f}" for v in row))
    return 0


def _scan(config: Any) -> int:
    import jax

    from jaxinduct.engine.scan import scan

    summary = scan(config)
    if jax.process_index() == 0:  # under jax.distributed, one report (and one writer)
        print(summary.describe())
        print(f"results: {config.store}  (jaxinduct show --store {config.store})")
    return 1 if summary.failed else 0


def _watch(config: Any) -> int:
    from jaxinduct.engine.watch import watch

    summary = watch(config.scan, poll_seconds=config.poll, until_step=config.until_step, idle_timeout=config.idle_timeout)
    print(f"watch: {summary.scanned} checkpoints scanned, {summary.failed} failed; results: {config.scan.store}")
    return 1 if summary.failed else 0


def _show(config: Any) -> int:
    from jaxinduct.report.show import render_show
    from jaxinduct.results.store import ResultStore

    with ResultStore.open(config.store, create=False, readonly=True) as store:
        print(render_show(store, run=config.run, metric=config.metric, step=config.step, top=config.top))
    return 0


def _report(config: Any) -> int:
    from jaxinduct.report.page import write_report
    from jaxinduct.results.store import ResultStore

    with ResultStore.open(config.store, create=False, readonly=True) as store:
        report = write_report(store, config.out, run=config.run)
    print(report.describe())
    return 0


def _export(config: Any) -> int:
    from jaxinduct.results.export import export
    from jaxinduct.results.store import ResultStore

    with ResultStore.open(config.store, create=False, readonly=True) as store:
        rows = export(store, config.table, config.format, config.out, run=config.run, partition=config.partition)
    where = f"a dataset partitioned by run and step in {config.out}" if config.partition else config.out
    print(f"{rows} rows of {config.table} written to {where}")
    return 0


def _convert_hf(config: Any) -> int:
    from jaxinduct.checkpoints.convert import convert_hf

    written = convert_hf(config.source, config.out, steps=config.steps)
    span = f" (steps {written[0]}..{written[-1]})" if written else ""
    print(f"{len(written)} revisions written to {config.out}{span}")
    return 0


def _quickstart(config: Any) -> int:
    from jaxinduct.quickstart import quickstart

    return quickstart(config.out, progress=config.progress)


def _scores(config: ScoresConfig) -> int:
    from jaxinduct.scores.registry import describe_scores

    print(describe_scores(), end="")
    return 0


@dataclasses.dataclass(frozen=True)
class Command:
    """One `jaxinduct` command: what it does (one line), its config type and its main.

    config: imports and returns the config class when the command runs (so that `--help`
    and the store's readers start without JAX). seed: imports and returns a function of
    the command's arguments and YAML config that gives the config the command line starts
    from (train: the named preset's values); None: the config class's own defaults.
    """

    help: str
    config: Callable[[], type]
    main: Callable[[Any], int]
    seed: Callable[[], Callable[[Sequence[str], dict[str, Any] | None], Any]] | None = None


def _lazy(module: str, name: str) -> Callable[[], Any]:
    """A loader of ``module.name``: a command's modules are imported only when it runs."""
    return lambda: getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train a reference model and save an Orbax trajectory",
        _lazy("jaxinduct.train.command", "TrainCommandConfig"),
        _train,
        _lazy("jaxinduct.train.command", "seeded"),
    ),
    "scan": Command(
        "score every head of every checkpoint of a trajectory into a store",
        _lazy("jaxinduct.engine.scan", "ScanConfig"),
        _scan,
    ),
    "watch": Command(
        "scan checkpoints of a run that is still training, as they are saved",
        _lazy("jaxinduct.engine.watch", "WatchConfig"),
        _watch,
    ),
    "show": Command("print the top heads and model scores of a store", _lazy("jaxinduct.report.show", "ShowConfig"), _show),
    "report": Command(
        "draw a store's runs as figures (PNG) and an HTML page", _lazy("jaxinduct.report.page", "ReportConfig"), _report
    ),
    "export": Command(
        "write a store's scores as CSV or Parquet", _lazy("jaxinduct.results.export", "ExportConfig"), _export
    ),
    "convert hf": Command(
        "convert Hugging Face revisions into an Orbax trajectory",
        _lazy("jaxinduct.checkpoints.convert", "ConvertHFConfig"),
        _convert_hf,
    ),
    "bench": Command(
        "measure the scan program on the devices present: peak, bandwidth, seconds and FLOPs per part, engine overhead",
        _lazy("jaxinduct.engine.bench", "BenchConfig"),
        lambda config: _lazy("jaxinduct.engine.bench", "bench_main")()(config),
    ),
    "scores": Command("list every score, its kind and what it measures", lambda: ScoresConfig, _scores),
    "quickstart": Command(
        "train the quickstart model, scan its trajectory, show the induction heads, write a report",
        _lazy("jaxinduct.quickstart", "QuickstartConfig"),
        _quickstart,
    ),
}


# --- configs from YAML and back -------------------------------------------------------------


def _strip(tp: Any) -> Any:
    """The type under Annotated[...] wrappers."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str, base: Any = dataclasses.MISSING) -> Any:
    """A YAML value as the field type ``tp`` holds: nested configs (over ``base``, the value
    they replace), tuples, enums, one-word forms (mesh, steps) and checked primitives."""
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [_strip(a) for a in typing.get_args(tp)]
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, where, base)
            except ConfigError as e:
                errors.append(str(e).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: {' / '.join(errors)}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if hasattr(tp, "parse") and isinstance(value, str | int | float) and not isinstance(value, bool):
            try:  # a one-word form, as on the command line (a bare number is a word too: steps: 100)
                return tp.parse(str(value))
            except JaxInductError as e:
                raise ConfigError(f"{where}: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return config_from_mapping(tp, value, where, base)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(items) != len(value):
            raise ConfigError(f"{where}: expected a list of {len(items)}, got {value!r}")
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, (item, v) in enumerate(zip(items, value)))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: expected one of {[m.value for m in tp]}, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def config_from_mapping(cls: type, data: dict[str, Any], where: str, base: Any = dataclasses.MISSING) -> Any:
    """An instance of the config dataclass ``cls`` from a (YAML) mapping.

    Fields the mapping leaves out keep their value in ``base`` (a ``cls`` instance), else
    their defaults; a required field left out is tyro.MISSING, which the command line must
    then supply.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; {cls.__name__} has {sorted(fields)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        inherited = getattr(base, name) if base is not dataclasses.MISSING else dataclasses.MISSING
        if name in data:
            values[name] = _coerce(hints[name], data[name], f"{where}.{name}", inherited)
        elif inherited is not dataclasses.MISSING:
            values[name] = inherited
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            values[name] = tyro.MISSING
    try:
        return cls(**values)
    except (TypeError, ValueError, JaxInductError) as e:
        raise ConfigError(f"{where}: {e}") from e


class _ConfigLoader(yaml.SafeLoader):
    """YAML as a config means it: no base-60 numbers (YAML 1.1 reads ``steps: 10:20`` as 620)."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+|0o?[0-7_]+)$"), list("-+0123456789")
)
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?"  # 1.5, 3.0e-4
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"  # 1e-5
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"  # .5
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML config file."""
    file = Path(path).expanduser()
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_ConfigLoader)  # noqa: S506 - a safe loader
    except OSError as e:
        raise ConfigError(f"--config {file}: cannot read it ({e.strerror})") from e
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"--config {file}: not valid YAML{line} ({str(e).splitlines()[0]})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {file}: expected a mapping of config fields at the top level")
    return data


def load_config(cls: type, path: str | os.PathLike, base: Any = dataclasses.MISSING) -> Any:
    """The config of ``cls`` that a YAML file describes, over ``base`` (see `config_from_mapping`)."""
    return config_from_mapping(cls, read_config_file(path), str(Path(path).expanduser()), base)


def config_to_plain(value: Any) -> Any:
    """A config as plain YAML-able data (mappings, lists, strings, numbers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(type(value), "parse"):  # a value with a one-word form (mesh, steps): written as on the command line
            return str(value)
        return {f.name: config_to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [config_to_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def render_config(config: Any) -> str:
    """``--print-config``'s YAML: what ``--config`` reads back into the same config."""
    return yaml.safe_dump(config_to_plain(config), sort_keys=False)


# --- parsing --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Invocation:
    command: str
    config: Any
    print_config: bool


def _pop_config_options(args: list[str]) -> tuple[list[str], str | None, bool]:
    """(args without them, --config FILE, --print-config): the options every command takes."""
    rest: list[str] = []
    config_file: str | None = None
    print_config = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--print-config":
            print_config = True
        elif arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(args):
                    raise ConfigError("--config needs a file: --config FILE.yaml")
                i += 1
                config_file = args[i]
            else:
                config_file = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    return rest, config_file, print_config


_COMMON_HELP = (
    "Every command also takes --config FILE (a YAML config; flags override it) and "
    "--print-config (print the resolved config as YAML and exit)."
)


def _parse_config(name: str, command: Command, args: list[str]) -> tuple[Any, bool]:
    cls = command.config()
    args, config_file, print_config = _pop_config_options(args)
    data = read_config_file(config_file) if config_file is not None else None
    base = command.seed()(args, data) if command.seed is not None else dataclasses.MISSING
    if data is not None:
        default = config_from_mapping(cls, data, str(config_file), base)
    else:
        default = None if base is dataclasses.MISSING else base
    description = f"{inspect.cleandoc(cls.__doc__ or command.help)}\n\n{_COMMON_HELP}"
    return tyro.cli(cls, args=args, prog=f"jaxinduct {name}", description=description, default=default), print_config


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: jaxinduct COMMAND [options]  (jaxinduct COMMAND --help for its options)", "",
             "Find induction heads, and watch them form, across training runs.", "", "commands:"]  # fmt: skip
    lines += [f"  {name:{width}s}  {command.help}" for name, command in COMMANDS.items()]
    return "\n".join(lines + ["", _COMMON_HELP])


def _split_command(argv: Sequence[str]) -> tuple[str, list[str]] | int:
    """(command name, its arguments), or an exit code after printing usage or an error."""
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"jaxinduct {__version__}")
        return 0
    for words in (2, 1):
        name = " ".join(args[:words])
        if name in COMMANDS:
            return name, args[words:]
    if args[0] == "convert":
        formats = [name.split()[1] for name in COMMANDS if name.startswith("convert ")]
        print(f"jaxinduct convert: error: name a format: {' | '.join(formats)} (e.g. jaxinduct convert hf SOURCE --out DIR)",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"jaxinduct: error: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    split = _split_command(sys.argv[1:] if argv is None else argv)
    if isinstance(split, int):
        return split
    name, args = split
    command = COMMANDS[name]
    try:
        config, print_config = _parse_config(name, command, args)
        if print_config:
            print(render_config(config), end="")
            return 0
        return command.main(config)
    except SystemExit as e:  # tyro's --help (0) and usage errors (2), as a return code for callers
        return e.code if isinstance(e.code, int) else 2
    except JaxInductError as e:
        print(f"jaxinduct {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"jaxinduct {name}: interrupted; finished work (committed checkpoints, scanned "
            "batches) is kept, and the same command resumes where it stopped",
            file=sys.stderr,
        )
        return 130


def entry_point() -> None:
    # Orbax and absl log at INFO by default; a CLI user wants our output, not theirs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
