r"""Host-side math answer extraction and equivalence (the accuracy reward of DeepSeek-R1, arXiv 2501.12948).

`extract_answer(text)` returns, stripped, the first of:
  1. the content of the last well-formed `\boxed{...}` / `\fbox{...}` (nested braces handled), or the token
     after `\boxed ` written without braces (`\boxed 5`);
  2. the content of the last `<answer>...</answer>`;
  3. the rest of the last GSM8K `#### N` line;
and None when there is none (an empty answer counts as none).

`is_equivalent(predicted, gold)` never raises; any parse failure compares False, except that two strings
identical after normalisation always compare True. Steps:
  * Normalisation (both sides): whitespace, `$`, `\left`/`\right`/`\big`, `\displaystyle`, the spacing
    commands `\! \, \; \:` (so `1\,000` is 1000), `~`, `\dfrac`/`\tfrac`/`\cfrac` -> `\frac`, degrees
    (`^\circ`, `^{\circ}`, `°`), a trailing full stop, a `\boxed{...}` wrapper, a leading `x =` / `x \in`
    (one variable name), thousands separators (`1,000`, `1{,}000`; only when the whole answer is one
    number), `\text{...}`/`\mbox{...}`/`\mathrm{...}` after something else (a unit, dropped with a
    following `^2`), alone (unwrapped), or holding "and"/"or" (a comma), trailing unit words after a
    number (`5 cm`, `12 apples`), and common Unicode (−, ×, ·, ÷, π, √, ∞).
  * Percent: the sign is dropped, so `10\%` == `10` and `10\%` != `0.1` (the Hendrycks MATH convention:
    gold answers write `10\%` where models write `10`).
  * Structures, compared element by element with the scalar rule: `\begin{pmatrix}` (also bmatrix,
    matrix) by shape; unions `A \cup B` in order; a whole-string bracket group `(a,b)`, `[a,b)`, ... is
    ordered and its brackets must match exactly (intervals: `[1,2)` != `[1,2]`; tuples: `(1,2)` != `(2,1)`);
    sets `\{a,b\}` and bare comma lists `a, b` are unordered (multisets); `(5)` is `5`.
  * Scalars: mixed numbers (`1\frac{1}{2}`, `1 1/2`) are read as sums; everything else is read by a
    small LaTeX parser straight into sympy (no `eval`, no antlr): integers, decimals, scientific
    notation (`1e3`, `1.5\times10^{3}`), `\frac{a}{b}` / `\frac12`, `a/b`, `\sqrt{x}` / `\sqrt2` /
    `\sqrt[n]{x}`, `^`, `\cdot`, `\times`, `\div`, implicit multiplication (`2x`, `2\pi r`), `!`,
    `|x|`, `\lfloor\rfloor`, `\pi`, `\infty`, Greek letters, subscripted names (`x_1`),
    `\sin \cos \tan \ln \log \log_b \exp` and friends, `\binom`. Decimals are exact rationals.
    One `=` on both sides compares the equations `l - r` up to sign.
  * Numbers (no free symbols) compare with relative tolerance 1e-6 (absolute 1e-12 near zero);
    expressions compare by `expand(a - b) == 0`, then `simplify(a - b) == 0`, under a `timeout_s`
    SIGALRM time limit when called on the main thread with no timer already armed (otherwise rely on the
    caller's limit, e.g. `HostRewardRunner`). Exponents above 1000 in magnitude are refused.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from fractions import Fraction

import sympy

RELATIVE_TOLERANCE = 1e-6
ABSOLUTE_TOLERANCE = 1e-12
_MAX_EXPONENT = 1000
_MAX_LENGTH = 1000


# ---------------------------------------------------------------------------------------------------------
# Extraction.
# ---------------------------------------------------------------------------------------------------------


def _match_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at `open_index`, or None when unbalanced."""
    depth = 0
    for index in range(open_index, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed{...}`/`\\fbox{...}` (or `\\boxed 5`), or None."""
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)", text))):
        rest = match.end()
        if rest < len(text) and text[rest] == "{":
            close = _match_brace(text, rest)
            if close is not None:
                return text[rest + 1 : close].strip()
        elif rest < len(text) and text[rest] == " ":
            token = re.match(r"\s*([^\s$]+)", text[rest:])
            if token:
                return token.group(1).strip()
    return None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a completion: last boxed, else last <answer> tag, else GSM8K `####`; or None."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if tagged and tagged[-1].strip():
        return tagged[-1].strip()
    gsm8k = re.findall(r"####[ \t]*([^\n]*)", text)
    if gsm8k and gsm8k[-1].strip():
        return gsm8k[-1].strip()
    return None


# ---------------------------------------------------------------------------------------------------------
# Normalisation (string to string).
# ---------------------------------------------------------------------------------------------------------

_UNICODE = {"−": "-", "–": "-", "×": r"\times ", "·": r"\cdot ", "÷": r"\div ", "π": r"\pi ", "√": r"\sqrt",
            "∞": r"\infty ", "°": "", "\u2009": "", "\u00a0": " "}  # fmt: skip
_DROPPED = [r"\$", "$", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"{,}", r"^{\circ}", r"^\circ",
            r"\circ", r"\degree", r"\%", "%"]  # fmt: skip
_UNIT_TEXT = ("text", "textrm", "mbox", "mathrm")
_PLAIN_TEXT = ("textbf", "mathbf", "textit", "boldsymbol", "mathit")
_MATH_WORDS = {"pi", "sqrt", "sin", "cos", "tan", "log", "ln", "exp", "infty", "inf"}


def _rewrite_text_commands(s: str) -> str:
    """`\\text{cm}` after a value is a unit (dropped); alone it is the answer; "and"/"or" become commas."""
    pattern = re.compile(r"\\(" + "|".join(_UNIT_TEXT + _PLAIN_TEXT) + r")\s*\{")
    for _ in range(20):
        match = pattern.search(s)
        if not match:
            break
        close = _match_brace(s, match.end() - 1)
        if close is None:
            break
        content = s[match.end() : close].strip()
        before, after = s[: match.start()], s[close + 1 :]
        if content in ("and", "or", ","):
            replacement = ","
        elif match.group(1) in _UNIT_TEXT and before.strip() and not before.rstrip().endswith(("(", ",")):
            replacement = ""
            after = re.sub(r"^\s*\^\s*\{?[23]\}?", "", after)
        else:
            replacement = content
        s = before + replacement + after
    return s


def _normalize(text) -> str:
    """Canonical string form of an answer (see the module docstring)."""
    s = str(text).strip()
    if r"\boxed" in s or r"\fbox" in s:
        s = _last_boxed(s) or s
    for old, new in _UNICODE.items():
        s = s.replace(old, new)
    for token in _DROPPED:
        s = s.replace(token, "")
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\(?:quad|qquad)(?![a-zA-Z])|(?<!\\)\\ |~", " ", s)
    s = _rewrite_text_commands(s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    assignment = re.fullmatch(r"[a-zA-Z](?:_\{?\w+\}?)?\s*(?:=|\\in)\s*([^=]+)", s)
    if assignment:
        s = assignment.group(1).strip()
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    unit = re.fullmatch(
        r"(.*\d\}*)\s+([a-zA-Z]{2,}(?:\^\{?[23]\}?)?(?:\s+[a-zA-Z]{2,}(?:\^\{?[23]\}?)?)*)", s
    )
    if unit and not set(unit.group(2).lower().split()) & _MATH_WORDS:
        s = unit.group(1).strip()
    return s


def _squash(s: str) -> str:
    return s.replace(" ", "")


# ---------------------------------------------------------------------------------------------------------
# A small LaTeX -> sympy parser (recursive descent, builds sympy objects directly; never evaluates text).
# ---------------------------------------------------------------------------------------------------------


class _ParseError(ValueError):
    pass


_TOKEN_RE = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<number>(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<command>\\[a-zA-Z]+|\\[{}|])"
    r"|(?P<word>(?:sqrt|sin|cos|tan|log|ln|exp|pi|infty|inf)(?![a-zA-Z]))"
    r"|(?P<letter>[a-zA-Z])"
    r"|(?P<op>[-+*/^()\[\]{}!|_=,])"
)
_FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
    "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh,
    "cosh": sympy.cosh, "tanh": sympy.tanh, "ln": sympy.log, "log": sympy.log, "exp": sympy.exp,
}  # fmt: skip
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta",
          "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "phi", "varphi", "chi", "psi",
          "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}  # fmt: skip
_CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo, "inf": sympy.oo}
_BRACKET_FUNCTIONS = {"lfloor": ("rfloor", sympy.floor), "lceil": ("rceil", sympy.ceiling)}


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN_RE.match(text, position)
        if not match:
            raise _ParseError(f"unexpected character {text[position]!r}")
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
        position = match.end()
    return tokens


def _number(text: str) -> sympy.Expr:
    exponent = text.lower().partition("e")[2]
    if exponent and abs(int(exponent)) > _MAX_EXPONENT:
        raise _ParseError("exponent too large")
    value = Fraction(text)
    return sympy.Rational(value.numerator, value.denominator)


def _power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    if exponent.is_number and exponent.is_finite is not False:
        magnitude = abs(complex(sympy.N(exponent)))
        limit = _MAX_EXPONENT if base.is_number else 64
        if magnitude > limit:
            raise _ParseError("exponent too large")
    return sympy.Pow(base, exponent)


class _LatexParser:
    """expr := term (± term)*; term := unary ((* | / | implicit) unary)*; unary := ± unary | power;
    power := postfix (^ exponent)?; postfix := atom !*."""

    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.position = 0

    def parse(self) -> sympy.Expr:
        expression = self.expression()
        if self.position != len(self.tokens):
            raise _ParseError(f"unexpected {self.tokens[self.position][1]!r}")
        return expression

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (expected is not None and token[1] != expected):
            raise _ParseError(f"expected {expected!r}, got {token!r}")
        self.position += 1
        return token

    def accept(self, value: str) -> bool:
        token = self.peek()
        if token is not None and token[1] == value:
            self.position += 1
            return True
        return False

    def expression(self) -> sympy.Expr:
        value = self.term()
        while True:
            if self.accept("+"):
                value = value + self.term()
            elif self.accept("-"):
                value = value - self.term()
            else:
                return value

    def term(self) -> sympy.Expr:
        value = self.unary()
        while True:
            token = self.peek()
            if token is None:
                return value
            if token[1] in ("*", r"\cdot", r"\times"):
                self.position += 1
                value = value * self.unary()
            elif token[1] in ("/", r"\div"):
                self.position += 1
                value = value / self.unary()
            elif self.starts_factor(token):
                value = value * self.power()
            else:
                return value

    def starts_factor(self, token: tuple[str, str]) -> bool:
        kind, value = token
        if kind in ("number", "letter", "word"):
            return True
        if kind == "command":
            name = value[1:]
            return name in _FUNCTIONS or name in _GREEK or name in _CONSTANTS or name in (
                "frac", "sqrt", "binom", "lfloor", "lceil")  # fmt: skip
        return value in ("(", "{")

    def unary(self) -> sympy.Expr:
        if self.accept("-"):
            return -self.unary()
        if self.accept("+"):
            return self.unary()
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.postfix()
        if self.accept("^"):
            if self.peek() and self.peek()[1] in ("-", "+"):
                sign = -1 if self.take()[1] == "-" else 1
                return _power(base, sign * self.power())
            return _power(base, self.power())
        return base

    def postfix(self) -> sympy.Expr:
        value = self.atom()
        while self.accept("!"):
            if not (value.is_Integer and 0 <= value <= _MAX_EXPONENT):
                raise _ParseError("factorial of a non-integer or a large number")
            value = sympy.factorial(value)
        return value

    def argument(self) -> sympy.Expr:
        """A command argument: `{expr}`, or one character as in `\\frac12` / `\\sqrt2`."""
        token = self.peek()
        if token is None:
            raise _ParseError("missing argument")
        if token[1] == "{":
            self.position += 1
            value = self.expression()
            self.take("}")
            return value
        if token[0] == "number" and len(token[1]) > 1:
            self.tokens[self.position : self.position + 1] = [
                ("number", token[1][0]),
                ("number", token[1][1:]),
            ]
        return self.atom()

    def subscript(self) -> str:
        token = self.take()
        if token[1] != "{":
            return token[1]
        start = self.position
        while self.take()[1] != "}":
            pass
        return "".join(value for _, value in self.tokens[start : self.position - 1])

    def atom(self) -> sympy.Expr:
        kind, value = self.take()
        if kind == "number":
            return _number(value)
        if kind == "letter":
            return sympy.Symbol(value + ("_" + self.subscript() if self.accept("_") else ""))
        if value in ("(", "{"):
            inner = self.expression()
            self.take(")" if value == "(" else "}")
            return inner
        if value == "|":
            inner = self.expression()
            self.take("|")
            return sympy.Abs(inner)
        if kind not in ("command", "word"):
            raise _ParseError(f"unexpected {value!r}")
        name = value.lstrip("\\")
        if name in _CONSTANTS:
            return _CONSTANTS[name]
        if name == "frac":
            numerator = self.argument()
            return numerator / self.argument()
        if name == "binom":
            top = self.argument()
            return sympy.binomial(top, self.argument())
        if name == "sqrt":
            if self.accept("["):
                degree = self.expression()
                self.take("]")
                return sympy.root(self.argument(), degree)
            return sympy.sqrt(self.argument())
        if name in _BRACKET_FUNCTIONS:
            closer, function = _BRACKET_FUNCTIONS[name]
            inner = self.expression()
            self.take("\\" + closer)
            return function(inner)
        if name in _GREEK:
            return sympy.Symbol(name)
        if name in _FUNCTIONS:
            return self.function(name)
        raise _ParseError(f"unsupported command {value!r}")

    def function(self, name: str) -> sympy.Expr:
        base = None
        if name == "log" and self.accept("_"):
            base = self.argument()
        exponent = self.power() if self.accept("^") else None
        argument = self.atom() if self.peek() and self.peek()[1] == "(" else self.power()
        value = _FUNCTIONS[name](argument) if base is None else sympy.log(argument, base)
        return value if exponent is None else _power(value, exponent)


def _parse_scalar(text: str) -> sympy.Expr:
    mixed = re.fullmatch(r"([-+]?)(\d+)(?:\s*\\frac\{(\d+)\}\{(\d+)\}|\s+(\d+)/(\d+))", text)
    if mixed:
        sign, whole = mixed.group(1), int(mixed.group(2))
        numerator, denominator = [int(g) for g in mixed.groups()[2:] if g is not None]
        value = sympy.Integer(whole) + sympy.Rational(numerator, denominator)
        return -value if sign == "-" else value
    return _LatexParser(text).parse()


# ---------------------------------------------------------------------------------------------------------
# Comparison.
# ---------------------------------------------------------------------------------------------------------


class _SymbolicTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that sympy's `except Exception` blocks cannot swallow it."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """SIGALRM time limit on the main thread when no timer is armed; a no-op otherwise."""
    usable = (
        seconds
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise _SymbolicTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:  # Restored even if the alarm fires before it is disarmed.
            signal.signal(signal.SIGALRM, previous)


def _numbers_close(a: sympy.Expr, b: sympy.Expr) -> bool:
    """|a - b| <= max(rtol * max(|a|, |b|), atol), evaluated by mpmath at 30 digits (no float overflow)."""
    if a.is_finite is False or b.is_finite is False:
        return False
    difference = abs(sympy.N(a - b, 30))
    scale = max(abs(sympy.N(a, 30)), abs(sympy.N(b, 30)))
    return bool(difference <= max(RELATIVE_TOLERANCE * scale, ABSOLUTE_TOLERANCE))


def _sympy_equal(a: sympy.Expr, b: sympy.Expr) -> bool:
    if a == b:
        return True
    if not a.free_symbols and not b.free_symbols:
        return _numbers_close(a, b)
    difference = a - b
    return sympy.expand(difference) == 0 or sympy.simplify(difference) == 0


def _split_top_level(s: str, separator: str) -> list[str]:
    """Split on `separator` outside any (), [], {} nesting."""
    parts, depth, start, index = [], 0, 0, 0
    while index < len(s):
        char = s[index]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(separator, index):
            parts.append(s[start:index].strip())
            start = index + len(separator)
            index = start
            continue
        index += 1
    parts.append(s[start:].strip())
    return parts


def _bracket_group(s: str) -> tuple[str, str, list[str]] | None:
    """(open, close, items) when the whole string is one bracket group: `(1,2)`, `[0,1)`, `\\{1,2\\}`."""
    if s.startswith(r"\{") and s.endswith(r"\}"):
        inner, opening, closing = s[2:-2], "{", "}"
    elif len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner, opening, closing = s[1:-1], s[0], s[-1]
    else:
        return None
    depth = 0
    for char in inner:
        depth += (char in "([{") - (char in ")]}")
        if depth < 0:
            return None
    return (opening, closing, _split_top_level(inner, ",")) if depth == 0 else None


def _matrix(s: str) -> list[list[str]] | None:
    match = re.fullmatch(r"\\begin\{([pbvB]?matrix)\}(.*)\\end\{\1\}", s, flags=re.DOTALL)
    if not match:
        return None
    return [[cell.strip() for cell in row.split("&")] for row in match.group(2).split(r"\\") if row.strip()]


def _unordered_equal(predicted: list[str], gold: list[str]) -> bool:
    if len(predicted) != len(gold):
        return False
    unused = list(gold)
    for item in predicted:
        match = next((i for i, candidate in enumerate(unused) if _compare(item, candidate)), None)
        if match is None:
            return False
        unused.pop(match)
    return True


def _compare(predicted: str, gold: str) -> bool:
    """Structural comparison of two normalised answers (see the module docstring)."""
    if _squash(predicted) == _squash(gold):
        return True
    matrices = _matrix(predicted), _matrix(gold)
    if matrices[0] is not None or matrices[1] is not None:
        p, g = matrices
        return (
            p is not None
            and g is not None
            and [len(row) for row in p] == [len(row) for row in g]
            and all(
                _compare(a, b)
                for row_p, row_g in zip(p, g, strict=True)
                for a, b in zip(row_p, row_g, strict=True)
            )
        )
    unions = _split_top_level(predicted, r"\cup"), _split_top_level(gold, r"\cup")
    if len(unions[0]) > 1 or len(unions[1]) > 1:
        return len(unions[0]) == len(unions[1]) and all(_compare(a, b) for a, b in zip(*unions, strict=True))
    groups = _bracket_group(predicted), _bracket_group(gold)
    groups = tuple(g if g is None or len(g[2]) > 1 or g[0] == "{" else None for g in groups)
    lists = [
        g[2]
        if g is not None and g[0] == "{"
        else (parts if len(parts := _split_top_level(s, ",")) > 1 else None)
        for g, s in zip(groups, (predicted, gold), strict=True)
    ]
    if lists[0] is not None or lists[1] is not None:
        return _unordered_equal(lists[0] or [predicted], lists[1] or [gold])
    if groups[0] is not None or groups[1] is not None:
        p, g = groups
        return (
            p is not None
            and g is not None
            and p[:2] == g[:2]
            and len(p[2]) == len(g[2])
            and all(_compare(a, b) for a, b in zip(p[2], g[2], strict=True))
        )
    return _scalar_equal(predicted, gold)


def _scalar_equal(predicted: str, gold: str) -> bool:
    sides = _split_top_level(predicted, "="), _split_top_level(gold, "=")
    if len(sides[0]) == 2 and len(sides[1]) == 2:
        p = _parse_scalar(sides[0][0]) - _parse_scalar(sides[0][1])
        g = _parse_scalar(sides[1][0]) - _parse_scalar(sides[1][1])
        return _sympy_equal(p, g) or _sympy_equal(p, -g)
    if len(sides[0]) > 1 or len(sides[1]) > 1:
        return False
    return _sympy_equal(_parse_scalar(predicted), _parse_scalar(gold))


def is_equivalent(predicted, gold, *, timeout_s: float | None = 2.0) -> bool:
    """Whether `predicted` and `gold` denote the same answer (rules in the module docstring); never raises."""
    if predicted is None or gold is None:
        return False
    try:
        if max(len(str(predicted)), len(str(gold))) > _MAX_LENGTH:
            return bool(str(predicted).strip()) and str(predicted).strip() == str(gold).strip()
        p, g = _normalize(predicted), _normalize(gold)
        if _squash(p) == _squash(g):
            return bool(p)
        with _time_limit(timeout_s):
            return bool(_compare(p, g))
    except (Exception, _SymbolicTimeout, RecursionError):
        return False
