"""write_report: three files, escaped model text, inline SVG, colours only when significant."""

import json
import math

import pytest

from tunelab.evaluate.compare import compare_suite
from tunelab.report import render_markdown, svg_line_plot, validate_results, write_report


def _results():
    ids = [f"q{i}" for i in range(1, 13)]
    general = compare_suite(  # lora breaks 11 of 11 (a loss), ptuning fixes 1 (noise)
        {"base": {i: float(i != "q12") for i in ids},
         "lora-r8": {i: 0.0 for i in ids},
         "ptuning": {i: 1.0 for i in ids}},
        "base", suite="general", n_boot=200, groups={"q1": "number_compare", "q2": "facts", "q3": "facts"},
    )
    return {
        "title": "huanhuan: LoRA vs P-Tuning",
        "notes": ["Greedy decoding; one sample per question."],
        "models": [
            {"name": "base", "kind": "base", "summary": "Qwen2-1.5B-Instruct"},
            {"name": "lora-r8", "kind": "run", "summary": "LoRA r 8"},
            {"name": "ptuning", "kind": "run", "summary": "P-Tuning, 10 virtual tokens"},
        ],
        "suites": {"general": general},  # a SuiteComparison is accepted as is
        "answers": [
            {"suite": "general", "id": "q1", "question": "1.11 和 1.9 那个大", "reference": "1.9",
             "answers": {"base": "1.9 更大。", "lora-r8": "<script>alert('x')</script> 臣妾不知",
                         "ptuning": "1.9 | 更大"},
             "scores": {"base": 1, "lora-r8": 0, "ptuning": 1}},
            {"suite": "persona", "id": "p1", "question": "你是谁？",
             "answers": {"base": "我是一个AI助手。", "lora-r8": "我是甄嬛，家父是大理寺少卿甄远道。",
                         "ptuning": "我是甄嬛。"},
             "scores": {"base": 0.125, "lora-r8": 1.0, "ptuning": 0.5}},
        ],
        "curves": {
            "lora-r8": {"train": [(0, 3.2), (10, 2.5), (20, 2.1)], "val": [(10, 2.6), (20, 2.3)]},
            "ptuning": {"train": [(0, 3.3), (10, float("nan")), (20, 3.0)], "val": [[20, 3.1]]},
        },
        "configs": {"lora-r8": {"method": "lora", "lora": {"r": 8, "alpha": 32}, "note": "a & b"},
                    "ptuning": "method: ptuning\n"},
        "methods": [{"model": "lora-r8", "method": "lora", "trainable_params": 9232384, "wall_time_s": 583.2,
                     "tokens_per_s": 1091.0, "peak_memory_gb": 12.34, "final_train_loss": 2.1,
                     "final_val_loss": 2.3, "general_score": 0.0, "general_delta": -0.917,
                     "general_ci_low": -1.0, "general_ci_high": -0.75, "general_decision": "loss",
                     "general_suite": "general_persona"}],
    }


def test_writes_three_files(tmp_path):
    paths = write_report(_results(), tmp_path / "report")
    assert set(paths) == {"json", "md", "html"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    data = json.loads(paths["json"].read_text(encoding="utf-8"))  # strict JSON: NaN became null
    assert data["curves"]["ptuning"]["train"][1] == [10, None]
    assert data["suites"]["general"]["deltas"]["lora-r8"]["significant"] is True
    # results.json alone is enough to rebuild the report
    write_report(data, tmp_path / "again")


def test_html_content(tmp_path):
    page = write_report(_results(), tmp_path)["html"].read_text(encoding="utf-8")
    for name in ("base", "lora-r8", "ptuning", "huanhuan: LoRA vs P-Tuning"):
        assert name in page
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "a &amp; b" in page  # configs escaped too
    assert "<svg" in page and "<polyline" in page
    assert "1 non-finite value(s) not drawn" in page  # the NaN loss is visible, not hidden
    summary_table = page.split("<h2>Summary</h2>")[1].split("<table>")[1].split("</table>")[0]
    assert 'class="loss"' in summary_table and 'class="gain"' not in summary_table
    assert page.index("<h2>Methods</h2>") < page.index("<h2>Models</h2>")  # the methods compared come first
    assert "<details" in page and "甄嬛" in page
    assert "general by group" in page and "number_compare" in page and "(none)" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert "<link" not in page and "<script" not in page


def test_summary_colours_only_significant_deltas(tmp_path):
    results = _results()
    summary = write_report(results, tmp_path)["html"].read_text(encoding="utf-8").split("<h2>Summary</h2>")[1]
    summary_table = summary.split("<table>")[1].split("</table>")[0]
    delta = results["suites"]["general"].deltas
    assert delta["lora-r8"].significant and not delta["ptuning"].significant  # 1 item up of 12 is noise
    assert (delta["lora-r8"].decision, delta["ptuning"].decision) == ("loss", "no decision")
    assert summary_table.count('class="loss"') == 1 and summary_table.count('class="same"') == 1
    assert "no decision" in summary and "Holm" in summary
    tests_table = summary.split("<h3>Tests</h3>")[1].split("</table>")[0]
    assert "exact sign test" in tests_table and "0 / 11" in tests_table and "1 / 0" in tests_table


def test_markdown_has_tables_and_escapes(tmp_path):
    text = write_report(_results(), tmp_path)["md"].read_text(encoding="utf-8")
    assert "| model | general |" in text
    summary_table = text.split("| model | general |")[1].split("\n\n")[0]
    assert "▼" in summary_table and "▲" not in summary_table
    assert "&lt;script&gt;alert('x')" in text and "1.9 \\| 更大" in text
    assert "| id | question | reference | base | lora-r8 | ptuning |" in text
    assert "## Answers: persona" in text and "✗ &lt;script&gt;" in text
    assert "[0.125] 我是一个AI助手。" in text and "[0.500] 我是甄嬛。" in text  # float scores shown as numbers
    assert "9,232,384" in text and "9 min 43 s" in text
    assert "−0.917 (−1.000 … −0.750) loss [general_persona]" in text  # the methods table: Δ, CI, decision
    tests = text.split("### Tests")[1].split("\n\n")[2]
    assert "| general | lora-r8 | −0.917 |" in tests and "| 0 / 11 | 0.00098 | 0.002 | loss |" in tests  # 2 / 2^11, x2
    assert "| 1.000 | 1.000 | no decision |" in tests
    assert "```yaml" in text and "alpha: 32" in text
    assert "| ptuning | train | 3 | 3.3000 | 3.0000 (step 20) | 3.0000 | 1 |" in text


def test_lower_is_better_suite_calls_a_drop_a_gain():
    results = _results()
    results["suites"] = {"val_loss": {
        "metric": "loss", "higher_is_better": False, "n": 10,
        "scores": {"base": {"mean": 2.0, "n": 10}, "lora-r8": {"mean": 1.5, "n": 10}},
        "deltas": {"lora-r8": {"delta": -0.5, "ci_low": -0.7, "ci_high": -0.3, "confidence": 0.95,
                               "n_boot": 1000, "significant": True}},
    }}
    summary_table = render_markdown(results).split("| model | val_loss |")[1].split("\n\n")[0]
    assert "▲" in summary_table and "▼" not in summary_table


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("models"), "models"),
    (lambda r: r["models"].append({"name": "base", "kind": "run"}), "duplicate"),
    (lambda r: r["models"][1].update(kind="tuned"), "kind"),
    (lambda r: r.update(suite={}), "unknown key"),
    (lambda r: r["curves"].update(ghost={"train": []}), "ghost"),
    (lambda r: r["curves"]["lora-r8"].update(val=[1, 2]), "pairs"),
])
def test_validate_results_names_the_problem(mutate, message):
    results = _results()
    mutate(results)
    with pytest.raises(ValueError, match=message):
        validate_results(results)


def test_svg_edge_cases():
    assert "no data" in svg_line_plot({"a": []})
    one = svg_line_plot({"a": [(5, 1.0)]}, title="<one>")
    assert "<circle" in one and "&lt;one&gt;" in one
    flat = svg_line_plot({"a": [(0, 2.0), (1, 2.0)]})
    assert "nan" not in flat.lower().replace('class="nan"', "")
    only_nan = svg_line_plot({"a": [(0, math.nan), (1, math.inf)]})
    assert "2 non-finite" in only_nan


def test_trade_plot_draws_one_dot_per_run_with_its_intervals(tmp_path):
    from tunelab.report import svg_trade_plot

    rows = [{"model": "lora", "persona_delta": 0.4, "persona_ci_low": 0.2, "persona_ci_high": 0.6,
             "general_kept_pct": 75.0, "general_kept_low": 60.0, "general_kept_high": 88.0},
            {"model": "lora-mitigated", "persona_delta": 0.35, "persona_ci_low": 0.1, "persona_ci_high": 0.5,
             "general_kept_pct": 97.0, "general_kept_low": 90.0, "general_kept_high": 104.0},
            {"model": "no-scores", "persona_delta": None}]
    svg = svg_trade_plot(rows)
    assert svg.count("<circle") == 2 and "lora-mitigated" in svg and "no-scores" not in svg
    assert svg.count("<line") >= 2 * 2 + 1  # two whiskers a dot, and the 95% line
    assert "no run has both scores" in svg_trade_plot([{"model": "x"}])
