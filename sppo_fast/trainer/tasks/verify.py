"""Answer extraction and exact, bounded answer comparison.

Everything here *parses* model output; nothing evaluates it as code. Every function works on
bounded input (long responses are cut, long numbers rejected) so that a hostile response costs
microseconds, never a giant integer conversion or a catastrophic regex backtrack.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A response longer than this is judged on its last MAX_RESPONSE_CHARS characters only: the final
# answer is at the end, and scanning megabytes of degenerate output every step is wasted time.
MAX_RESPONSE_CHARS = 20_000
# Numbers with more digits than this are rejected (reward 0) instead of being converted.
MAX_NUMBER_DIGITS = 64
# An extracted answer longer than this is not an answer.
MAX_ANSWER_CHARS = 256

ANSWER_MARKER = "####"
_BOXED = "\\boxed{"
# "answer: 42", "Answer = 42", "the answer is 42" at the start of a line. No nested quantifiers,
# so matching stays linear in the line length.
_ANSWER_LINE = re.compile(r"^[ \t]*(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t]*(?::|=|is)[ \t]*(.*)$",
                          re.IGNORECASE | re.MULTILINE)
# ASCII digits only: str.isdigit() also accepts "²" and Arabic-Indic digits, which int() would take.
_DECIMAL = re.compile(r"([+-]?)([0-9]+)(?:\.([0-9]*))?|([+-]?)\.([0-9]+)")
_THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?")
_LATEX_FRAC = re.compile(r"^(-?)\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}$")


def _tail(text: str) -> str:
    return text[-MAX_RESPONSE_CHARS:] if len(text) > MAX_RESPONSE_CHARS else text


def _bounded(answer: str | None) -> str | None:
    if answer is None:
        return None
    answer = answer.strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def extract_marked(text: str) -> str | None:
    """The rest of the line after the last ``####`` (GSM8K style), or None."""
    text = _tail(text)
    at = text.rfind(ANSWER_MARKER)
    if at < 0:
        return None
    rest = text[at + len(ANSWER_MARKER):]
    return _bounded(rest.split("\n", 1)[0])


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` with balanced (nested) braces, or None if unclosed."""
    text = _tail(text)
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    begin = start + len(_BOXED)
    for i in range(begin, min(len(text), begin + 4 * MAX_ANSWER_CHARS)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return _bounded(text[begin:i])
    return None


def extract_answer_line(text: str) -> str | None:
    """The value on the last ``answer: X`` line, or None."""
    found = None
    for match in _ANSWER_LINE.finditer(_tail(text)):
        found = match.group(1)
    return _bounded(found)


def extract_final_answer(text: str) -> str | None:
    """The final answer of a response: last ``#### X``, else last ``\\boxed{X}``, else ``answer: X``."""
    if not isinstance(text, str):
        return None
    for extract in (extract_marked, extract_boxed, extract_answer_line):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


def _strip_decorations(s: str) -> str:
    s = s.strip()
    if s.startswith("$") and s.endswith("$") and len(s) >= 2:
        s = s[1:-1].strip()
    boxed = extract_boxed(s) if s.startswith(_BOXED) else None
    if boxed is not None:
        s = boxed
    s = s.rstrip(".").strip()
    s = s.lstrip("$").strip()  # "$18" (GSM8K money)
    return s


def _parse_decimal(s: str) -> Fraction | None:
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    match = _DECIMAL.fullmatch(s)
    if match is None:
        return None
    if match.group(2) is not None:
        sign, whole, frac = match.group(1), match.group(2), match.group(3) or ""
    else:
        sign, whole, frac = match.group(4), "0", match.group(5)
    if len(whole) + len(frac) > MAX_NUMBER_DIGITS:
        return None
    value = Fraction(int(whole + frac), 10 ** len(frac))  # both strings are bounded ASCII digits
    return -value if sign == "-" else value


def parse_number(text: str) -> Fraction | None:
    """An exact rational from ``42``, ``-3``, ``+7``, ``1,234``, ``2.50``, ``3/4``, ``\\frac{3}{4}``, ``$18``.

    Returns None for anything else: exponents (``1e999999``), ``nan``, ``inf``, non-ASCII digits,
    more than MAX_NUMBER_DIGITS digits, a zero denominator.
    """
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    s = _strip_decorations(text)
    latex = _LATEX_FRAC.match(s)
    if latex is not None:
        sign, s = latex.group(1), f"{latex.group(2).strip()}/{latex.group(3).strip()}"
        value = parse_number(s)
        return None if value is None else (-value if sign else value)
    if s.count("/") == 1:
        num_text, den_text = (part.strip() for part in s.split("/"))
        num, den = _parse_decimal(num_text), _parse_decimal(den_text)
        if num is None or den is None or den == 0:
            return None
        return num / den
    return _parse_decimal(s)


def normalize_text_answer(text: str) -> str:
    """Whitespace-collapsed, decoration-stripped, case-folded answer for non-numeric comparison."""
    return " ".join(_strip_decorations(text).split()).casefold()


def answers_match(predicted: str | None, reference: str) -> bool:
    """Numeric answers compare as exact rationals; other answers as normalized strings."""
    if predicted is None:
        return False
    ref_value = parse_number(reference)
    if ref_value is not None:
        pred_value = parse_number(predicted)
        return pred_value is not None and pred_value == ref_value
    expected = normalize_text_answer(reference)
    return bool(expected) and normalize_text_answer(predicted) == expected


def format_number(value: Fraction | int) -> str:
    """Canonical string of an exact number: ``13``, ``-4``, ``3/4``."""
    value = Fraction(value)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def final_answer_reward(response: str, reference: str) -> float:
    """1.0 when the response's final answer equals the reference, else 0.0."""
    return 1.0 if answers_match(extract_final_answer(response), reference) else 0.0


# --- arithmetic expressions, parsed (never evaluated as code) ---------------------------------------

MAX_EXPRESSION_CHARS = 200
MAX_EXPRESSION_DEPTH = 32  # parentheses nesting; deeper input is rejected, never a RecursionError
MAX_VALUE_BITS = 640  # an intermediate value wider than this (~190 digits) rejects the expression
_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")


class ExpressionError(ValueError):
    """The text is not a bounded expression over integers with + - * / and parentheses."""


def _tokenize(text: str) -> list[str]:
    tokens, at = [], 0
    text = text.rstrip()
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            raise ExpressionError(f"unexpected character at {at}")
        number = match.group(1)
        if number is not None and len(number) > MAX_NUMBER_DIGITS:
            raise ExpressionError("number too long")
        tokens.append(number if number is not None else match.group(2))
        at = match.end()
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := atom (('*'|'/') atom)* ; atom := INT | '(' expr ')'.

    No unary operators: Countdown answers combine the given numbers with binary operations only.
    """

    def __init__(self, tokens: list[str]):
        self.tokens, self.at, self.numbers = tokens, 0, []

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("unexpected end of expression")
        self.at += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            value = _checked(value + self.term(depth) if self.take() == "+" else value - self.term(depth))
        return value

    def term(self, depth: int) -> Fraction:
        value = self.atom(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.atom(depth)
            if op == "/" and right == 0:
                raise ExpressionError("division by zero")
            value = _checked(value * right if op == "*" else value / right)
        return value

    def atom(self, depth: int) -> Fraction:
        token = self.take()
        if token == "(":
            if depth >= MAX_EXPRESSION_DEPTH:
                raise ExpressionError("parentheses nested too deep")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("expected ')'")
            return value
        if token.isascii() and token.isdigit():
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise ExpressionError(f"unexpected token {token!r}")


def _checked(value: Fraction) -> Fraction:
    # Each operation at most doubles the digits and there are at most ~100 of them; bound anyway so a
    # crafted expression cannot build a huge rational.
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_VALUE_BITS:
        raise ExpressionError("intermediate value too large")
    return value


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """The exact value of an integer expression with + - * / and parentheses, and the numbers it uses.

    Raises ExpressionError for anything else, including text over MAX_EXPRESSION_CHARS characters.
    """
    if not isinstance(text, str):
        raise ExpressionError("expression must be a string")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError("expression too long")
    parser = _Parser(_tokenize(text))
    value = parser.expr(0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected token {parser.peek()!r}")
    return value, parser.numbers
