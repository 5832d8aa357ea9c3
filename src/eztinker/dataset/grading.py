"""Final answers of math word problems: find the number a solution ends with, and compare two numbers.

GSM8K reference solutions end with `#### 72`. Model outputs end in many ways: `#### 72`, `The answer is
$1,234.50.`, `\\boxed{-3}`, or just a last number. `extract_answer` looks for those markers in that
order and falls back to the last number in the text; `normalize_number` turns what it found into a
canonical string (`"1,234.50"` -> `"1234.5"`, `"+7"` -> `"7"`, `"−3"` -> `"-3"`, `"3/4"` -> `"0.75"`),
and `grade` compares numerically, so `72`, `72.0` and `$72` all match `#### 72`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

__all__ = ["extract_answer", "grade", "normalize_number", "parse_number"]

_MINUS_SIGNS = "\u2212\u2012\u2013\u2014"  # the Unicode minus and dashes a model may write for "-"

# A number as people write it: an optional sign and currency, digits with optional thousands commas
# (only when every group after the first has exactly three digits), an optional decimal part, or a
# simple fraction. "1,234" is one number; "1, 2, 3" is three.
_NUMBER = (
    r"(?<![\w.])"
    r"[-+]?(?:\$\s?)?"
    r"(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
    r"(?:/\d+)?"
    r"(?!\d)"
)
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*(.+)")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)


def _numbers(text: str) -> list[str]:
    """Every number in `text`, in order (empty matches and lone signs skipped)."""
    found = []
    for match in _NUMBER_RE.finditer(text):
        token = match.group(0).strip()
        if any(c.isdigit() for c in token):
            found.append(token)
    return found


def parse_number(text: str) -> Fraction | None:
    """The exact value of one written number (`"$1,234.50"`, `"-3"`, `"3/4"`, `"2."`), or None."""
    cleaned = text.strip()
    for dash in _MINUS_SIGNS:
        cleaned = cleaned.replace(dash, "-")
    cleaned = cleaned.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    if not cleaned:
        return None
    try:
        if "/" in cleaned:
            num, _, den = cleaned.partition("/")
            value = Fraction(Decimal(num)) / Fraction(Decimal(den))
        else:
            value = Fraction(Decimal(cleaned))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    return value


def normalize_number(text: str) -> str | None:
    """A canonical string for a written number: no commas, no currency, no trailing zeros; None if not one.

    `"1,234.50"` -> `"1234.5"`, `"+7"` -> `"7"`, `"−3"` -> `"-3"`, `"-0"` -> `"0"`, `"3/4"` -> `"0.75"`,
    `"1/3"` -> `"1/3"` (a fraction with no finite decimal stays a fraction).
    """
    value = parse_number(text)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    decimal = Decimal(value.numerator) / Decimal(value.denominator)
    if Fraction(decimal) == value:
        return format(decimal.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def _first_number(text: str) -> str | None:
    numbers = _numbers(text)
    return numbers[0] if numbers else None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, normalized (see `normalize_number`), or None if it has no number.

    Looks, in order, for the last `#### N`, the last `\\boxed{N}`, the last "answer is N" (also
    "answer: N", "answer = N"), and else takes the last number in the text.
    """
    for dash in _MINUS_SIGNS:
        text = text.replace(dash, "-")
    candidates: list[str | None] = []
    hashes = _HASHES_RE.findall(text)
    if hashes:
        candidates.append(_first_number(hashes[-1]))
    boxed = _BOXED_RE.findall(text)
    if boxed:
        candidates.append(_first_number(boxed[-1]))
    answer_is = _ANSWER_IS_RE.findall(text)
    if answer_is:
        candidates.append(_first_number(answer_is[-1]))
    numbers = _numbers(text)
    if numbers:
        candidates.append(numbers[-1])
    for candidate in candidates:
        if candidate is not None:
            normalized = normalize_number(candidate)
            if normalized is not None:
                return normalized
    return None


def grade(response: str, reference: str) -> bool:
    """Whether `response`'s final answer (see `extract_answer`) equals the number `reference`.

    `reference` is a bare number (`"72"`, `"1,234"`, `"-3.5"`) or a whole solution ending `#### N`.
    Compares exact values, so `"72.0"`, `"$72"` and `"72"` are all equal.
    """
    expected = extract_answer(reference) if "####" in reference else normalize_number(reference)
    got = extract_answer(response)
    if expected is None or got is None:
        return False
    expected_value, got_value = parse_number(expected), parse_number(got)
    return expected_value is not None and expected_value == got_value
