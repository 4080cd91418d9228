"""`tunelab experiment CONFIG.yaml`: train every method on one budget, evaluate them all
against the base, and write one report whose first table compares the methods.

The YAML names the model, the data, the shared training budget (same rows, order, seed
and epochs for every method), the methods (each with its own overrides) and the
evaluation. Rerunning skips runs that finished (matched by a hash of their resolved
config) and continues an interrupted one from its last checkpoint.

    name: demo
    model: {path: smollm2-135m-instruct}
    data: {path: persona.jsonl, system_prompt: "...", val_size: 30}
    train: {epochs: 2, batch_size: 16, micro_batch_size: 8}
    methods:
      - {name: lora}
      - {name: ptuning, train: {lr: 1e-3}}
      - {name: lora, label: lora-mitigated, mitigate: {replay: 0.2, kl: 0.1}}
    eval: {suites: [in_domain, persona, general], persona_probes: probes.yaml}
    out: runs/demo
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

import yaml

from .config import (ConfigError, DataConfig, GenerationConfig, MitigateConfig, ModelConfig, TrainConfig,
                     from_dict, to_dict)
from .evaluate.benchmarks import Benchmark
from .evaluate.runner import evaluate
from .methods import MethodConfig, get
from .report import write_report
from .runs import RunDir

TOP_KEYS = {"name", "model", "data", "train", "methods", "eval", "out"}
EVAL_KEYS = {"suites", "persona_probes", "general_probes", "benchmarks", "gen", "batch_size", "limit"}


def experiment(file: str, out: Optional[str] = None) -> dict:
    """Run the method comparison described by a YAML file.

    Args:
        file: the experiment's YAML file (paths in it are relative to the file).
        out: the experiment directory (default: the file's `out`, else runs/<name>).
    """
    from .train import train  # torch at its top: imported here so `tunelab --help` stays fast (tests/test_cli.py)

    path = Path(file)
    spec = read_spec(path)
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; accepted: {sorted(TOP_KEYS)}")
    here = path.resolve().parent
    name = plain_name(spec.get("name", path.stem), f"{path}: `name`")
    root = Path(out or spec.get("out") or f"runs/{name}")
    model = from_dict(ModelConfig, resolve_path(spec.get("model") or {}, "path", here))
    data = from_dict(DataConfig, resolve_path(spec.get("data") or {}, "path", here))
    methods = spec.get("methods") or []
    if not isinstance(methods, list) or not all(isinstance(m, dict) for m in methods):
        raise ConfigError(f"{path}: `methods` must be a list of mappings, e.g. [{{name: lora}}, "
                          f"{{name: ptuning, label: pt}}]; got {methods!r}")
    if not methods:
        raise ConfigError(f"{path}: `methods` must list at least one method, e.g. [{{name: lora}}]")

    planned = {}  # every entry is checked before the first one trains
    for i, entry in enumerate(methods):
        label, method_cfg, train_cfg, mitigate_cfg = resolve_method(entry, spec.get("train") or {},
                                                                    f"{path}: methods[{i}]", here)
        if label in planned:
            raise ConfigError(f"{path}: methods[{i}]: label {label!r} is used twice; give each entry its own "
                              f"`label:`")
        planned[label] = (method_cfg, train_cfg, mitigate_cfg)

    from .distributed import init  # torch at its top: imported here so `tunelab --help` stays fast (tests/test_cli.py)

    world = init(model.device)  # under torchrun every process trains; rank 0 alone evaluates and reports
    runs = {}
    for label, (method_cfg, train_cfg, mitigate_cfg) in planned.items():
        resolved = {"model": to_dict(model), "data": to_dict(data), "method": to_dict(method_cfg),
                    "train": to_dict(train_cfg)}
        if mitigate_cfg.active:  # absent when off: unmitigated runs keep their directories
            resolved["mitigate"] = to_dict(mitigate_cfg)
        digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]
        run_dir = root / "runs" / f"{label}-{digest}"
        with world.quiet():
            if RunDir(run_dir).done.exists():
                print(f"[{label}] finished earlier: {run_dir} (skipped)")
            else:
                print(f"[{label}] training -> {run_dir}")
                train(model, data, method_cfg, train_cfg, mitigate_cfg, out=str(run_dir))
        runs[label] = run_dir
    if not world.main:
        return {}

    ev = dict(spec.get("eval") or {})
    unknown = set(ev) - EVAL_KEYS
    if unknown:
        raise ConfigError(f"{path}: eval: unknown key(s) {sorted(unknown)}; accepted: {sorted(EVAL_KEYS)}")
    for key in ("persona_probes", "general_probes"):
        resolve_path(ev, key, here)
    benches = [from_dict(Benchmark, resolve_path(dict(b), "path", here)) for b in ev.get("benchmarks", [])]
    # The runs' directories are named <label>-<hash>; the report names models by label.
    linked = link_labels(root, runs)
    report = evaluate(
        runs=[str(p) for p in linked.values()], model=model,
        suites=ev.get("suites", ["in_domain", "persona", "general"]),
        persona_probes=ev.get("persona_probes"), general_probes=ev.get("general_probes"),
        benchmarks=benches, gen=from_dict(GenerationConfig, ev.get("gen") or {"max_new_tokens": 128}),
        batch_size=ev.get("batch_size", 128), limit=ev.get("limit"), out=str(root / "report"),
        title=f"tunelab experiment: {name}")
    table = methods_table(report, runs)
    report["methods"] = table
    write_report(report, root / "report")
    print_table(table)
    print(f"\nreport: {root / 'report' / 'report.html'} (and report.md, results.json)")
    return report


def read_spec(path: Path) -> dict:
    """The experiment file as a mapping, or a ConfigError naming the file (and the line of a
    YAML syntax error)."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"experiment file {path} does not exist") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {err.problem or err.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable YAML file ({err})") from None
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: an experiment file is a mapping (name:, model:, data:, methods: ...), "
                          f"but this one holds a {type(spec).__name__}: {str(spec)[:80]!r}. For example: "
                          f"`{{name: demo, model: {{path: M}}, data: {{path: D}}, methods: [{{name: lora}}]}}`")
    for key in ("model", "data", "train", "eval"):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            raise ConfigError(f"{path}: `{key}` must be a mapping (e.g. {key}: {{path: ...}}), got {spec[key]!r}")
    return spec


PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def plain_name(value, where: str) -> str:
    """A name that becomes one path component inside the experiment directory: letters, digits,
    `.`, `_`, `-`; no `/`, no `..`, not absolute, so no derived path can leave the directory."""
    text = str(value)
    if not PLAIN_NAME.fullmatch(text) or ".." in text:
        raise ConfigError(f"{where} must be a plain name (letters, digits, `.`, `_`, `-`; no `/` or `..`), "
                          f"got {value!r}: it names a directory inside the experiment's")
    return text


def resolve_path(section: dict, key: str, here: Path) -> dict:
    """Make a relative file path in `section[key]` relative to the YAML file's folder."""
    value = section.get(key)
    if isinstance(value, str) and value and not Path(value).is_absolute():
        candidate = here / value
        if candidate.exists():
            section[key] = str(candidate)
    return section


def resolve_method(entry: dict, shared_train: dict, where: str, here: Path = Path(".")):
    """(label, MethodConfig, TrainConfig, MitigateConfig) of one `methods:` entry: the shared
    budget plus the entry's own `train:` overrides, its method options and its `mitigate:`
    options (files in them relative to the YAML file)."""
    if "name" not in entry:
        raise ConfigError(f"{where}: needs `name` (one of the methods `tunelab methods` lists)")
    try:
        method = get(entry["name"])
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    label = plain_name(entry.get("label", entry["name"]), f"{where}: `label`")
    allowed = {"name", "label", "train", "mitigate", method.name}
    unknown = set(entry) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; accepted: {sorted(allowed)}")
    options = from_dict(method.config_cls, entry.get(method.name) or {})
    method_cfg = MethodConfig(name=method.name, **{method.name: options})
    train_cfg = from_dict(TrainConfig, {**shared_train, **(entry.get("train") or {})})
    mitigate = dict(entry.get("mitigate") or {})
    for key in ("replay_data", "select_persona_probes"):
        resolve_path(mitigate, key, here)
    try:
        mitigate_cfg = from_dict(MitigateConfig, mitigate)
    except ConfigError as err:
        raise ConfigError(f"{where}: mitigate: {err}") from None
    return label, method_cfg, train_cfg, mitigate_cfg


def link_labels(root: Path, runs: dict[str, Path]) -> dict[str, Path]:
    """root/models/<label> -> the run directory, so the report names models by label."""
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    linked = {}
    for label, run_dir in runs.items():
        link = models / plain_name(label, "a method label")
        if link.parent.resolve() != models.resolve():
            raise ConfigError(f"{link} would be outside {models}")
        if link.is_symlink():
            link.unlink()  # an earlier run's link; a real file or folder there is never deleted
        elif link.exists():
            raise ConfigError(f"{link} exists and is not a link tunelab made: move it away (it is not deleted)")
        link.symlink_to(Path("..") / "runs" / run_dir.name, target_is_directory=True)
        linked[label] = link
    return linked


def methods_table(report: dict, runs: dict[str, Path]) -> list[dict]:
    """One row per method: what it cost, and what it gained (persona) and lost (general
    ability, asked under the persona prompt as the reference asked it), each with its
    delta, interval and the decision of its paired test after Holm's correction."""
    suites = report.get("suites", {})
    general_suite = "general_persona" if "general_persona" in suites else "general"

    def outcome(prefix: str, suite: str, model: str) -> dict:
        entry = suites.get(suite, {})
        d = (entry.get("deltas") or {}).get(model) or {}
        return {f"{prefix}_score": ((entry.get("scores") or {}).get(model) or {}).get("mean"),
                f"{prefix}_delta": d.get("delta"), f"{prefix}_ci_low": d.get("ci_low"),
                f"{prefix}_ci_high": d.get("ci_high"), f"{prefix}_decision": d.get("decision"),
                f"{prefix}_p_adjusted": d.get("p_adjusted")}

    base_general = ((suites.get(general_suite, {}).get("scores") or {}).get("base") or {}).get("mean")
    rows = []
    for label, run_dir in runs.items():
        summary = json.loads(RunDir(run_dir).summary.read_text())
        general = outcome("general", general_suite, label)
        rows.append({
            "model": label, "method": summary["method"],
            "mitigation": mitigation_text(RunDir(run_dir).read_config().get("mitigate"), summary),
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "wall_time_s": summary["wall_time_s"], "tokens_per_s": summary["tokens_per_s"],
            "peak_memory_gb": summary.get("peak_memory_gib"),
            "final_train_loss": summary.get("final_train_loss"),
            "final_val_loss": summary.get("final_val_loss"),
            **outcome("persona", "persona", label),
            "general_suite": general_suite if general_suite in suites else None,
            **general,
            **kept_share(general, base_general),
            **(outcome("general_plain", "general", label) if general_suite == "general_persona" else {}),
        })
    return rows


def mitigation_text(mitigate: Optional[dict], summary: dict) -> str:
    """The run's mitigation options in a few words (`-`: none)."""
    if not mitigate:
        return "-"
    parts = []
    if mitigate.get("replay"):
        parts.append(f"replay {mitigate['replay']:g}" + (" (own data)" if mitigate.get("replay_data") else ""))
    if mitigate.get("kl"):
        parts.append(f"kl {mitigate['kl']:g} on {mitigate.get('kl_on', 'replay')}")
    if mitigate.get("select", "last") != "last":
        chosen = (summary.get("selection") or {}).get("chosen")
        parts.append(f"select {mitigate['select']}" + (f": {chosen}" if chosen else ""))
    return ", ".join(parts) or "-"


def kept_share(general: dict, base: Optional[float]) -> dict:
    """General ability kept, as % of the base's score, with the delta's interval mapped alike."""
    if not base or general.get("general_score") is None:
        return {"general_kept_pct": None, "general_kept_low": None, "general_kept_high": None}
    pct = lambda delta: None if delta is None else round(100 * (base + delta) / base, 1)  # noqa: E731
    return {"general_kept_pct": round(100 * general["general_score"] / base, 1),
            "general_kept_low": pct(general.get("general_ci_low")),
            "general_kept_high": pct(general.get("general_ci_high"))}


def print_table(rows: list[dict]) -> None:
    def change(row: dict, key: str) -> str:
        if row.get(f"{key}_delta") is None:
            return "-"
        return (f"{row[f'{key}_delta']:+.2f} [{row[f'{key}_ci_low']:+.2f}, {row[f'{key}_ci_high']:+.2f}] "
                f"{row.get(f'{key}_decision') or ''}").rstrip()

    columns = [("model", "method", "{}"), ("mitigation", "mitigation", "{}"), ("trainable_params", "trainable", "{:,}"),
               ("wall_time_s", "wall s", "{:.0f}"), ("tokens_per_s", "tok/s", "{:.0f}"),
               ("final_train_loss", "train loss", "{:.3f}"), ("final_val_loss", "val loss", "{:.3f}"),
               ("persona_score", "persona", "{:.2f}"), ("persona", "persona Δ [CI] decision", None),
               ("general_score", "general", "{:.2f}"), ("general", "general Δ [CI] decision", None),
               ("general_kept_pct", "kept %", "{:.0f}")]
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([change(row, k) if fmt is None else fmt.format(row[k]) if row.get(k) is not None else "-"
                      for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    print()
    for n, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    if rows and rows[0].get("general_suite"):
        print(f"general: the {rows[0]['general_suite']} suite; decisions: paired test, Holm-corrected")
