"""The maths of post-training: pure torch functions, no Ray, no distributed code.

ALGORITHMS maps a name used in recipes to its module; later stages add the DPO family,
PPO, GRPO/RLOO and ReST-EM here.
"""

from posttrain.algorithms import sft

ALGORITHMS = {"sft": sft}
ALGORITHM_DESCRIPTIONS = {
    "sft": "negative log-likelihood on completion tokens, normalised by the global batch's token count",
}
