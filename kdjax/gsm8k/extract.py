"""Numeric answer extraction and scoring for GSM8K outputs.

Five extraction rules are offered (see `RULES`):

* ``final`` (the primary rule, the default of eval and report): the final answer where people write one.
  Every answer marker of the common conventions is found: ``\\boxed{N}``, "(the) (final) answer is N",
  ``#### N`` (the number right after the hashes; "#### Step 2" is a markdown heading) and "Answer: N" (also
  "Final answer:", with markdown emphasis such as ``**Answer:** N``); the marker that starts last in the text
  gives the answer (the first number after it on its line, or on the next non-empty line when its own line
  holds nothing else). Without any marker: the last number. The rule is defined from these writing conventions
  alone, never tuned on model outputs; its test reads all 1319 GSM8K test reference solutions in 13 final-line
  forms without a misread.
* ``paper``: the rule described by the authors of arXiv 2412.17846 (README of their repo), with
  their implementation bugs fixed (signs kept, phrase matched in any case, the phrase branch uses
  the number after the phrase). Precedence: first ``\\boxed{...}`` holding a number; else the first
  line when all its numbers are the same value; else the first number after "the answer is" /
  "the final answer is" / "the correct answer is"; else the last number. Kept for comparison with the
  authors' numbers; its first-line branch misreads 26 of the 1319 GSM8K test reference solutions.
* ``strict``: lm-evaluation-harness "strict-match": ``#### N`` (gsm8k.yaml), then
  ``The answer is N`` (gsm8k-cot.yaml), then ``The final answer is N`` (gsm8k-cot-llama.yaml).
* ``flexible``: lm-evaluation-harness "flexible-extract": the last match of
  ``(-?[$0-9.,]{2,})|(-?[0-9]+)``.
* ``math_verify``: HuggingFace math-verify's ``parse``, run in a worker process under a time limit.

Every extractor returns a float, or None when nothing numeric was found (lm-eval's "[invalid]").
"""

from __future__ import annotations

import atexit
import bisect
import math
import multiprocessing
import re
import signal
import threading
from typing import Optional

RULES: tuple[str, ...] = ("final", "paper", "strict", "flexible", "math_verify")
PRIMARY_RULE = "final"

# Seconds one math-verify parse may take before the worker is killed and the answer is None.
MATH_VERIFY_TIMEOUT_S = 10.0


class GoldAnswerError(ValueError):
  """A GSM8K solution has no parseable `#### N` line."""


# --------------------------------------------------------------------------------------------
# Number parsing shared by the rules.

# A number as written in prose: optional sign, optional `$`, thousands groups or plain digits,
# optional decimals. ASCII digits only: Python's float() accepts other scripts' digits, which
# would turn stray Unicode into answers. The sign is only taken when it cannot be a binary minus
# (not right after a word character, closing bracket or period), so "3-4" reads as 3 and 4.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}.])(?P<sign>[-+\u2212]))?"
    r"\$?"
    r"(?P<body>[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
    r"(?![0-9])")


def _finite_or_none(value: float) -> Optional[float]:
  return value if math.isfinite(value) else None


def _number_value(match: re.Match) -> Optional[float]:
  value = float(match.group("body").replace(",", ""))
  if match.group("sign") in ("-", "\u2212"):
    value = -value
  # A thousand-digit string parses to inf; that is never an answer.
  return _finite_or_none(value)


def _numbers(text: str) -> list[float]:
  values = (_number_value(m) for m in _NUMBER.finditer(text))
  return [v for v in values if v is not None]


# --------------------------------------------------------------------------------------------
# The paper's rule.

_BOXED_START = re.compile(r"\\boxed\s*\{")
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_FRAC = re.compile(
    r"^(?P<sign>[-\u2212]?)\s*\\[dt]?frac"
    r"\s*\{\s*(?P<num>[0-9.,]+)\s*\}\s*\{\s*(?P<den>[0-9.,]+)\s*\}$")
_PLAIN_FRAC = re.compile(r"^(?P<sign>[-\u2212]?)\s*(?P<num>[0-9]+)\s*/\s*(?P<den>[0-9]+)$")
_ANSWER_PHRASE = re.compile(r"\bthe\s+(?:final\s+|correct\s+)?answer\s+is\b", re.IGNORECASE)


def _boxed_contents(text: str) -> list[tuple[int, str]]:
  """(start, content) of the outermost `\\boxed{...}`s in order; nested braces match, unclosed skipped."""
  # One pass pairing every brace, so many unclosed boxes cost linear, not quadratic, time.
  closing_of = {}
  open_positions = []
  for i, char in enumerate(text):
    if char == "{":
      open_positions.append(i)
    elif char == "}" and open_positions:
      closing_of[open_positions.pop()] = i
  contents = []
  examined_until = -1
  for start in _BOXED_START.finditer(text):
    brace = start.end() - 1
    # A box nested in one already taken is part of that one's content: skipping it keeps the
    # total work linear in the text length.
    if brace in closing_of and brace > examined_until:
      examined_until = closing_of[brace]
      contents.append((start.start(), text[start.end():examined_until]))
  return contents


def _fraction_value(match: re.Match) -> Optional[float]:
  try:
    numerator = float(match.group("num").replace(",", ""))
    denominator = float(match.group("den").replace(",", ""))
  except ValueError:
    return None
  if denominator == 0:
    return None
  value = numerator / denominator
  return _finite_or_none(-value if match.group("sign") else value)


def _boxed_value(content: str) -> Optional[float]:
  """The number inside one box: fractions, `x = 5`, units and LaTeX escapes are understood."""
  # `\\boxed{\\boxed{5}}`: the inner box marker is noise inside the outer one.
  cleaned = _BOXED_START.sub("{", content)
  cleaned = _LATEX_WRAPPER.sub(r" \1 ", cleaned)
  for old, new in (("{,}", ","), ("\\$", "$"), ("\\%", "%"), ("\\,", ""), ("\\!", ""),
                   ("\\;", " "), ("~", " ")):
    cleaned = cleaned.replace(old, new)
  cleaned = cleaned.strip()
  # Strip enclosing brace pairs in one slice (a loop of slices is quadratic on `{{{...}}}`).
  depth = min(len(cleaned) - len(cleaned.lstrip("{")), len(cleaned) - len(cleaned.rstrip("}")))
  cleaned = cleaned[depth:len(cleaned) - depth].strip()
  for pattern in (_LATEX_FRAC, _PLAIN_FRAC):
    match = pattern.match(cleaned)
    if match:
      return _fraction_value(match)
  # In `2 \times 3 = 6` the answer is what follows the last `=`.
  values = _numbers(cleaned.rsplit("=", 1)[-1])
  return values[0] if values else None


def _paper_answer(text: str) -> Optional[float]:
  for _, content in _boxed_contents(text):
    value = _boxed_value(content)
    if value is not None:
      return value
  first_line = text.strip().split("\n", 1)[0]
  values = _numbers(first_line)
  if values and all(v == values[0] for v in values):
    return values[0]
  phrase = _ANSWER_PHRASE.search(text)
  if phrase:
    values = _numbers(text[phrase.end():])
    if values:
      return values[0]
  values = _numbers(text)
  return values[-1] if values else None


# --------------------------------------------------------------------------------------------
# The primary rule: the last answer marker, else the last number.

# Markers after which an answer follows: "(the) (final|correct) answer is", "Answer:" (also "Final answer:",
# and markdown emphasis around the word or the colon: "**Answer:** 5", "**Answer**: 5"), and "#### N" only with
# the number right after it, since "#### Step 2" is a markdown heading.
_FINAL_MARKERS = re.compile(
    r"\banswer\s+is\b"
    r"|\banswer\s*(?:\*\*|__|\*|_)?\s*:"
    r"|####(?=[ \t]*[-+\u2212$]?[0-9.])",
    re.IGNORECASE)


# What may stand between a marker and an answer on a line of its own ("The final answer is:\n\n18").
_NOTHING_ON_LINE = re.compile(r"[ \t*_:$\\()\[\]]*(?:\n|\Z)")


def _final_answer(text: str) -> Optional[float]:
  # Every number once, with its position: each marker then finds the first number after it by bisection,
  # which keeps the rule linear in the text length however many markers there are.
  numbers = [(m.start(), value) for m in _NUMBER.finditer(text)
             if (value := _number_value(m)) is not None]
  starts = [position for position, _ in numbers]

  def number_after(position: int) -> Optional[float]:
    """The first number after `position` on its line, or on the next non-empty line when its line ends."""
    line_end = text.find("\n", position)
    line_end = len(text) if line_end < 0 else line_end
    index = bisect.bisect_left(starts, position)
    if index < len(numbers) and numbers[index][0] < line_end:
      return numbers[index][1]
    if not _NOTHING_ON_LINE.match(text, position):
      return None
    next_start = line_end + 1
    while next_start < len(text):
      next_end = text.find("\n", next_start)
      next_end = len(text) if next_end < 0 else next_end
      if text[next_start:next_end].strip():
        return numbers[index][1] if index < len(numbers) and numbers[index][0] < next_end else None
      next_start = next_end + 1
    return None

  best = None  # (position of the marker, its answer): the marker that starts last wins
  for start, content in _boxed_contents(text):
    value = _boxed_value(content)
    if value is not None:
      best = (start, value)
  # Markers from the last backwards: the first that holds a number is the last one that does.
  for marker in reversed(list(_FINAL_MARKERS.finditer(text))):
    if best is not None and marker.start() < best[0]:
      break
    value = number_after(marker.end())
    if value is not None:
      best = (marker.start(), value)
      break
  if best is not None:
    return best[1]
  return numbers[-1][1] if numbers else None


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness rules. The regexes are those of lm_eval/tasks/gsm8k/*.yaml.

_STRICT_HASHES = re.compile(r"#### (\-?[0-9\.\,]+)")
# gsm8k-cot.yaml ends this pattern with an unescaped `.`, which demands one more character
# after the number: at the very end of an output "The answer is 18" would yield "1". That
# quirk is not reproduced; a trailing period is removed by the normalisation instead.
_STRICT_ANSWER_IS = re.compile(r"The answer is (\-?[0-9\.\,]+)")
_STRICT_FINAL_ANSWER_IS = re.compile(r"The final answer is ((-?[$0-9.,]{2,})|(-?[0-9]+))")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _lm_eval_number(matched: str) -> Optional[float]:
  """lm-eval's `regexes_to_ignore` (`,`, `$`, one trailing `.`), then a float or None."""
  normalised = matched.strip().replace(",", "").replace("$", "")
  if normalised.endswith("."):
    normalised = normalised[:-1]
  # float() would also accept "nan", "inf" and "1_0"; only signed decimals are answers here.
  if not re.fullmatch(r"-?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)", normalised):
    return None
  return _finite_or_none(float(normalised))


def _regex_select(pattern: re.Pattern, text: str, index: int) -> Optional[str]:
  """lm-eval's RegexFilter: findall, take match `index`, first non-empty group of a tuple."""
  matches = pattern.findall(text)
  if not matches:
    return None
  match = matches[index]
  if isinstance(match, tuple):
    match = next((group for group in match if group), "")
  return match


def _strict_answer(text: str) -> Optional[float]:
  for pattern, index in ((_STRICT_HASHES, 0), (_STRICT_ANSWER_IS, 0),
                         (_STRICT_FINAL_ANSWER_IS, -1)):
    matched = _regex_select(pattern, text, index)
    value = _lm_eval_number(matched) if matched is not None else None
    if value is not None:
      return value
  return None


def _flexible_answer(text: str) -> Optional[float]:
  # Faithful to lm-eval: the last match wins even when it is punctuation such as "...",
  # which then scores as invalid.
  matched = _regex_select(_FLEXIBLE, text, -1)
  return _lm_eval_number(matched) if matched is not None else None


# --------------------------------------------------------------------------------------------
# math-verify, isolated in a worker process: sympy parsing of adversarial text can take
# unbounded time and its own signal-based timeout only works on the main thread.


def _math_verify_value(text: str) -> Optional[float]:
  """Runs inside the worker: math_verify.parse, then the first result as a float."""
  import math_verify  # pylint: disable=import-outside-toplevel
  import sympy  # pylint: disable=import-outside-toplevel

  parsed = math_verify.parse(text)
  for item in parsed:
    if not isinstance(item, sympy.Basic):
      continue
    # Several different boxed answers come back as a set: ambiguous, so no answer.
    if isinstance(item, sympy.FiniteSet):
      if len(item) != 1:
        return None
      item = next(iter(item))
    if isinstance(item, sympy.Eq):
      item = item.rhs
    # math-verify reads "50%" as 50 * (1/100); GSM8K answers percentages as the bare number.
    if isinstance(item, sympy.Mul):
      factors = [f.args[0] if isinstance(f, sympy.UnevaluatedExpr) else f for f in item.args]
      if sympy.Rational(1, 100) in factors:
        factors.remove(sympy.Rational(1, 100))
        item = sympy.Mul(*factors)
    try:
      value = float(sympy.N(item.doit()))
    except (TypeError, ValueError, AttributeError):
      return None
    return _finite_or_none(value)
  return None


def _math_verify_worker_main(connection) -> None:
  # The parent owns this process's lifetime (it closes the pipe or kills it); a Ctrl-C or a notebook kernel's
  # interrupt reaches the whole process group and would otherwise print a traceback from here at every exit.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # Import before reporting ready, so the caller's time limit covers parsing only.
  import math_verify  # pylint: disable=import-outside-toplevel,unused-import
  import sympy  # pylint: disable=import-outside-toplevel,unused-import
  connection.send("ready")
  while True:
    try:
      text = connection.recv()
    except EOFError:
      return
    try:
      value = _math_verify_value(text)
    except Exception:  # pylint: disable=broad-except
      # Any failure inside the library is "no answer", never a crash of the caller.
      value = None
    connection.send(value)


class _MathVerifyWorker:
  """One persistent worker process; killed and restarted when a parse overruns."""

  # Generous: a cold start imports sympy on a possibly busy machine.
  STARTUP_TIMEOUT_S = 120.0

  def __init__(self):
    self._lock = threading.Lock()
    self._process = None
    self._connection = None

  def _start(self) -> bool:
    # spawn: forking a process that already runs jax/XLA threads is unsafe.
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    self._process = context.Process(target=_math_verify_worker_main, args=(child_end,),
                                    daemon=True)
    self._process.start()
    child_end.close()
    self._connection = parent_end
    try:
      return parent_end.poll(self.STARTUP_TIMEOUT_S) and parent_end.recv() == "ready"
    except (EOFError, OSError):
      return False

  def stop(self) -> None:
    if self._process is not None:
      if self._process.is_alive():
        self._process.kill()
      self._process.join(timeout=5)
      self._connection.close()
    self._process = None
    self._connection = None

  def parse(self, text: str, timeout_s: float) -> Optional[float]:
    with self._lock:
      if self._process is None or not self._process.is_alive():
        self.stop()
        if not self._start():
          self.stop()
          return None
      try:
        self._connection.send(text)
        if self._connection.poll(timeout_s):
          value = self._connection.recv()
          return value if isinstance(value, float) else None
      except (EOFError, OSError):
        pass
      # Overran or died: the worker's state is unknown, so replace it on the next call.
      self.stop()
      return None


_MATH_VERIFY_WORKER = _MathVerifyWorker()
atexit.register(_MATH_VERIFY_WORKER.stop)


# --------------------------------------------------------------------------------------------
# Public API.


def extract_answer(text: str, rule: str = PRIMARY_RULE, *,
                   timeout_s: float = MATH_VERIFY_TIMEOUT_S) -> Optional[float]:
  """The numeric answer in a model output under `rule`, or None when there is none.

  Never raises for a string `text`. `timeout_s` bounds the math_verify rule only.
  """
  if rule not in RULES:
    raise ValueError(f"unknown extraction rule {rule!r}; expected one of {RULES}")
  if not isinstance(text, str):
    raise TypeError(f"text must be str, got {type(text).__name__}")
  if rule == "final":
    return _final_answer(text)
  if rule == "paper":
    return _paper_answer(text)
  if rule == "strict":
    return _strict_answer(text)
  if rule == "flexible":
    return _flexible_answer(text)
  return _MATH_VERIFY_WORKER.parse(text, timeout_s)


def extract_all(text: str) -> dict[str, Optional[float]]:
  """The answer under every rule in `RULES`."""
  return {rule: extract_answer(text, rule) for rule in RULES}


_GOLD_LINE = re.compile(r"^####\s*(.*?)\s*$", re.MULTILINE)


def gold_answer(solution: str) -> float:
  """The reference answer of a GSM8K solution, read from its `#### N` line."""
  lines = _GOLD_LINE.findall(solution)
  if not lines:
    raise GoldAnswerError(f"no '#### N' line in GSM8K solution: {solution[-80:]!r}")
  raw = lines[-1]
  try:
    value = float(raw.replace(",", "").replace("$", "").strip())
  except ValueError:
    raise GoldAnswerError(f"GSM8K answer line is not a number: '#### {raw}'") from None
  if not math.isfinite(value):
    raise GoldAnswerError(f"GSM8K answer line is not a finite number: '#### {raw}'")
  return value


def is_correct(pred: Optional[float], gold: float, tol: float = 1e-6) -> bool:
  """Whether `pred` equals `gold` within `tol`, relative or absolute; None is wrong."""
  if pred is None:
    return False
  return math.isclose(pred, gold, rel_tol=tol, abs_tol=tol)
