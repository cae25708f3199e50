"""An experiment file, a grid's or a comparison's: the keys every runner's file holds, the file it
`extends`, its seeds and launcher, and the trainer arguments it names (a typo would be a silent no-op
variant), all checked before any run starts; and the command line's overrides of it."""

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import MissingFileError, UserError
from ..training.arguments import ModelArguments, load_mapping, refuse_unknown

LAUNCHERS = ("in_process", "accelerate")
RUNNER_KEYS = {"output_dir", "launcher", "accelerate_config", "seeds", "base", "description", "extends"}
OWN_WORDS = ("description", "output_dir")  # what a file that extends another never inherits: they name the other


@dataclass
class RunnerArguments:
    """Command-line overrides of an experiment file, shared by the ablation and comparison runners."""
    output_dir: str | None = field(default=None, metadata={"help": "Where runs and reports go (default: the file's)."})
    launcher: str | None = field(default=None, metadata={"help": "in_process or accelerate (default: the file's)."})
    accelerate_config: str | None = field(default=None, metadata={"help": "accelerate YAML for launcher accelerate."})
    seeds: list[int] | None = field(default=None, metadata={"help": (
        "Replace the file's seeds (2 or more to measure the spread).")})
    set: list[str] | None = field(default=None, metadata={"action": "extend", "help": (
        "NAME=VALUE trainer arguments for every run, space-separated; a second --set adds to the first.")})
    max_hours: float | None = field(default=None, metadata={"help": (
        "Start no run after this many hours; the report covers the runs done, and the same command continues.")})
    status: bool = field(default=False, metadata={"help": (
        "Print where each planned run stands (finished, at step N, not started) and the hours left, and train "
        "nothing: it reads the study's folder, so it may run beside the runner at work on it.")})


@dataclass(kw_only=True)
class StudySettings:
    """What every experiment file sets (a grid and a comparison add their own): from the command line first,
    then the file. A report rebuilt from its JSON (`--report`) knows the first four only."""
    path: str
    description: str
    seeds: list[int]
    base: dict  # trainer arguments every run shares: NAME -> value as a file gives it (the trainer parses them)
    overrides: dict = field(default_factory=dict)  # the command line's --set, parsed: already in base
    launcher: str = "in_process"
    accelerate_config: str | None = None
    output_dir: Path | None = None
    max_hours: float | None = None
    status: bool = False  # --status: say where the runs stand, train nothing


def load_runner_file(path, kind: str, own_keys: set[str], args: RunnerArguments, default_seeds: list[int],
                     output_prefix: str) -> tuple[dict, StudySettings]:
    """An experiment file -> (its raw mapping, the settings every runner shares), validated before any run."""
    spec = load_study_mapping(path, kind, RUNNER_KEYS | own_keys)
    output_dir = args.output_dir or spec.get("output_dir") or f"outputs/{output_prefix}_{Path(path).stem}"
    overrides = parse_overrides(args.set)
    return spec, StudySettings(
        path=str(path), description=spec.get("description", ""),
        base={**check_arguments(spec.get("base"), f"{kind} {path}: base"), **overrides}, overrides=overrides,
        seeds=check_seeds(args.seeds or spec.get("seeds", default_seeds)),
        launcher=check_launcher(args.launcher or spec.get("launcher", "in_process")),
        accelerate_config=args.accelerate_config or spec.get("accelerate_config"),
        output_dir=Path(output_dir), max_hours=args.max_hours, status=args.status)


def load_study_mapping(path, kind: str, allowed: set[str], seen: tuple[Path, ...] = ()) -> dict:
    """An experiment file's mapping, built on the file it `extends` (a path relative to it), if any: its own
    keys replace the other's, its `base` updates the other's base name by name (a name set to null drops the
    other's value: the trainer's default again), and it never inherits the other's description and
    output_dir (they describe the other study). So a study that changes a few of another's settings says
    only those, and the recipe they share has one source."""
    spec = load_mapping(path, f"{kind} file")
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise UserError(f"{kind} {path} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    parent = spec.pop("extends", None)
    if parent is None:
        return spec
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{kind} {path}: extends={parent!r} is invalid: must name another {kind} file, relative to "
                        "this one")
    under = Path(path).parent / parent
    chain = (*seen, Path(path).resolve())
    if under.resolve() in chain:
        raise UserError(f"{kind} {path}: extends {parent} makes a loop ({' -> '.join(str(p) for p in chain)} -> "
                        f"{under.resolve()})")
    if not under.is_file():
        raise MissingFileError(f"{kind} {path}: extends {parent}, which is not a file ({under})")
    inherited = {name: value for name, value in load_study_mapping(under, kind, allowed, chain).items()
                 if name not in OWN_WORDS}
    own = check_arguments(spec.get("base"), f"{kind} {path}: base")
    base = {name: value for name, value in {**check_arguments(inherited.get("base"), f"{kind} {under}: base"),
                                            **own}.items() if not (value is None and name in own)}
    return {**inherited, **spec, "base": base}


def model_argument_names() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelArguments)}


def check_arguments(values, where: str, allowed: set[str] | None = None) -> dict:
    """Refuse unknown trainer arguments (a typo would otherwise be a silent no-op variant)."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of trainer arguments to values, got {values!r}")
    refuse_unknown(values, where, allowed)
    return dict(values)


PROCESS_SETTINGS = ("mixed_precision", "deepspeed")  # one Accelerate process state holds these for all its runs


def check_launch(launcher: str, runs: list[dict], where: str) -> None:
    """In-process runs share one process and its Accelerate state: refuse runs that need another (DeepSpeed, a
    precision differing between runs) before any of them starts."""
    if launcher != "in_process":
        return
    for name in PROCESS_SETTINGS:
        found = {str(values.get(name)) for values in runs}
        if name == "deepspeed" and found != {"None"}:
            raise UserError(f"{where}: {name} needs launcher: accelerate (in_process runs one plain process)")
        if len(found) > 1:
            raise UserError(f"{where}: the runs differ in {name} ({sorted(found)}), which one process cannot change "
                            "between runs: use launcher: accelerate (each run its own process)")


def check_seeds(seeds) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds={seeds!r} is invalid: must be a non-empty list of distinct integers")
    return seeds


def check_launcher(launcher: str) -> str:
    if launcher not in LAUNCHERS:
        raise UserError(f"launcher={launcher!r} is invalid: must be one of {LAUNCHERS}")
    return launcher


def parse_overrides(pairs: list[str]) -> dict:
    """["max_steps=20", "learning_rate=3e-4"] -> {"max_steps": 20, "learning_rate": 0.0003} (YAML scalars)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"override {pair!r} is invalid: must be NAME=VALUE")
        name, value = pair.split("=", 1)
        out[name.strip()] = yaml.safe_load(value)
    return check_arguments(out, "--set")


def safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(name)):
        raise UserError(f"run name {name!r} is invalid: use letters, digits, _ . + - (it names a folder)")
    return str(name)
