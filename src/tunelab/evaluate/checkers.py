"""Auto-graders for probe items, and loading / validating probe files.

A probe file is YAML: a list of items, or a mapping whose `items` (or `probes`) key
holds the list; there, top-level `lang` and `category` are defaults for items lacking
them, and other keys (`suite`, `version`, ...) are free-form. Each item has

    id        unique string, no whitespace
    lang      language code (`zh`, `en`, ...); "" if neither item nor file gives one
    category  free-form group name (`number_compare`, `arithmetic`, ...); "" likewise
    question  the user turn sent to the model
    check     how the answer is graded: `{type: <name>, ...}`, one of `CHECKERS`
    reference optional: an answer the check must accept (self-test)
    right     optional: more answers, or one, the check must accept (self-test), in the
              styles a model answers in: terse, chatty, in character, with working
    wrong     optional: an answer, or list of answers, the check must reject (self-test):
              an echo of the question, a reversed restatement, a negation, a hedge,
              both options, a wrong value
    note      optional: free text for authors

A check reads what the answer asserts, not which substrings it holds (`answers.py`):
text copied from the question is blanked first (an echo scores nothing), and a mention
that is negated ("不是巴黎"), hedged ("Thursday or Friday") or only compared with ("higher
than Everest") does not count. Check types (case-insensitive unless they say otherwise):

    number    {value, tol=1e-6, mode=last}: the numbers the answer concludes (digits with
              sign, decimals, 1,000 separators and 万/亿; Chinese numerals and English
              words such as 十二 or minus five when there are no digits), leaving out those
              in parentheses ("85 (38+47)"), operands of working ("3 + 4 = 7" concludes 7)
              and negated, hedged or compared ones. `mode` says which must equal `value`
              within `tol`: `last` (default), `first`, `any`, or `only` (every one does).
    contains  {any: [...], all: [...], none: [...], whole_word=true}: the answer asserts
              at least one of `any` and every one of `all`, and contains none of `none`
              (any mention, asserted or not: a denial "不是AI" still names it). ASCII ends
              of a needle match whole words ("tea" is not in "instead"; "112" not in
              "1127" or "112.5"); `whole_word: false` matches anywhere.
    choice    {value, options: [...]}: `value` is one of `options`. The answer must pick
              it (answers.choice_verdict): "1.9", "1.9 更大", "1.11 is smaller than 1.9"
              and "1.9 比 1.11 大" pick 1.9 when the question asks for the larger;
              "1.9 和 1.11 相比，1.11 更大" picks 1.11; naming both options without a
              verdict, or picking both, picks none. Numeric options match by value (1.90
              mentions 1.9, 1.11 does not), text options as whole words, and a shorter
              option never inside a longer one.
    one_word  {value: str | [str, ...], max_chars}: after stripping surrounding
              whitespace, quotes, markdown emphasis and punctuation, the answer is one
              word (no whitespace, no inner punctuation but - and ') and, if `value` is
              given, equals one of the values. Without `value`, `max_chars` (default 6
              for CJK text, else 30) bounds the length, since Chinese has no spaces.
    json      {keys: [...], values: {key: expected | [expected, ...]}}: the answer holds a
              JSON object (whole answer, a ```json fence, or the first decodable `{...}`)
              with all `keys`; `values` compares numbers within 1e-6 (a string holding
              exactly one number, "28岁", counts) and strings case-insensitively.
    regex     {pattern, ignore_case=false}: `re.search` on the answer less its echo of the
              question, and the match must be asserted (not negated or hedged); case-
              sensitive by default, like Python, so `\\bAu\\b` does not match "because".

Probe files may also list, per item, `right` answers (every one must pass) besides the
`reference`: `self_test` grades both and the `wrong` answers.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import yaml

from .answers import (asserted, asserted_numbers, choice_verdict, extract_numbers, number_mentions,
                      option_value, strip_echo)

__all__ = [
    "CHECKERS", "CHECK_FIELDS", "Probe", "ProbeError", "bundled_probes_path", "extract_numbers",
    "find_json_object", "grade", "load_probes", "parse_probes", "score_answers", "self_test", "self_test_counts",
    "validate_check",
]

CheckFn = Callable[[str, Mapping[str, Any], str], bool]

CHECKERS: dict[str, CheckFn] = {}
"""check type -> fn(answer, spec, question) -> bool; question is "" when unknown."""
CHECK_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
"""check type -> (required fields, optional fields), `type` itself excluded."""
_SPEC_VALIDATORS: dict[str, Callable[[Mapping[str, Any]], None]] = {}


class ProbeError(ValueError):
    """A probe file is malformed; the message names the file and the item id."""


def register(
    name: str,
    required: Iterable[str] = (),
    optional: Iterable[str] = (),
    validate: Optional[Callable[[Mapping[str, Any]], None]] = None,
) -> Callable[[CheckFn], CheckFn]:
    """Add a check type: its grader, its fields, and a validator raising ValueError."""

    def add(fn: CheckFn) -> CheckFn:
        CHECKERS[name] = fn
        CHECK_FIELDS[name] = (frozenset(required), frozenset(optional))
        if validate is not None:
            _SPEC_VALIDATORS[name] = validate
        return fn

    return add


# ---------------------------------------------------------------- helpers


def _fold(text: str) -> str:
    """Case- and width-insensitive form with whitespace runs collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_as_float = option_value


def _needle_pattern(needle: str, whole_word: bool) -> re.Pattern[str]:
    """Case-insensitive pattern for `needle`, any run of whitespace matching any other;
    with `whole_word`, ASCII letters/digits at its ends must not continue a word, and a
    number not continue as a decimal ("1" is not in "10" or "1.5"). CJK has no word
    boundaries to speak of, so CJK ends match anywhere."""
    needle = unicodedata.normalize("NFKC", needle.strip())
    body = r"\s+".join(re.escape(part) for part in needle.split())
    word_end = lambda ch: whole_word and ch.isascii() and ch.isalnum()  # noqa: E731
    left = r"(?<![A-Za-z0-9])(?<![0-9][.,])" if word_end(needle[:1]) else ""
    right = r"(?![A-Za-z0-9])(?![.,][0-9])" if word_end(needle[-1:]) else ""
    return re.compile(left + body + right, re.IGNORECASE)


def _asserted_matches(pattern: re.Pattern[str], text: str) -> bool:
    return any(asserted(text, m.start(), m.end()) for m in pattern.finditer(text) if m.end() > m.start())


def _str_list(spec: Mapping[str, Any], key: str) -> list[str]:
    value = spec.get(key, [])
    return [value] if isinstance(value, str) else list(value)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ---------------------------------------------------------------- check types


def _validate_number(spec: Mapping[str, Any]) -> None:
    _require(_is_number(spec["value"]), f"`value` must be a number, got {spec['value']!r}")
    _require(_is_number(spec.get("tol", 0)) and spec.get("tol", 0) >= 0, "`tol` must be a number >= 0")
    _require(spec.get("mode", "last") in ("last", "first", "any", "only"),
             f"`mode` must be last, first, any or only, got {spec.get('mode')!r}")


@register("number", required=["value"], optional=["tol", "mode"], validate=_validate_number)
def check_number(answer: str, spec: Mapping[str, Any], question: str = "") -> bool:
    numbers = [m.value for m in asserted_numbers(strip_echo(answer, question))]
    if not numbers:
        return False
    tol, mode = spec.get("tol", 1e-6), spec.get("mode", "last")
    hits = [abs(n - spec["value"]) <= tol for n in numbers]
    return {"last": hits[-1], "first": hits[0], "any": any(hits), "only": all(hits)}[mode]


def _validate_contains(spec: Mapping[str, Any]) -> None:
    _require("any" in spec or "all" in spec, "needs `any` or `all`")
    for key in ("any", "all", "none"):
        values = _str_list(spec, key)
        _require(all(isinstance(v, str) and v.strip() for v in values),
                 f"`{key}` must be a list of non-empty strings")
    _require("any" not in spec or bool(_str_list(spec, "any")), "`any` must not be empty")


@register("contains", optional=["any", "all", "none", "whole_word"], validate=_validate_contains)
def check_contains(answer: str, spec: Mapping[str, Any], question: str = "") -> bool:
    whole = bool(spec.get("whole_word", True))
    raw = unicodedata.normalize("NFKC", answer)
    if any(_needle_pattern(n, whole).search(raw) for n in _str_list(spec, "none")):
        return False
    text = unicodedata.normalize("NFKC", strip_echo(answer, question))
    said = _asserted_needles(text, _str_list(spec, "any") + _str_list(spec, "all"), whole)
    if "any" in spec and not any(said[n] for n in _str_list(spec, "any")):
        return False
    return all(said[n] for n in _str_list(spec, "all"))


def _asserted_needles(text: str, needles: list[str], whole: bool) -> dict[str, bool]:
    """needle -> asserted somewhere in `text`. Longest needles first, each match blanked, so
    "妹妹" is not found again inside a denied "不是亲妹妹"."""
    said = {}
    for needle in sorted(set(needles), key=lambda n: (-len(n), n)):
        found = False
        for m in list(_needle_pattern(needle, whole).finditer(text)):
            found = found or asserted(text, m.start(), m.end())
            # a word-like blank, so "not Leonardo da Vinci" still negates "da Vinci"
            text = text[:m.start()] + "_" * (m.end() - m.start()) + text[m.end():]
        said[needle] = found
    return said


def _same_option(a: Any, b: Any) -> bool:
    fa, fb = _as_float(a), _as_float(b)
    if fa is not None and fb is not None:
        return math.isclose(fa, fb, abs_tol=1e-9)
    return str(a) == str(b)


def _validate_choice(spec: Mapping[str, Any]) -> None:
    options = spec["options"]
    _require(isinstance(options, list) and len(options) >= 2, "`options` must list at least two options")
    _require(all(isinstance(o, (str, int, float)) and str(o).strip() for o in options),
             "`options` must be non-empty strings or numbers")
    _require(sum(_same_option(spec["value"], o) for o in options) == 1,
             f"`value` {spec['value']!r} must be exactly one of `options`")


def _option_mentions(answer: str, options: Sequence[Any]) -> list[tuple[int, int, int]]:
    """(start, end, option index) of every option mention in `answer`, in reading order."""
    mentions: list[tuple[int, int, int]] = []
    numbers = number_mentions(answer)
    text = answer
    # Longest text options first, blanking each match (same length, so positions stay
    # comparable with the numeric ones), so "北京市" is not also a mention of "北京".
    order = sorted(range(len(options)), key=lambda i: -len(str(options[i])))
    for i in order:
        value = _as_float(options[i])
        if value is not None:
            mentions += [(m.start, m.end, i) for m in numbers if math.isclose(m.value, value, abs_tol=1e-9)]
            continue
        for m in list(_needle_pattern(str(options[i]), whole_word=True).finditer(text)):
            mentions.append((m.start(), m.end(), i))
            text = text[: m.start()] + "\0" * (m.end() - m.start()) + text[m.end():]
    return sorted(mentions)


@register("choice", required=["value", "options"], validate=_validate_choice)
def check_choice(answer: str, spec: Mapping[str, Any], question: str = "") -> bool:
    options = spec["options"]
    text = strip_echo(answer, question)
    right = next(i for i, o in enumerate(options) if _same_option(spec["value"], o))
    return choice_verdict(text, _option_mentions(text, options), len(options), question) == right


_STRIP_CHARS = " \t\r\n\"'`*_~“”‘’「」『』《》()（）[]【】.,;:!?。，；：！？、…"


def _validate_one_word(spec: Mapping[str, Any]) -> None:
    values = _str_list(spec, "value")
    _require(all(isinstance(v, str) and v.strip() and len(v.split()) == 1 for v in values),
             "`value` must be a single word or a list of single words")
    _require(_is_number(spec.get("max_chars", 1)) and spec.get("max_chars", 1) > 0, "`max_chars` must be > 0")


@register("one_word", optional=["value", "max_chars"], validate=_validate_one_word)
def check_one_word(answer: str, spec: Mapping[str, Any], question: str = "") -> bool:
    word = unicodedata.normalize("NFKC", answer).strip(_STRIP_CHARS)
    if not word or any(ch.isspace() for ch in word):
        return False
    if any(unicodedata.category(ch).startswith("P") and ch not in "-'’" for ch in word):
        return False
    values = _str_list(spec, "value")
    if values:
        return any(_fold(word) == _fold(v) for v in values)
    has_cjk = any(unicodedata.east_asian_width(ch) == "W" for ch in word)
    return len(word) <= spec.get("max_chars", 6 if has_cjk else 30)


_FENCE_RE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


def find_json_object(answer: str) -> Optional[dict[str, Any]]:
    """The first JSON object in `answer`: in a ``` fence, the whole answer, or any `{...}`."""
    candidates = [m.group(1) for m in _FENCE_RE.finditer(answer)] + [answer.strip()]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", answer):
        try:
            value, _ = decoder.raw_decode(answer, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _json_value_matches(actual: Any, expected: Any) -> bool:
    if isinstance(expected, list):
        return any(_json_value_matches(actual, e) for e in expected)
    if expected is None or isinstance(expected, bool):
        return actual is expected
    if _is_number(expected):
        if _is_number(actual):
            return abs(actual - expected) <= 1e-6
        # A string with exactly one number counts: "28岁", "$12", "12 dollars".
        numbers = [m.value for m in asserted_numbers(actual)] if isinstance(actual, str) else []
        return len(numbers) == 1 and abs(numbers[0] - expected) <= 1e-6 and len(extract_numbers(actual)) == 1
    return isinstance(actual, (str, int, float)) and _fold(str(actual)) == _fold(str(expected))


def _validate_json(spec: Mapping[str, Any]) -> None:
    keys = spec["keys"]
    _require(isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys),
             "`keys` must be a non-empty list of strings")
    values = spec.get("values", {})
    _require(isinstance(values, dict), "`values` must be a mapping")
    _require(set(values) <= set(keys), "every key in `values` must be in `keys`")


@register("json", required=["keys"], optional=["values"], validate=_validate_json)
def check_json(answer: str, spec: Mapping[str, Any], question: str = "") -> bool:
    obj = find_json_object(answer)
    if obj is None or not all(key in obj for key in spec["keys"]):
        return False
    return all(_json_value_matches(obj[k], v) for k, v in spec.get("values", {}).items())


def _validate_regex(spec: Mapping[str, Any]) -> None:
    _require(isinstance(spec["pattern"], str), "`pattern` must be a string")
    try:
        re.compile(spec["pattern"])
    except re.error as error:
        raise ValueError(f"`pattern` does not compile: {error}") from None


@register("regex", required=["pattern"], optional=["ignore_case"], validate=_validate_regex)
def check_regex(answer: str, spec: Mapping[str, Any], question: str = "") -> bool:
    flags = re.IGNORECASE if spec.get("ignore_case", False) else 0
    return _asserted_matches(re.compile(spec["pattern"], flags), strip_echo(answer, question))


# ---------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """One probe item; see the module docstring for the fields."""

    id: str
    lang: str
    category: str
    question: str
    check: Mapping[str, Any]
    reference: Optional[str] = None
    wrong: tuple[str, ...] = ()
    note: str = ""
    right: tuple[str, ...] = ()

    def grade(self, answer: str) -> bool:
        """True if `answer` passes this item's check (text echoed from the question scores nothing)."""
        return grade(answer, self.check, self.question)


_ITEM_REQUIRED = ("id", "question", "check")
_ITEM_OPTIONAL = ("lang", "category", "reference", "right", "wrong", "note")


def grade(answer: str, check: Mapping[str, Any], question: str = "") -> bool:
    """Grade `answer` with the check spec `{type: ..., ...}`; with the `question`, what the
    answer copies from it counts for nothing."""
    return CHECKERS[check["type"]](answer, check, question or "")


def validate_check(check: Any) -> None:
    """Raise ValueError saying what is wrong with a check spec."""
    _require(isinstance(check, dict), f"`check` must be a mapping, got {check!r}")
    kind = check.get("type")
    _require(kind in CHECKERS, f"unknown check type {kind!r} (known: {', '.join(sorted(CHECKERS))})")
    required, optional = CHECK_FIELDS[kind]
    missing = sorted(required - set(check))
    _require(not missing, f"check type {kind!r} needs {', '.join(missing)}")
    unknown = sorted(set(check) - required - optional - {"type"})
    _require(not unknown, f"check type {kind!r} has unknown field(s) {', '.join(unknown)}")
    if kind in _SPEC_VALIDATORS:
        _SPEC_VALIDATORS[kind](check)


def _parse_item(raw: Any, defaults: Mapping[str, Any]) -> Probe:
    _require(isinstance(raw, dict), "item must be a mapping")
    missing = [f for f in _ITEM_REQUIRED if f not in raw]
    _require(not missing, f"missing field(s) {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_ITEM_REQUIRED) - set(_ITEM_OPTIONAL))
    _require(not unknown, f"unknown field(s) {', '.join(unknown)}")
    raw = {**defaults, **raw}
    for field in ("id", "question"):
        _require(isinstance(raw[field], str) and raw[field].strip(), f"`{field}` must be a non-empty string")
    _require(not any(ch.isspace() for ch in raw["id"]), "`id` must not contain whitespace")
    _require(isinstance(raw.get("category", ""), str), "`category` must be a string")
    lang = raw.get("lang", "")
    _require(lang == "" or (isinstance(lang, str) and re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]+)?", lang) is not None),
             f"`lang` must be a language code like zh or en, got {lang!r}")
    validate_check(raw["check"])
    reference = raw.get("reference")
    _require(reference is None or isinstance(reference, str), "`reference` must be a string")
    answers = {}
    for field in ("right", "wrong"):
        value = raw.get(field, [])
        value = [value] if isinstance(value, str) else value
        _require(isinstance(value, list) and all(isinstance(w, str) for w in value),
                 f"`{field}` must be a string or a list of strings")
        answers[field] = tuple(value)
    return Probe(raw["id"], lang, raw.get("category", ""), raw["question"], raw["check"],
                 reference, answers["wrong"], str(raw.get("note", "")), answers["right"])


def parse_probes(data: Any, source: str = "<probes>") -> list[Probe]:
    """Validate parsed YAML and return its items; every problem is reported at once."""
    items = data.get("items", data.get("probes")) if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ProbeError(f"{source}: expected a non-empty list of items (or a mapping with `items`)")
    defaults = {k: data[k] for k in ("lang", "category") if isinstance(data, dict) and k in data}
    probes, errors, seen = [], [], set()
    for index, raw in enumerate(items):
        name = f"item {raw['id']!r}" if isinstance(raw, dict) and isinstance(raw.get("id"), str) else f"item #{index}"
        try:
            probe = _parse_item(raw, defaults)
            _require(probe.id not in seen, "duplicate id")
        except ValueError as error:
            errors.append(f"{source}: {name}: {error}")
            continue
        seen.add(probe.id)
        probes.append(probe)
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise ProbeError("\n".join(shown))
    return probes


def bundled_probes_path(name: str = "general") -> Path:
    """Path of a probe set shipped in `tunelab/assets/probes/`."""
    path = Path(str(resources.files("tunelab").joinpath("assets", "probes", f"{name}.yaml")))
    if not path.is_file():
        raise FileNotFoundError(f"no bundled probe set {name!r} at {path}")
    return path


def load_probes(path: Optional[str | Path] = None) -> list[Probe]:
    """Load and validate a probe file; None loads the bundled general-ability set."""
    path = bundled_probes_path() if path is None else Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ProbeError(f"{path}: not valid YAML: {error}") from None
    return parse_probes(data, str(path))


def self_test(probes: Iterable[Probe]) -> list[str]:
    """Problems found by grading each item's `reference` and `right` answers (must pass)
    and `wrong` answers (must fail), and the question itself, echoed (must fail)."""
    problems = []
    for probe in probes:
        rights = ([probe.reference] if probe.reference is not None else []) + list(probe.right)
        problems += [f"{probe.id}: check rejects right answer {r!r}" for r in rights if not probe.grade(r)]
        problems += [f"{probe.id}: check accepts wrong answer {w!r}" for w in probe.wrong if probe.grade(w)]
        if probe.grade(probe.question):
            problems.append(f"{probe.id}: check accepts the question echoed back")
    return problems


def self_test_counts(probes: Iterable[Probe]) -> dict[str, int]:
    """How many right answers (reference + right) an item set's checks accept, and how many
    wrong answers (the `wrong` lists and each question echoed) they accept."""
    counts = {"right": 0, "right_accepted": 0, "wrong": 0, "wrong_accepted": 0}
    for probe in probes:
        rights = ([probe.reference] if probe.reference is not None else []) + list(probe.right)
        wrongs = list(probe.wrong) + [probe.question]
        counts["right"] += len(rights)
        counts["right_accepted"] += sum(probe.grade(r) for r in rights)
        counts["wrong"] += len(wrongs)
        counts["wrong_accepted"] += sum(probe.grade(w) for w in wrongs)
    return counts


def score_answers(probes: Iterable[Probe], answers: Mapping[str, str]) -> dict[str, float]:
    """Per-item 0/1 scores for `compare`; an item with no answer is an error, not a zero."""
    probes = list(probes)
    missing = [p.id for p in probes if p.id not in answers]
    if missing:
        raise KeyError(f"no answer for {len(missing)} item(s), e.g. {missing[:5]}")
    return {p.id: float(p.grade(answers[p.id])) for p in probes}
