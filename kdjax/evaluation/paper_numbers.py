"""Published GSM8K figures of arXiv 2412.17846 ("Enhancing Knowledge Distillation for LLMs with
Response-Priming Prompting", Goyal et al., 2024), for side-by-side reporting.

Only what could be checked against a source is filled in. The abstract (arxiv.org/abs/2412.17846
and its HTML rendering) states a relative gain, not absolute accuracies; the per-arm table could
not be retrieved here, so every absolute accuracy is None: NOT VERIFIED. Fill them in from the
paper's table (as fractions in [0, 1]) after reading it; never from memory.
"""

from __future__ import annotations

from typing import Optional

# Accuracy of Llama 3.1 8B Instruct students on the GSM8K test set, keyed by kdjax arm name.
# None: not verified (see module docstring).
PAPER_GSM8K_ACCURACY: dict[str, Optional[float]] = {
    "nodistill": None,  # the student without any training; not verified
    "finetune": None,  # LoRA fine-tuning on GSM8K without a teacher; not verified
    "base": None,  # distillation without priming; not verified
    "teacher": None,  # Teacher prompting; not verified
    "ground_truth": None,  # Ground Truth prompting; not verified
    "confidence": None,  # Confidence prompting; not verified
}

# From the abstract: "Ground Truth prompting results in a 55% performance increase on GSM8K for a
# distilled Llama 3.1 8B Instruct compared to the same model distilled without prompting". Most
# likely relative, accuracy(ground_truth) / accuracy(base) - 1 == 0.55; the abstract does not say
# whether percentage points were meant, so do not derive absolute figures from it.
GROUND_TRUTH_RELATIVE_GAIN_OVER_BASE = 0.55
