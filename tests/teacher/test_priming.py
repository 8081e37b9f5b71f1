"""Priming strategies and prompts, checked against the real SmolLM2 tokenizer and chat template."""

import copy as copy_module
import re
import pytest
import tokenizers
import transformers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from kdjax.teacher import priming

QUESTION = "Tom has 3 boxes with 12 pencils each. He gives away 7 pencils. How many are left?"
GOLD = "3 boxes hold 3*12 = <<3*12=36>>36 pencils.\nHe keeps 36-7 = <<36-7=29>>29.\n#### 29"
PRIMED = ("teacher", "ground_truth", "confidence", "gold_hint", "mismatched_hint")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
  return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def _word_level_tokenizer(vocab, eos_token="</s>"):
  backend = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = Whitespace()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, eos_token=eos_token, unk_token="<unk>")


def _render(tokenizer, messages):
  return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _priming(name):
  return priming.STRATEGIES[name].priming_text(GOLD)


def test_registry_has_the_six_strategies():
  assert set(priming.STRATEGIES) == {"base", "teacher", "ground_truth", "confidence", "gold_hint", "mismatched_hint"}
  for name, strategy in priming.STRATEGIES.items():
    assert strategy.name == name
    assert isinstance(strategy, priming.PrimingStrategy)
  assert priming.STRATEGIES["base"].priming_text(GOLD) is None
  texts = [_priming(name) for name in PRIMED if name != "mismatched_hint"]
  assert len(set(texts)) == len(texts) and all(texts)
  # The control is primed exactly as gold_hint: the same text around whichever solution it is given.
  assert _priming("mismatched_hint") == _priming("gold_hint")
  needing_gold = [name for name, strategy in priming.STRATEGIES.items() if strategy.needs_gold_solution]
  assert needing_gold == ["gold_hint", "mismatched_hint"]
  assert [name for name, s in priming.STRATEGIES.items() if getattr(s, "other_question", False)] == ["mismatched_hint"]
  with pytest.raises(AttributeError):
    priming.STRATEGIES["teacher"].instruction = "changed"  # frozen


def test_student_prompt_is_a_clean_chat_prefix(smollm2_tokenizer):
  tok = smollm2_tokenizer
  messages = priming.student_messages(QUESTION)
  ids = priming.encode_chat(tok, messages)
  text = _render(tok, messages)
  # Independent reference: tokenizing the rendered template text.
  assert ids == tok(text, add_special_tokens=False)["input_ids"]
  assert text.endswith("<|im_start|>assistant\n")
  assert QUESTION in text and priming.ANSWER_FORMAT_INSTRUCTION in text
  # The explicit system prompt replaces SmolLM2's built-in default one.
  assert "SmolLM" not in text
  for name in PRIMED:
    assert _priming(name) not in text
  assert "<<3*12=36>>" not in text and "#### 29" not in text
  # Prefix compatibility: prompt ids + response ids is how the full chat tokenizes.
  response = "3 boxes hold 36 pencils; 36 - 7 = 29.\n#### 29"
  full = tok.apply_chat_template(
      messages + [{"role": "assistant", "content": response}], tokenize=True, add_generation_prompt=False)
  full = full["input_ids"] if hasattr(full, "keys") else full
  assert full[:len(ids)] == ids
  assert tok.decode(full[len(ids):]).startswith(response)


@pytest.mark.parametrize("name", PRIMED)
def test_system_placement_puts_priming_in_the_system_turn(smollm2_tokenizer, name):
  tok = smollm2_tokenizer
  teacher = _render(tok, priming.teacher_messages(QUESTION, name, gold_solution=GOLD, placement="system"))
  student = _render(tok, priming.student_messages(QUESTION))
  system_turn, user_and_rest = teacher.split("<|im_start|>user\n", 1)
  assert system_turn.startswith("<|im_start|>system\n" + priming.SYSTEM_PROMPT)
  assert _priming(name) in system_turn
  # The user turn (and what follows) is exactly the student's.
  assert student.endswith("<|im_start|>user\n" + user_and_rest)
  teacher_ids = priming.encode_chat(tok, priming.teacher_messages(QUESTION, name, gold_solution=GOLD))
  assert teacher_ids == tok(teacher, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", PRIMED)
def test_user_prefix_placement_puts_priming_before_the_question(smollm2_tokenizer, name):
  tok = smollm2_tokenizer
  messages = priming.teacher_messages(QUESTION, name, gold_solution=GOLD, placement="user_prefix")
  text = _render(tok, messages)
  student = _render(tok, priming.student_messages(QUESTION))
  system_turn, user_turn = text.split("<|im_start|>user\n", 1)
  assert _priming(name) not in system_turn
  assert system_turn == student.split("<|im_start|>user\n", 1)[0]
  assert user_turn.index(_priming(name)) == 0
  assert user_turn.index(_priming(name)) < user_turn.index(QUESTION) < user_turn.index(
      priming.ANSWER_FORMAT_INSTRUCTION)


@pytest.mark.parametrize("placement", priming.PLACEMENTS)
def test_gold_hint_contains_the_gold_solution(smollm2_tokenizer, placement):
  messages = priming.teacher_messages(QUESTION, "gold_hint", gold_solution=GOLD, placement=placement)
  text = _render(smollm2_tokenizer, messages)
  assert GOLD in text
  other = priming.teacher_messages(QUESTION, "gold_hint", gold_solution="x\n#### 5", placement=placement)
  assert other != messages
  with pytest.raises(priming.PrimingError, match="needs the gold solution"):
    priming.teacher_messages(QUESTION, "gold_hint", placement=placement)


def test_base_teacher_prompt_equals_student_prompt():
  for placement in priming.PLACEMENTS:
    base = priming.teacher_messages(QUESTION, "base", placement=placement)
    assert base == priming.student_messages(QUESTION)
  # A strategy object works as well as its name.
  assert priming.teacher_messages(QUESTION, priming.STRATEGIES["teacher"]) == priming.teacher_messages(
      QUESTION, "teacher")


def test_unknown_strategy_and_placement_are_errors():
  with pytest.raises(priming.PrimingError, match="unknown priming strategy 'socratic'; known: base"):
    priming.teacher_messages(QUESTION, "socratic")
  with pytest.raises(priming.PrimingError, match="unknown placement 'assistant'"):
    priming.teacher_messages(QUESTION, "teacher", placement="assistant")


def test_encode_chat_accepts_list_and_batched_returns():
  class ListTokenizer:  # transformers 4.x style: a plain id list, or a batch of one
    def __init__(self, result):
      self.result = result

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
      assert add_generation_prompt and tokenize
      return self.result

  assert priming.encode_chat(ListTokenizer([5, 6, 7]), []) == [5, 6, 7]
  assert priming.encode_chat(ListTokenizer([[5, 6]]), []) == [5, 6]
  assert priming.encode_chat(ListTokenizer({"input_ids": [9]}), []) == [9]
  with pytest.raises(priming.PrimingError, match="batch of 2"):
    priming.encode_chat(ListTokenizer([[1], [2]]), [])


def test_stop_token_ids(smollm2_tokenizer):
  # SmolLM2: eos is <|im_end|> (id 2); it has neither <|eot_id|> nor <|end_of_text|>.
  assert priming.stop_token_ids(smollm2_tokenizer) == [2]
  llama_like = _word_level_tokenizer(
      {"<unk>": 0, "</s>": 1, "<|end_of_text|>": 2, "<|eot_id|>": 3, "hello": 4, "<|eom_id|>": 5})
  assert priming.stop_token_ids(llama_like) == [1, 3, 5, 2]
  # Llama 3.1 Instruct's own ids; its generation_config.json stops on eos_token_id [128001, 128008, 128009].
  llama31 = _word_level_tokenizer({"<unk>": 0, "hello": 1, "<|end_of_text|>": 128001, "<|eom_id|>": 128008,
                                   "<|eot_id|>": 128009}, eos_token="<|eot_id|>")
  assert sorted(priming.stop_token_ids(llama31)) == [128001, 128008, 128009]


# A Llama-3-style chat template, and the Llama 3.1 variant that adds a knowledge-date header to the system turn.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if m['role'] == 'system' and date_header is defined %}{{- date_header }}{%- endif %}"
    "{{- m['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
LLAMA31_TEMPLATE = ("{%- set date_header = 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' %}"
                    + LLAMA3_TEMPLATE)


def _with_template(tokenizer, template):
  copy = copy_module.deepcopy(tokenizer)
  copy.chat_template = template
  return copy


def test_chat_templates_must_render_the_same_student_prompt(smollm2_tokenizer):
  llama3 = _with_template(smollm2_tokenizer, LLAMA3_TEMPLATE)
  llama31 = _with_template(smollm2_tokenizer, LLAMA31_TEMPLATE)
  # Same vocabulary, same template: passes; the same template text on two tokenizer objects passes too.
  priming.check_same_tokenizer(llama3, _with_template(smollm2_tokenizer, LLAMA3_TEMPLATE))
  student_text = _render(llama3, priming.student_messages(QUESTION))
  header = "<|start_header_id|>system<|end_header_id|>\n\n"
  assert student_text.startswith(llama3.bos_token + header + priming.SYSTEM_PROMPT)
  # Same vocabulary (identical ids), different templates: the vocabulary check alone would pass.
  with pytest.raises(priming.TokenizerMismatchError, match="chat templates render the student prompt") as info:
    priming.check_same_tokenizer(llama31, llama3)
  message = str(info.value)
  assert "\n" not in message and "Cutting Knowledge" in message and "A careful" not in message
  assert "You are a careful" in message  # the student's side of the first difference
  with pytest.raises(priming.TokenizerMismatchError,
                     match=re.escape("the student's '<|start_header_id|>system")):
    priming.check_same_tokenizer(smollm2_tokenizer, llama3)
  with pytest.raises(priming.TokenizerMismatchError, match="the student tokenizer has no chat template"):
    priming.check_same_tokenizer(smollm2_tokenizer, _with_template(smollm2_tokenizer, None))


def test_same_tokenizer_passes(smollm2_tokenizer):
  priming.check_same_tokenizer(smollm2_tokenizer, smollm2_tokenizer)
  vocab = {"<unk>": 0, "</s>": 1, "a": 2, "b": 3}
  priming.check_same_tokenizer(_word_level_tokenizer(vocab), _word_level_tokenizer(dict(vocab)))


def test_tokenizer_mismatch_is_detected(smollm2_tokenizer):
  tiny = _word_level_tokenizer({"<unk>": 0, "</s>": 1, "a": 2, "b": 3})
  with pytest.raises(priming.TokenizerMismatchError, match=r"vocabulary sizes 49152 \(teacher\) vs 4"):
    priming.check_same_tokenizer(smollm2_tokenizer, tiny)
  swapped = _word_level_tokenizer({"<unk>": 0, "</s>": 1, "a": 3, "b": 2})
  with pytest.raises(priming.TokenizerMismatchError, match=r"token 'a' has id 2 \(teacher\) vs 3") as info:
    priming.check_same_tokenizer(tiny, swapped)
  assert "\n" not in str(info.value)
  renamed = _word_level_tokenizer({"<unk>": 0, "</s>": 1, "a": 2, "c": 3})
  with pytest.raises(priming.TokenizerMismatchError, match=r"token 'b' has id 3 \(teacher\) vs None"):
    priming.check_same_tokenizer(tiny, renamed)


def test_no_result_depends_on_the_pad_id():
  """Generation (the teacher's store, eval) and analyze take their pad id from `pad_token_id`, whose fallbacks
  (pad, else eos, else 0) differ from the rules they had (pad, else the first stop id; analyze: pad, else 0). A pad
  only fills masked positions and finished rows, so two pad ids give the same tokens, top-k log-probs and
  attention statistics, bit for bit: ragged prompts, refilled slots, rows ending at different steps."""
  import numpy as np
  from kdjax.evaluation import attention as analysis
  from kdjax.serving import generation
  from kdjax.models.llama import config as llama_config
  from kdjax.models.llama import model as model_lib
  model = model_lib.init_model(llama_config.get_preset("tiny"), seed=0)
  model.lm_head[...] = model.lm_head[...] * 20.0  # peaked distributions, so stop tokens come up
  prompts = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [100, 101, 102, 103, 104, 105, 106], [42], [3, 1, 4]]
  sampling = generation.SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)  # sampled: every logit counts
  free = generation.generate(model, prompts, sampling, stop_ids=[], pad_id=0, batch_size=2, topk_logprobs=4)
  stops = [free[0].tokens[2], free[1].tokens[5]]
  results = {}
  for pad_id in (0, 250):
    gens = generation.generate(model, prompts, sampling, stop_ids=stops, pad_id=pad_id, batch_size=2, topk_logprobs=4)
    runs = {"sampled": [(g.tokens, np.asarray(g.topk_ids).tobytes(), np.asarray(g.topk_logprobs).tobytes())
                        for g in gens]}
    collected = analysis.collect({"m": model}, prompts, batch_size=2, pad_id=pad_id, length_bucket=8)
    runs["analysis"] = [collected["per_question"]["m"][m].tobytes() for m in analysis.METRICS] + \
        [collected["first_maps"]["m"].tobytes()]
    results[pad_id] = runs
  assert results[250] == results[0]
  assert len({len(tokens) for tokens, _, _ in results[0]["sampled"]}) > 1  # rows ended at different steps


# ------------------------------------------------------------------------------------------ mismatched_hint


PINNED_DONORS = {0: 2, 2: 4, 4: 1, 1: 3, 3: 0}  # seed 0: sha256 order 0, 2, 4, 1, 3, each taking the next


def _is_one_cycle(donors: dict) -> bool:
  seen, current = set(), next(iter(donors))
  while current not in seen:
    seen.add(current)
    current = donors[current]
  return seen == set(donors)


def test_hint_donors_are_a_fixed_derangement_of_the_questions():
  ids = list(range(40, 0, -3))
  donors = priming.hint_donors(ids, seed=0)
  assert sorted(donors) == sorted(ids) and sorted(donors.values()) == sorted(ids)  # a permutation of the ids...
  assert all(donor != question for question, donor in donors.items())  # ...with no fixed point
  assert _is_one_cycle(donors)
  # Stable: the same for the ids in any order, on every call; another seed draws another derangement.
  assert priming.hint_donors(sorted(ids), seed=0) == donors == priming.hint_donors(ids[::-1], seed=0)
  assert priming.hint_donors(ids, seed=1) != donors
  # Pinned (a change here re-draws every mismatched_hint store): two questions swap; and a small case.
  assert priming.hint_donors([7, 3], seed=5) == {7: 3, 3: 7}
  assert priming.hint_donors([0, 1, 2, 3, 4], seed=0) == PINNED_DONORS
  for bad in ([], [4], [1, 1]):
    with pytest.raises(priming.PrimingError):
      priming.hint_donors(bad, seed=0)


def test_mismatched_hint_prompts_show_another_question_s_solution(smollm2_tokenizer, gsm8k_dir):
  """The teacher reads gold_hint's words around the donor's solution, never its own; the student reads neither."""
  from kdjax.gsm8k import data
  from kdjax.teacher import jax_engine as teacher
  questions = data.load_gsm8k(gsm8k_dir, "train")[:6]
  hints = teacher.hint_questions(questions, "mismatched_hint", hint_seed=0)
  donors = priming.hint_donors([q["id"] for q in questions], seed=0)
  assert {question: hint["id"] for question, hint in hints.items()} == donors
  instruction = priming.STRATEGIES["gold_hint"].instruction
  for question in questions:
    shown, own = (data.strip_calculator_annotations(q["answer"]).strip() for q in (hints[question["id"]], question))
    teacher_text = smollm2_tokenizer.decode(teacher.teacher_prompt_ids(
        smollm2_tokenizer, question, "mismatched_hint", "system", hint_question=hints[question["id"]]))
    student_text = smollm2_tokenizer.decode(teacher.student_prompt_ids(smollm2_tokenizer, question))
    assert shown in teacher_text and own not in teacher_text and instruction in teacher_text
    assert question["question"].strip() in teacher_text
    gold_text = smollm2_tokenizer.decode(teacher.teacher_prompt_ids(smollm2_tokenizer, question, "gold_hint", "system"))
    assert gold_text == teacher_text.replace(shown, own)  # exactly gold_hint's prompt, the solution swapped
    assert shown not in student_text and own not in student_text and instruction not in student_text
    assert "Reference solution:" not in student_text and question["question"].strip() in student_text
  with pytest.raises(teacher.TeacherError, match="give hint_question"):
    teacher.teacher_prompt_ids(smollm2_tokenizer, questions[0], "mismatched_hint", "system")
  with pytest.raises(teacher.TeacherError, match="give hint_question"):  # its own solution is not a mismatch
    teacher.teacher_prompt_ids(smollm2_tokenizer, questions[0], "mismatched_hint", "system", hint_question=questions[0])
