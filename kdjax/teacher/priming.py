"""Response-priming strategies and the chat prompts built from them.

A teacher prompt is the student prompt plus one extra piece of text, the *priming*, placed either
at the end of the system message (`placement="system"`) or before the question in the user turn
(`placement="user_prefix"`). The student prompt never contains priming text or a gold hint: the
student learns to produce the primed teacher's response from the plain question alone.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

SYSTEM_PROMPT = "You are a careful assistant that solves grade-school math word problems."

# The only statement of the answer format; teacher and student prompts both include it, and the
# evaluation code extracts answers from the `#### <number>` line it asks for.
ANSWER_FORMAT_INSTRUCTION = (
    "Show your reasoning, then finish with a final line of the form `#### <number>`, "
    "where <number> is the numeric answer alone (no units or words).")

PLACEMENTS = ("system", "user_prefix")
Placement = Literal["system", "user_prefix"]

# Appended to eos when present: chat models end a turn with one of these rather than eos itself. Llama 3.1
# ends a turn with <|eot_id|>, or with <|eom_id|> ("end of message") where it expects a tool's reply; its
# generation config stops on both and on <|end_of_text|>.
_END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>")

# The question the chat-template check renders: any question shows a template difference, since templates
# differ in what they put around the messages, not in the question.
_TEMPLATE_PROBE_QUESTION = "Ann has 3 boxes of 12 pencils and gives away 7. How many pencils are left?"


class PrimingError(ValueError):
  """A strategy or placement is unknown, or a strategy is missing its inputs."""


class TokenizerMismatchError(ValueError):
  """Teacher and student tokenizers map tokens to ids differently."""


class PrimingStrategy(abc.ABC):
  """One way of priming the teacher: the text added to the teacher prompt, if any."""

  name: str
  needs_gold_solution: ClassVar[bool] = False

  @abc.abstractmethod
  def priming_text(self, gold_solution: str | None = None) -> str | None:
    """The text added to the teacher prompt (None: the teacher sees the student prompt)."""


@dataclasses.dataclass(frozen=True)
class NoPriming(PrimingStrategy):
  """The teacher answers the same prompt the student sees."""

  name: str = "base"

  def priming_text(self, gold_solution: str | None = None) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class InstructionPriming(PrimingStrategy):
  """A fixed instruction about how the teacher should write its answer."""

  name: str
  instruction: str

  def priming_text(self, gold_solution: str | None = None) -> str | None:
    return self.instruction


@dataclasses.dataclass(frozen=True)
class GoldHintPriming(PrimingStrategy):
  """The teacher is shown a reference solution and explains how to reach it.

  `other_question`: the solution shown is another question's (`hint_donors`), not the one asked: the control that
  tells "the teacher read a worked solution" from "the teacher read this question's solution".
  """

  name: str
  instruction: str
  solution_heading: str = "Reference solution:"
  other_question: bool = False
  needs_gold_solution: ClassVar[bool] = True

  def priming_text(self, gold_solution: str | None = None) -> str | None:
    if not gold_solution or not gold_solution.strip():
      raise PrimingError(f"strategy {self.name!r} needs the gold solution (gold_solution=...)")
    return f"{self.instruction}\n\n{self.solution_heading}\n{gold_solution.strip()}"


def _register(*strategies: PrimingStrategy) -> dict[str, PrimingStrategy]:
  return {strategy.name: strategy for strategy in strategies}


_GOLD_HINT_INSTRUCTION = (
    "You are shown a correct reference solution to the problem. Explain, in your own "
    "words and step by step, how to arrive at its answer, as if solving the problem "
    "yourself; do not mention that a solution was provided.")


STRATEGIES: dict[str, PrimingStrategy] = _register(
    NoPriming(),
    InstructionPriming(
        name="teacher",
        instruction=(
            "You are tutoring a pupil who is still learning this kind of problem. Work through "
            "it one small step at a time and say why each step follows, so the pupil could "
            "redo the reasoning alone.")),
    InstructionPriming(
        name="ground_truth",
        instruction=(
            "Write out a complete worked solution meant as study material for a smaller "
            "language model: name every intermediate quantity, show every calculation, and do "
            "not skip steps, so the smaller model can imitate the solution and learn from it.")),
    InstructionPriming(
        name="confidence",
        instruction=(
            "Before you state the final answer, verify it: recompute the key calculations, "
            "check that the result answers exactly what was asked, and correct any mistake "
            "you find.")),
    GoldHintPriming(name="gold_hint", instruction=_GOLD_HINT_INSTRUCTION),
    # The control of gold_hint: the same words around another question's reference solution.
    GoldHintPriming(name="mismatched_hint", instruction=_GOLD_HINT_INSTRUCTION, other_question=True),
)


def hint_donors(question_ids: Sequence[int], seed: int) -> dict[int, int]:
  """For a strategy showing another question's solution: question id -> the id whose solution its teacher reads.

  A fixed derangement of the store's questions: the ids in the order of sha256("kdjax-hint-donor:<seed>:<id>"),
  each taking the solution of the next one in that order and the last the first's. That is one cycle through every
  question, so no question gets its own solution. It depends on the seed and the set of ids alone (not on their
  order, nor on numpy's random streams), so a resumed or multi-process run draws the same. Raises PrimingError for
  fewer than 2 questions or a repeated id.
  """
  ids = [int(i) for i in question_ids]
  if len(set(ids)) != len(ids):
    raise PrimingError("hint donors need distinct question ids")
  if len(ids) < 2:
    raise PrimingError(f"another question's solution needs at least 2 questions, got {len(ids)}")
  order = sorted(ids, key=lambda i: (hashlib.sha256(f"kdjax-hint-donor:{seed}:{i}".encode()).hexdigest(), i))
  return {question: order[(position + 1) % len(order)] for position, question in enumerate(order)}


def get_strategy(strategy: str | PrimingStrategy) -> PrimingStrategy:
  """Looks a strategy up by name (a strategy object passes through)."""
  if isinstance(strategy, PrimingStrategy):
    return strategy
  try:
    return STRATEGIES[strategy]
  except KeyError:
    raise PrimingError(
        f"unknown priming strategy {strategy!r}; known: {', '.join(sorted(STRATEGIES))}") from None


def question_prompt(question: str) -> str:
  """The user-turn text both teacher and student see: the question and the answer format."""
  return f"{question.strip()}\n\n{ANSWER_FORMAT_INSTRUCTION}"


def _chat(system: str, user: str) -> list[dict]:
  return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def student_messages(question: str) -> list[dict]:
  """The student's chat: system prompt and question, with no priming text and no hint."""
  # An explicit system message keeps templates (SmolLM2, Qwen) from inserting their own default.
  return _chat(SYSTEM_PROMPT, question_prompt(question))


def teacher_messages(
    question: str,
    strategy: str | PrimingStrategy,
    *,
    gold_solution: str | None = None,
    placement: Placement = "system",
) -> list[dict]:
  """The teacher's chat: the student's chat plus the strategy's priming text.

  `placement="system"` appends the priming to the system message (the user turn is then
  identical to the student's); `"user_prefix"` puts it before the question in the user turn.
  """
  if placement not in PLACEMENTS:
    raise PrimingError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
  priming = get_strategy(strategy).priming_text(gold_solution)
  if priming is None:
    return student_messages(question)
  if placement == "system":
    return _chat(f"{SYSTEM_PROMPT}\n\n{priming}", question_prompt(question))
  return _chat(SYSTEM_PROMPT, f"{priming}\n\n{question_prompt(question)}")


def encode_chat(tokenizer: Any, messages: list[dict]) -> list[int]:
  """Token ids of a chat rendered by the tokenizer's template, ending with the assistant header."""
  encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  # transformers 5 returns a BatchEncoding (a Mapping) where 4.x returned the id list.
  if isinstance(encoded, Mapping):
    encoded = encoded["input_ids"]
  if hasattr(encoded, "tolist"):
    encoded = encoded.tolist()
  if encoded and isinstance(encoded[0], (list, tuple)):
    if len(encoded) != 1:
      raise PrimingError(f"expected one encoded chat, got a batch of {len(encoded)}")
    encoded = encoded[0]
  return [int(token) for token in encoded]


def pad_token_id(tokenizer: Any) -> int:
  """The id that pads prompts and fills finished rows: the tokenizer's pad token, else eos, else 0."""
  for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if candidate is not None:
      return int(candidate)
  return 0


def stop_token_ids(tokenizer: Any) -> list[int]:
  """Ids that end a generation: eos plus the end-of-turn tokens the vocabulary has."""
  vocab = tokenizer.get_vocab()
  ids: list[int] = []
  if tokenizer.eos_token_id is not None:
    ids.append(int(tokenizer.eos_token_id))
  for token in _END_OF_TURN_TOKENS:
    # Membership, not convert_tokens_to_ids: the latter maps unknown tokens to unk.
    if token in vocab and vocab[token] not in ids:
      ids.append(int(vocab[token]))
  return ids


def check_same_tokenizer(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
  """Raises TokenizerMismatchError unless both tokenizers have the same token->id map and chat template.

  Distillation on top-k ids only makes sense when an id means the same token to both models. And the store
  keeps the student prompt as the *teacher's* template renders it, while the student is evaluated on prompts
  its own template renders, so both must render the student prompt to the same ids
  (`check_same_student_prompt`).
  """
  teacher_vocab = teacher_tokenizer.get_vocab()
  student_vocab = student_tokenizer.get_vocab()
  if len(teacher_vocab) != len(student_vocab):
    raise TokenizerMismatchError(
        f"teacher and student tokenizers differ: vocabulary sizes {len(teacher_vocab)} "
        f"(teacher) vs {len(student_vocab)} (student)")
  if teacher_vocab != student_vocab:
    token = next(t for t in sorted(teacher_vocab) if student_vocab.get(t) != teacher_vocab[t])
    raise TokenizerMismatchError(
        f"teacher and student tokenizers differ: token {token!r} has id {teacher_vocab[token]} "
        f"(teacher) vs {student_vocab.get(token)} (student)")
  check_same_student_prompt(teacher_tokenizer, student_tokenizer)


def check_same_student_prompt(teacher_tokenizer: Any, student_tokenizer: Any,
                              question: str = _TEMPLATE_PROBE_QUESTION) -> None:
  """Raises TokenizerMismatchError (one line naming the first difference) unless the teacher's and the
  student's chat templates render `student_messages(question)` to the same token ids.

  Tokenizers without a chat template on both sides (plain test tokenizers) have nothing to compare.
  """
  templates = [getattr(t, "chat_template", None) for t in (teacher_tokenizer, student_tokenizer)]
  if not any(templates):
    return
  if not all(templates):
    missing = "teacher" if not templates[0] else "student"
    raise TokenizerMismatchError(f"the {missing} tokenizer has no chat template, the other has one: they cannot "
                                 f"render the same student prompt")
  messages = student_messages(question)
  teacher_ids = encode_chat(teacher_tokenizer, messages)
  student_ids = encode_chat(student_tokenizer, messages)
  if teacher_ids == student_ids:
    return
  first = next((i for i, (a, b) in enumerate(zip(teacher_ids, student_ids)) if a != b),
               min(len(teacher_ids), len(student_ids)))

  def shown(tokenizer, ids):
    text = tokenizer.decode(ids[first:first + 12], skip_special_tokens=False)
    return repr(text[:60] + ("..." if len(text) > 60 else "")) if ids[first:] else "the end of the prompt"

  raise TokenizerMismatchError(
      f"teacher and student chat templates render the student prompt differently: from token {first} the "
      f"teacher's has {shown(teacher_tokenizer, teacher_ids)}, the student's {shown(student_tokenizer, student_ids)} "
      f"({len(teacher_ids)} vs {len(student_ids)} tokens); the store would train the student on a prompt it is "
      f"never evaluated with: use a teacher and student that share a chat template")
