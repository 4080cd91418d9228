"""Experiment results -> `results.json`, `report.md` and a self-contained `report.html`.

This module sits at the edge: it reads one plain dict and imports nothing from training,
models or generation, so a report can be rebuilt from `results.json` alone. The HTML has
no external CSS, JS or fonts; loss curves are inline SVG drawn here. Every piece of model
text is escaped.

The `results` dict (keys marked ? are optional):

    title?    str
    created?  str, e.g. an ISO timestamp
    notes?    [str]: caveats shown at the top (data, sampling, what was not measured)
    base?     name of the base model; default: the one model with kind "base"
    models    [{name: str, kind: "base" | "run", summary?: str, run_dir?: str}]
    suites?   {suite: {                       # `compare.SuiteComparison.to_dict()`
                 metric: str,                 # what one item's score is ("accuracy")
                 higher_is_better: bool,
                 n: int,                      # items, the same for every model
                 description?: str,
                 scores: {model: {mean: float, n: int}},
                 deltas: {run: {delta, ci_low, ci_high: float, confidence: float,
                                n_boot: int, significant: bool, test?: str, n?: int,
                                up?: int, down?: int, p_value?: float, p_adjusted?: float,
                                decision?: "gain" | "loss" | "no decision"}},
                 flips?: {run: {right_to_wrong: [item id], wrong_to_right: [item id]}},
                 by_group?: {group: {n: int, means: {model: float}}}}}
    answers?  [{suite: str, id: str, question: str, reference?: str,
                answers: {model: str}, scores?: {model: float}}]
              # side by side, as in the reference tutorial: question | base | run ...
    curves?   {run: {train?: [[step, loss], ...], val?: [[step, loss], ...]}}
    configs?  {model: mapping or str}: the resolved config that produced each model
    methods?  [{model: str, method?: str, trainable_params?: int, total_params?: int,
                wall_time_s?: float, tokens_per_s?: float, peak_memory_gb?: float,
                final_train_loss?: float, final_val_loss?: float, general_suite?: str,
                persona_* / general_* / general_plain_*?: score, delta, ci_low, ci_high: float,
                decision: str, mitigation?: str, general_kept_pct / _low / _high?: float}]
              # general_* is asked under the persona prompt where there is one, general_plain_*
              # without; general_kept_* is general as % of the base's, with its interval

A delta counts as a gain or a loss only when its `decision` says so: a paired test (exact
sign test or permutation test) whose Holm-adjusted p is below alpha (`compare.py`); the
report colours (HTML) or marks (markdown) only those, lists every test with its n, p and
adjusted p, and says so in a legend. Deltas without a `decision` (older results.json)
fall back to `significant`.
Non-finite numbers (a NaN loss) are shown as such in the report and written to
`results.json` as null, since JSON has no NaN.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

__all__ = ["render_html", "render_markdown", "svg_line_plot", "svg_trade_plot", "validate_results",
           "write_report"]

_TOP_KEYS = {"title", "created", "notes", "base", "models", "suites", "answers", "curves", "configs", "methods"}
_METHOD_COLUMNS = [  # key, header, format
    ("method", "method", "text"), ("mitigation", "mitigation", "text"),
    ("trainable_params", "trainable params", "int"),
    ("total_params", "total params", "int"), ("wall_time_s", "wall time", "duration"),
    ("tokens_per_s", "tokens/s", "1"), ("peak_memory_gb", "peak memory (GB)", "2"),
    ("final_train_loss", "final train loss", "4"), ("final_val_loss", "final val loss", "4"),
    ("persona_score", "persona score", "3"), ("persona", "persona Δ (CI), decision", "delta"),
    ("general_score", "general score", "3"), ("general", "general Δ (CI), decision", "delta"),
    ("general_kept_pct", "general kept (% of base)", "1"),
    ("general_plain", "general Δ without system prompt (CI), decision", "delta"),
]
_PALETTE = ["#0969da", "#d1242f", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#6e7781"]
_LEGEND = ("Δ = run minus base, with its paired-bootstrap confidence interval (CI). A Δ counts as a gain "
           "or a loss only when a paired test (exact sign test on the items that changed, for 0/1 scores; "
           "paired permutation test otherwise) rejects no change after Holm's correction over every "
           "comparison in this report (adjusted p < 0.05); otherwise: no decision, the change is not "
           "detectable with these items. The Tests table lists each test.")


# ---------------------------------------------------------------- input


def _plain(value: Any) -> Any:
    """Dataclasses (e.g. a SuiteComparison), tuples and paths -> plain JSON-like values."""
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _fail(path: str, message: str) -> None:
    raise ValueError(f"results{path}: {message}")


def validate_results(results: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first malformed key path (e.g. `results["models"][1]`)."""
    results = _plain(results)
    if not isinstance(results, Mapping):
        _fail("", "must be a mapping")
    unknown = sorted(set(results) - _TOP_KEYS)
    if unknown:
        _fail("", f"unknown key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    models = results.get("models")
    if not isinstance(models, list) or not models:
        _fail('["models"]', "must be a non-empty list")
    names = []
    for i, model in enumerate(models):
        if not isinstance(model, Mapping) or not isinstance(model.get("name"), str) or not model["name"]:
            _fail(f'["models"][{i}]', "needs a non-empty `name`")
        if model.get("kind") not in ("base", "run"):
            _fail(f'["models"][{i}]', f"`kind` must be base or run, got {model.get('kind')!r}")
        names.append(model["name"])
    if len(set(names)) != len(names):
        _fail('["models"]', f"duplicate model names in {names}")
    base = _base_name(results)
    if base not in names:
        _fail('["base"]', f"{base!r} is not a model name")
    known = set(names)
    for suite, entry in (results.get("suites") or {}).items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("scores"), Mapping):
            _fail(f'["suites"][{suite!r}]', "needs a `scores` mapping")
        for key in ("scores", "deltas", "flips"):
            stray = sorted(set(entry.get(key) or {}) - known)
            if stray:
                _fail(f'["suites"][{suite!r}][{key!r}]', f"unknown model(s) {stray}")
    for i, row in enumerate(results.get("answers") or []):
        if not isinstance(row, Mapping) or "question" not in row or not isinstance(row.get("answers"), Mapping):
            _fail(f'["answers"][{i}]', "needs `question` and an `answers` mapping")
    for run, curve in (results.get("curves") or {}).items():
        if run not in known:
            _fail(f'["curves"][{run!r}]', "unknown model")
        for split, points in curve.items():
            if any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in points):
                _fail(f'["curves"][{run!r}][{split!r}]', "must be a list of [step, loss] pairs")
    for i, row in enumerate(results.get("methods") or []):
        if not isinstance(row, Mapping) or "model" not in row:
            _fail(f'["methods"][{i}]', "needs `model`")


def _base_name(results: Mapping[str, Any]) -> str:
    if results.get("base"):
        return str(results["base"])
    bases = [m["name"] for m in results["models"] if m.get("kind") == "base"]
    if len(bases) != 1:
        _fail('["models"]', f"need exactly one model of kind base (or a `base` key), found {bases}")
    return bases[0]


def _model_order(results: Mapping[str, Any]) -> list[str]:
    base = _base_name(results)
    return [base] + [m["name"] for m in results["models"] if m["name"] != base]


# ---------------------------------------------------------------- formatting


def _num(value: Any, style: str = "3") -> str:
    """Format a number for a table; None -> an em dash; NaN and inf spelled out."""
    if value is None:
        return "—"
    if isinstance(value, str) or style == "text":
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if style == "int":
        return f"{int(round(value)):,}"
    if style == "duration":
        minutes, seconds = divmod(value, 60)
        return f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s"
    sign = "+" if style.startswith("+") else ""
    return f"{value:{sign}.{int(style.lstrip('+'))}f}".replace("-", "−")


def _delta_state(delta: Mapping[str, Any], higher_is_better: bool) -> str:
    """gain / loss / same: only a delta the test and Holm decided is a gain or a loss."""
    if "decision" in delta:
        return {"gain": "gain", "loss": "loss"}.get(delta["decision"], "same")
    if not delta.get("significant"):
        return "same"
    return "gain" if (delta["delta"] > 0) == higher_is_better else "loss"


def _delta_text(delta: Mapping[str, Any]) -> str:
    pct = int(round(100 * delta.get("confidence", 0.95)))
    text = (f"Δ {_num(delta['delta'], '+3')} ({pct}% CI {_num(delta['ci_low'], '+3')} … "
            f"{_num(delta['ci_high'], '+3')})")
    if "p_adjusted" in delta:
        text += f", Holm p {_p(delta['p_adjusted'])}: {delta.get('decision', 'no decision')}"
    return text


def _p(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def _method_cell(row: Mapping[str, Any], key: str, style: str) -> str:
    """A methods-table cell; `delta` cells join `<key>_delta`, its CI and its decision."""
    if style != "delta":
        return _num(row.get(key), style)
    if row.get(f"{key}_delta") is None:
        return "—"
    text = (f"{_num(row[f'{key}_delta'], '+3')} ({_num(row.get(f'{key}_ci_low'), '+3')} … "
            f"{_num(row.get(f'{key}_ci_high'), '+3')}) {row.get(f'{key}_decision', '')}").rstrip()
    if key == "general" and row.get("general_suite"):
        text += f" [{row['general_suite']}]"
    return text


def _test_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """suite, model, Δ, CI, test, n, up/down, p, Holm p, decision: one row per comparison."""
    rows = []
    for suite, entry in (results.get("suites") or {}).items():
        for model, d in (entry.get("deltas") or {}).items():
            if "p_value" not in d:
                continue
            rows.append([suite, model, _num(d["delta"], "+3"),
                         f"{_num(d['ci_low'], '+3')} … {_num(d['ci_high'], '+3')}", d.get("test", ""),
                         str(d.get("n", "")), f"{d.get('up', '')} / {d.get('down', '')}", _p(d["p_value"]),
                         _p(d.get("p_adjusted")), d.get("decision", "")])
    return rows


_TESTS_NOTE = ("up / down: items whose score rose / fell. p: the paired test, two-sided; Holm p: adjusted over "
               "every comparison of the evaluation (with tunelab eval: every row here).")
_TEST_HEADER = ["suite", "model", "Δ", "CI", "test", "n", "up / down", "p", "Holm p", "decision"]


def _config_text(config: Any) -> str:
    if isinstance(config, str):
        return config
    return yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True, default_flow_style=False)


def _curve_stats(points: Sequence[Sequence[float]]) -> dict[str, Any]:
    finite = [(s, y) for s, y in points if y is not None and math.isfinite(y)]
    best = min(finite, key=lambda p: p[1]) if finite else (None, None)
    return {"points": len(points), "first": finite[0][1] if finite else None, "min": best[1],
            "min_step": best[0], "last": points[-1][1] if points else None,
            "non_finite": len(points) - len(finite)}


# ---------------------------------------------------------------- svg


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _finite_runs(points: Sequence[Sequence[Any]]) -> list[list[tuple[float, float]]]:
    """Split a series at non-finite y values, so the line visibly breaks there."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None or not math.isfinite(y):
            runs.append([])
        else:
            runs[-1].append((float(x), float(y)))
    return [run for run in runs if run]


def svg_line_plot(
    series: Mapping[str, Sequence[Sequence[float]]],
    title: str = "",
    x_label: str = "step",
    y_label: str = "loss",
    width: int = 560,
    height: int = 300,
) -> str:
    """An inline `<svg>` line plot of named (x, y) series, styled by attributes only so it
    also stands alone. Non-finite y values break the line and are marked with a red × on
    the top edge at their x: a NaN loss must be visible, not interpolated over."""
    left, right, top, bottom = 62, 16, 34, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    runs = {name: _finite_runs(points) for name, points in series.items()}
    broken = [float(x) for pts in series.values() for x, y in pts if y is None or not math.isfinite(y)]
    xs = [x for rs in runs.values() for run in rs for x, _ in run] + broken
    ys = [y for rs in runs.values() for run in rs for _, y in run]
    esc = html.escape
    out = _svg_open(width, height, left, title)
    if not xs:
        out.append(f'<text x="{left}" y="{top + plot_h / 2}">no data</text></svg>')
        return "\n".join(out)
    x_lo, x_hi = min(xs), max(xs)
    x_lo, x_hi = (x_lo - 1, x_hi + 1) if x_lo == x_hi else (x_lo, x_hi)
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (y_hi - y_lo) * 0.05 or max(abs(y_hi) * 0.1, 0.5)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    px = lambda x: left + (x - x_lo) / (x_hi - x_lo) * plot_w  # noqa: E731
    py = lambda y: top + (y_hi - y) / (y_hi - y_lo) * plot_h  # noqa: E731
    out += _frame(left, top, plot_w, plot_h, _nice_ticks(y_lo, y_hi), _nice_ticks(x_lo, x_hi), px, py)
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">{esc(x_label)}</text>'
               f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + plot_h / 2})">{esc(y_label)}</text>')
    legend_x = left + plot_w - 120
    out.append(f'<rect x="{legend_x - 4}" y="{top + 3}" width="120" height="{16 * len(runs) + 4}" '
               'fill="#fff" fill-opacity="0.85"/>')
    for i, (name, name_runs) in enumerate(runs.items()):
        color = _PALETTE[i % len(_PALETTE)]
        for run in name_runs:
            if len(run) > 1:
                coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in run)
                out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"/>')
            if len(run) == 1 or sum(map(len, name_runs)) <= 60:  # markers while they do not smear
                out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.4" fill="{color}"/>' for x, y in run]
        ly = top + 16 + 16 * i
        out.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
                   f'stroke-width="2"/><text x="{legend_x + 24}" y="{ly}">{esc(name)}</text>')
    for x in broken:
        out.append(f'<text x="{px(x):.1f}" y="{top + 4}" fill="#cf222e" font-weight="bold" '
                   'text-anchor="middle">×</text>')
    if broken:
        out.append(f'<text x="{left + plot_w}" y="18" fill="#cf222e" text-anchor="end">'
                   f'{len(broken)} non-finite value(s) not drawn (×)</text>')
    out.append("</svg>")
    return "\n".join(out)


def _svg_open(width: int, height: int, left: float, title: str) -> list[str]:
    """A plot's <svg> opening: white background and its title (escaped)."""
    title = html.escape(title)
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} '
            f'{height}" role="img" class="plot" font-family="sans-serif" font-size="11"><title>{title}</title>',
            f'<rect width="{width}" height="{height}" fill="#fff"/>',
            f'<text x="{left}" y="18" font-size="13" font-weight="bold">{title}</text>']


def _frame(left: float, top: float, plot_w: float, plot_h: float, y_ticks, x_ticks, px, py,
           y_format: str = "g", x_suffix: str = "") -> list[str]:
    """A plot's box, its horizontal grid lines with the y labels, and the x labels."""
    out = [f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#8c959f"/>']
    for tick in y_ticks:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#eaeef2"/>'
                   f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" text-anchor="end">{tick:{y_format}}</text>')
    for tick in x_ticks:
        out.append(f'<text x="{px(tick):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{tick:g}{x_suffix}</text>')
    return out


def svg_trade_plot(rows: Sequence[Mapping[str, Any]], width: int = 560, height: int = 320) -> str:
    """The trade of each run in one look: x = general ability kept (% of the base's), y =
    persona gain (Δ vs the base), each dot with its two intervals as whiskers; the dashed
    line is 95% of the base's general ability."""
    dots = [r for r in rows if r.get("general_kept_pct") is not None and r.get("persona_delta") is not None]
    left, right, top, bottom = 62, 16, 34, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    title = "persona gain vs general ability kept"
    out = _svg_open(width, height, left, title)
    if not dots:
        out.append(f'<text x="{left}" y="{top + plot_h / 2}">no run has both scores</text></svg>')
        return "\n".join(out)
    value = lambda r, k, d: float(r[k]) if r.get(k) is not None and math.isfinite(float(r[k])) else d  # noqa: E731
    xs = [v for r in dots for v in (value(r, "general_kept_low", r["general_kept_pct"]),
                                    value(r, "general_kept_high", r["general_kept_pct"]))] + [95.0, 100.0]
    ys = [v for r in dots for v in (value(r, "persona_ci_low", r["persona_delta"]),
                                    value(r, "persona_ci_high", r["persona_delta"]))] + [0.0]
    x_lo, x_hi = min(xs) - 3, max(xs) + 3
    pad = (max(ys) - min(ys)) * 0.08 or 0.1
    y_lo, y_hi = min(ys) - pad, max(ys) + pad
    px = lambda x: left + (x - x_lo) / (x_hi - x_lo) * plot_w  # noqa: E731
    py = lambda y: top + (y_hi - y) / (y_hi - y_lo) * plot_h  # noqa: E731
    out += _frame(left, top, plot_w, plot_h, _nice_ticks(y_lo, y_hi), _nice_ticks(x_lo, x_hi), px, py,
                  y_format="+g", x_suffix="%")
    out.append(f'<line x1="{px(95):.1f}" x2="{px(95):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#8c959f" '
               f'stroke-dasharray="4 3"/><text x="{px(95) + 3:.1f}" y="{top + 12}" fill="#57606a">95%</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">general ability kept '
               f'(% of base)</text><text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + plot_h / 2})">persona gain (Δ vs base)</text>')
    esc = html.escape
    for i, r in enumerate(dots):
        color = _PALETTE[i % len(_PALETTE)]
        x, y = float(r["general_kept_pct"]), float(r["persona_delta"])
        x1, x2 = value(r, "general_kept_low", x), value(r, "general_kept_high", x)
        y1, y2 = value(r, "persona_ci_low", y), value(r, "persona_ci_high", y)
        out.append(f'<line x1="{px(x1):.1f}" x2="{px(x2):.1f}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="{color}"/>'
                   f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{py(y1):.1f}" y2="{py(y2):.1f}" stroke="{color}"/>'
                   f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{color}"/>'
                   f'<text x="{px(x) + 6:.1f}" y="{py(y) - 6:.1f}" fill="{color}">{esc(str(r["model"]))}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _has_trade(results: Mapping[str, Any]) -> bool:
    return any(r.get("general_kept_pct") is not None and r.get("persona_delta") is not None
               for r in results.get("methods") or [])


# ---------------------------------------------------------------- shared content


def _summary_rows(results: Mapping[str, Any]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(model, kind, [(cell text, state)]) per model; state: base / gain / loss / same / none."""
    base, suites = _base_name(results), results.get("suites") or {}
    kinds = {m["name"]: m["kind"] for m in results["models"]}
    rows = []
    for model in _model_order(results):
        cells = []
        for entry in suites.values():
            score = entry["scores"].get(model)
            if score is None:
                cells.append(("—", "none"))
                continue
            text = f"{_num(score['mean'])} (n={score.get('n', entry.get('n', '?'))})"
            delta = (entry.get("deltas") or {}).get(model)
            if model == base or delta is None:
                cells.append((text, "base" if model == base else "none"))
            else:
                cells.append((f"{text} {_delta_text(delta)}",
                              _delta_state(delta, entry.get("higher_is_better", True))))
        rows.append((model, kinds[model], cells))
    return rows


def _answer_cell(row: Mapping[str, Any], model: str) -> tuple[str, str, str]:
    """(answer, mark, css class): ✓ / ✗ for 0/1 scores, the score itself for a float."""
    text, score = str(row["answers"].get(model, "—")), (row.get("scores") or {}).get(model)
    if score is None:
        return text, "", ""
    if score in (0, 1):
        return text, "✓" if score == 1 else "✗", "ok" if score == 1 else "bad"
    return text, f"[{_num(score)}]", ""


def _id_list(ids: Sequence[str]) -> str:
    return f"{len(ids)}: {', '.join(ids)}" if ids else "0"


def _flip_lines(results: Mapping[str, Any]) -> list[tuple[str, str, list[str], list[str]]]:
    return [(suite, model, f.get("right_to_wrong", []), f.get("wrong_to_right", []))
            for suite, entry in (results.get("suites") or {}).items()
            for model, f in (entry.get("flips") or {}).items()]


# ---------------------------------------------------------------- markdown


def _md(text: Any) -> str:
    """Model text made safe for a markdown table cell (escaped HTML, no pipes, one line)."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def render_markdown(results: Mapping[str, Any]) -> str:
    """The report as GitHub-flavoured markdown."""
    results = _plain(results)
    validate_results(results)
    order, suites = _model_order(results), results.get("suites") or {}
    out = [f"# {_md(results.get('title', 'tunelab report'))}", ""]
    out += [f"Created {_md(results['created'])}.", ""] if results.get("created") else []
    out += [f"> {_md(note)}" for note in results.get("notes", [])] + ([""] if results.get("notes") else [])
    if results.get("methods"):  # the experiment's first table: the methods compared
        out += ["## Methods", ""] + _md_table(["model"] + [h for _, h, _ in _METHOD_COLUMNS], [
            [_md(row["model"])] + [_md(_method_cell(row, k, f)) for k, _, f in _METHOD_COLUMNS]
            for row in results["methods"]])
        if _has_trade(results):
            out += ["", "![persona gain vs general ability kept](trade.svg)", ""]
    out += ["## Models", ""] + _md_table(["model", "kind", "summary"], [
        [_md(m["name"]), m["kind"], _md(m.get("summary", ""))] for m in results["models"]])
    if suites:
        marks = {"gain": " ▲", "loss": " ▼", "same": "", "base": "", "none": ""}
        out += ["## Summary", "", _LEGEND + " Marked ▲ gain, ▼ loss; unmarked: no decision.", ""]
        out += _md_table(["model"] + [_md(s) for s in suites], [
            [_md(model)] + [text + marks[state] for text, state in cells]
            for model, _, cells in _summary_rows(results)])
        if _test_rows(results):
            out += ["### Tests", "", _TESTS_NOTE, ""]
            out += _md_table(_TEST_HEADER, [[_md(c) for c in row] for row in _test_rows(results)])
        for suite, entry in suites.items():
            if entry.get("by_group"):
                out += [f"### {_md(suite)} by group", ""] + _md_table(["group", "n"] + [_md(m) for m in order], [
                    [_md(g), str(v["n"])] + [_num(v["means"].get(m)) for m in order]
                    for g, v in entry["by_group"].items()])
    if _flip_lines(results):
        out += ["## Flips", "", "Items the base got right and the run got wrong (right → wrong), and the reverse.",
                ""]
        out += _md_table(["suite", "model", "right → wrong", "wrong → right"], [
            [_md(s), _md(m), _md(_id_list(rw)), _md(_id_list(wr))]
            for s, m, rw, wr in _flip_lines(results)])
    if results.get("curves"):
        out += ["## Loss curves", "", "Plots are in report.html; here, their summary.", ""]
        rows = []
        for run, curve in results["curves"].items():
            for split, points in curve.items():
                st = _curve_stats(points)
                rows.append([_md(run), _md(split), str(st["points"]), _num(st["first"], "4"),
                             f"{_num(st['min'], '4')} (step {_num(st['min_step'], 'int')})",
                             _num(st["last"], "4"), str(st["non_finite"])])
        out += _md_table(["run", "split", "points", "first", "min", "last", "non-finite"], rows)
    answers = results.get("answers") or []
    for suite in dict.fromkeys(row.get("suite", "") for row in answers):
        out += [f"## Answers: {_md(suite) or 'all'}", "",
                "✓ / ✗: the item's check passed / failed; [x]: the item's score.", ""]
        rows = []
        for row in (r for r in answers if r.get("suite", "") == suite):
            cells = []
            for model in order:
                text, mark, _ = _answer_cell(row, model)
                cells.append(f"{mark} {_md(text)}" if mark else _md(text))
            rows.append([_md(row.get("id", "")), _md(row["question"]), _md(row.get("reference", ""))] + cells)
        out += _md_table(["id", "question", "reference"] + [_md(m) for m in order], rows)
    if results.get("configs"):
        out += ["## Configs", ""]
        for model, config in results["configs"].items():
            text = _config_text(config)
            fence = "````" if "```" in text else "```"
            out += [f"### {_md(model)}", "", f"{fence}yaml", text.rstrip("\n"), fence, ""]
    return "\n".join(out)


# ---------------------------------------------------------------- html

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1200px;
color:#1f2328;padding:0 16px}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #d0d7de;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f6f8fa}
.gain{background:#dafbe1;color:#116329}.loss{background:#ffebe9;color:#a40e26}.same{color:#6e7781;
background:#f6f8fa}.ans{white-space:pre-wrap;max-width:420px}.ok{border-left:4px solid #1a7f37}
.bad{border-left:4px solid #cf222e}.legend span{padding:2px 6px;margin-right:6px}
.note{background:#fff8c5;padding:6px 10px;border-left:4px solid #d4a72c}
pre{background:#f6f8fa;padding:8px;overflow:auto}.plots{display:flex;flex-wrap:wrap;gap:12px}
.plot{border:1px solid #d0d7de;background:#fff}
.answers{table-layout:fixed;width:100%}.answers th:first-child{width:3.5em}
.answers .ans{max-width:none;overflow-wrap:anywhere}
"""


def _h(text: Any) -> str:
    return html.escape(str(text))


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]], css: str = "") -> str:
    """Header texts are escaped here; row cells must be ready-made `<td>` elements."""
    head = "".join(f"<th>{_h(h)}</th>" for h in header)
    table = f'<table class="{css}">' if css else "<table>"
    return f"{table}<tr>{head}</tr>" + "".join(f"<tr>{''.join(r)}</tr>" for r in rows) + "</table>"


def render_html(results: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    results = _plain(results)
    validate_results(results)
    order, suites = _model_order(results), results.get("suites") or {}
    title = results.get("title", "tunelab report")
    td = lambda text, cls="": f'<td class="{cls}">{_h(text)}</td>' if cls else f"<td>{_h(text)}</td>"  # noqa: E731
    body = [f"<h1>{_h(title)}</h1>"]
    body += [f"<p>Created {_h(results['created'])}.</p>"] if results.get("created") else []
    body += [f'<p class="note">{_h(note)}</p>' for note in results.get("notes", [])]
    if results.get("methods"):
        body += ["<h2>Methods</h2>", _html_table(["model"] + [h for _, h, _ in _METHOD_COLUMNS], [
            [td(row["model"])] + [td(_method_cell(row, k, f)) for k, _, f in _METHOD_COLUMNS]
            for row in results["methods"]])]
        if _has_trade(results):
            body.append(svg_trade_plot(results["methods"]))
    body += ["<h2>Models</h2>", _html_table(["model", "kind", "summary"], [
        [td(m["name"]), td(m["kind"]), td(m.get("summary", ""))] for m in results["models"]])]
    if suites:
        body += ["<h2>Summary</h2>", f'<p class="legend"><span class="gain">gain</span><span class="loss">loss'
                 f'</span><span class="same">no decision</span>{_h(_LEGEND)} Green: gain, red: loss, '
                 'grey: no decision.</p>']
        body.append(_html_table(["model"] + list(suites), [
            [td(model)] + [td(text, state if state in ("gain", "loss", "same") else "") for text, state in cells]
            for model, _, cells in _summary_rows(results)]))
        if _test_rows(results):
            body += ["<h3>Tests</h3>", f"<p>{_h(_TESTS_NOTE)}</p>",
                     _html_table(_TEST_HEADER, [[td(c) for c in row[:-1]] + [td(row[-1], {
                         "gain": "gain", "loss": "loss"}.get(row[-1], "same"))] for row in _test_rows(results)])]
        for suite, entry in suites.items():
            if entry.get("description"):
                body.append(f"<p><b>{_h(suite)}</b>: {_h(entry['description'])}</p>")
            if entry.get("by_group"):
                body += [f"<h3>{_h(suite)} by group</h3>", _html_table(["group", "n"] + order, [
                    [td(g), td(v["n"])] + [td(_num(v["means"].get(m))) for m in order]
                    for g, v in entry["by_group"].items()])]
    if _flip_lines(results):
        body += ["<h2>Flips</h2>", "<p>Items the base got right and the run got wrong, and the reverse.</p>"]
        body.append(_html_table(["suite", "model", "right → wrong", "wrong → right"], [
            [td(s), td(m), td(_id_list(rw), "loss" if rw else ""), td(_id_list(wr), "gain" if wr else "")]
            for s, m, rw, wr in _flip_lines(results)]))
    if results.get("curves"):
        body += ["<h2>Loss curves</h2>", '<div class="plots">']
        for run, curve in results["curves"].items():
            body.append(svg_line_plot(curve, title=f"{run}: loss"))
        with_val = {run: c["val"] for run, c in results["curves"].items() if c.get("val")}
        if len(with_val) > 1:
            body.append(svg_line_plot(with_val, title="validation loss, all runs"))
        body.append("</div>")
    answers = results.get("answers") or []
    for suite in dict.fromkeys(row.get("suite", "") for row in answers):
        body.append(f"<details open><summary><h2 style='display:inline'>Answers: {_h(suite) or 'all'}</h2>"
                    "</summary><p>Green / red edge: the item's check passed / failed; [x]: the item's score.</p>")
        rows = []
        for row in (r for r in answers if r.get("suite", "") == suite):
            cells = [td(row.get("id", "")), td(row["question"], "ans"), td(row.get("reference", ""), "ans")]
            for model in order:
                text, mark, css = _answer_cell(row, model)
                cells.append(td(f"{mark} {text}" if mark and not css else text, f"ans {css}".strip()))
            rows.append(cells)
        # equal columns: every model's answer gets the same width, however long the others are
        body += [_html_table(["id", "question", "reference"] + order, rows, "answers"), "</details>"]
    if results.get("configs"):
        body.append("<h2>Configs</h2>")
        body += [f"<details><summary>{_h(model)}</summary><pre>{_h(_config_text(config))}</pre></details>"
                 for model, config in results["configs"].items()]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_h(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write `results.json`, `report.md` and `report.html` into `out_dir`.

    Args:
        results: The dict described in the module docstring (dataclasses with `to_dict`,
            such as `compare.SuiteComparison`, are accepted anywhere inside it).
        out_dir: Directory to write to; created if missing.

    Returns:
        {"json": path, "md": path, "html": path}.
    """
    results = _plain(results)
    validate_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(_json_safe(results), ensure_ascii=False, indent=2, allow_nan=False) + "\n",
                             encoding="utf-8")
    paths["md"].write_text(render_markdown(results), encoding="utf-8")
    paths["html"].write_text(render_html(results), encoding="utf-8")
    if _has_trade(results):  # the chart report.md links to
        paths["svg"] = out / "trade.svg"
        paths["svg"].write_text(svg_trade_plot(results["methods"]), encoding="utf-8")
    return paths
