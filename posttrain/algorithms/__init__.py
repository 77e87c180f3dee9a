"""The maths of post-training: pure torch functions, no Ray, no distributed code.

ALGORITHMS maps a name used in recipes to its module; later stages add the DPO family,
PPO, GRPO/RLOO and ReST-EM here.
"""

from posttrain.algorithms import rest_em, sft

ALGORITHMS = {"sft": sft, "rest_em": rest_em}
ALGORITHM_DESCRIPTIONS = {
    "sft": "negative log-likelihood on completion tokens, normalised by the global batch's token count",
    "rest_em": "E-step filter: keep verified, finished samples, de-duplicated and capped per problem (Singh et al. 2023)",
}
