"""The 8-shot chain-of-thought GSM8K prompt behind Llama 3.1's published GSM8K number.

The exemplars are the eight hand-written chain-of-thought examples of Wei et al. (2022), "Chain-of-Thought
Prompting Elicits Reasoning in Large Language Models", Table 20 (not GSM8K items, so no test question leaks into
the prompt). Meta's Llama 3.1 evaluation (`gsm8k_cot_llama` in lm-evaluation-harness) shows them as prior chat
turns: each user turn wraps the question in a fixed instruction, each assistant turn is Wei et al.'s reasoning
with its closing "The answer is N." rewritten as "The final answer is N". Typed out here from the paper.
"""

from __future__ import annotations

# (question, reasoning without the closing answer sentence, answer)
WEI_ET_AL_EXEMPLARS: tuple[tuple[str, str, int], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6.", 6),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", 5),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39.", 39),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.",
     8),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9.", 9),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29.", 29),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls.", 33),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8.", 8),
)


def llama_cot_user_turn(question: str) -> str:
  """The user turn of Meta's GSM8K CoT format: the question wrapped in the answer-format instruction."""
  return ("Given the following problem, reason and give a final answer to the problem.\n"
          f"Problem: {question.strip()}\n"
          'Your response should end with "The final answer is [answer]" where [answer] is the response to the '
          "problem.")


def eight_shot_messages(question: str) -> list[dict]:
  """The 8-shot chat: eight exemplar user/assistant turns, then the question as the last user turn.

  No system message, as in Meta's evaluation: the chat template supplies its own default, if any.
  """
  messages: list[dict] = []
  for exemplar_question, reasoning, answer in WEI_ET_AL_EXEMPLARS:
    messages.append({"role": "user", "content": llama_cot_user_turn(exemplar_question)})
    messages.append({"role": "assistant", "content": f"{reasoning} The final answer is {answer}"})
  messages.append({"role": "user", "content": llama_cot_user_turn(question)})
  return messages
