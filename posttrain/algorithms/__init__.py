"""The maths of post-training: pure torch functions, no Ray, no distributed code.

ALGORITHMS maps a name used in recipes to its module (`get_algorithm`).
The pairwise DPO-family losses share dpo.py (pick one with dpo.PAIRWISE_LOSSES[name]); TR-DPO is DPO
plus trdpo.py's reference updates.
"""

import importlib
from types import ModuleType

# Module paths, imported on use: the package itself stays free of torch (recipes import configs from it).
ALGORITHMS = {
    "sft": "posttrain.algorithms.sft",
    "rest_em": "posttrain.algorithms.rest_em",
    **{name: "posttrain.algorithms.dpo" for name in ("dpo", "cdpo", "rdpo", "ipo", "rpo", "hdpo", "exo", "simpo")},
    "kto": "posttrain.algorithms.kto",
    "trdpo": "posttrain.algorithms.trdpo",
    "reward_model": "posttrain.algorithms.reward_model",
    "ppo": "posttrain.algorithms.ppo",
    "grpo": "posttrain.algorithms.grpo",
    "rloo": "posttrain.algorithms.grpo",
}


def get_algorithm(name: str) -> ModuleType:
    return importlib.import_module(ALGORITHMS[name])


ALGORITHM_DESCRIPTIONS = {
    "sft": "negative log-likelihood on completion tokens, normalised by the global batch's token count",
    "rest_em": "E-step filter: keep verified, finished samples, de-duplicated and capped per problem (Singh et al. 2023)",
    "dpo": "-log sigma(beta h) on the policy/reference log-ratio margin h of a preference pair (Rafailov et al. 2023)",
    "cdpo": "DPO against soft labels (label smoothing eps): finite optimal margin (Mitchell 2023)",
    "rdpo": "DPO de-biased for symmetric label flips at rate eps, divided by 1-2eps (Chowdhury et al. 2024)",
    "ipo": "squared regression of the margin h onto 1/(2 tau) (Azar et al. 2023)",
    "rpo": "DPO plus eta times the NLL of the chosen response (Pang et al. 2024)",
    "hdpo": "DPO with the policy log-probs scaled by alpha, controlling the entropy of the optimum (Omura et al. 2024)",
    "exo": "reverse KL from sigma(beta h) to the label distribution (1-eps, eps) (Ji et al. 2024)",
    "simpo": "reference-free: -log sigma(beta (length-averaged log-prob gap) - gamma) (Meng et al. 2024)",
    "kto": "unpaired good/bad labels: sigmoid value of the log-ratio vs a batch KL reference point (Ethayarajh et al. 2024)",
    "trdpo": "DPO with a reference moved towards the policy every tau steps, soft or hard (Gorbatovski et al. 2024)",
    "reward_model": "Bradley-Terry -log sigma(r_w - r_l) on a scalar head, optional centring term (Ouyang et al. 2022)",
    "ppo": "clipped surrogate, clipped value loss, GAE, token KL penalty, running reward norm (PPO-max, Zheng et al. 2023)",
    "grpo": "group-normalised outcome advantages, clipped surrogate, k3 KL loss term (Shao et al. 2024)",
    "rloo": "leave-one-out baseline r_i - mean of the other samples' rewards (Ahmadian et al. 2024)",
}
