"""Reward-augmented preference data (Zhang, Liu, Liu, Zhang, Yang, Liu, Chen, Sun, Wang 2024,
"Reward-Augmented Data Enhances Direct Preference Alignment of LLMs", arXiv:2410.08067).

A judge-scored pair (y_w scored s_w, y_l scored s_l) becomes two goal-conditioned pairs: given "target
score s_w", y_w beats y_l; given "target score s_l", y_l beats y_w. The policy learns what each score
level looks like instead of only pushing y_l down (which unlearns a rejected answer that was good too).
Train with any pairwise loss (the paper: DPO, beta 0.01, label smoothing 0.3) and condition on the
highest score at inference.
"""

from __future__ import annotations

import json

DEFAULT_TEMPLATE = "Target score: {score:g}\n{prompt}"


def condition_prompt(prompt: str, score: float, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt conditioned on a target score; also what to generate with at inference."""
    return template.format(score=score, prompt=prompt)


def reward_augment(prompt: str, chosen: str, rejected: str, score_chosen: float, score_rejected: float,
                   template: str = DEFAULT_TEMPLATE) -> list[dict[str, str]]:
    """Two preference examples {prompt, chosen, rejected} from one scored pair.

    `template` is a str.format string with {score} and {prompt}. The second example swaps the
    responses: under the lower target score the lower-scored response is the better match. With a tie
    the two examples contradict each other and only pull the margin towards 0; filter ties beforehand
    if that is not wanted.
    """
    if "{prompt" not in template or "{score" not in template:
        raise ValueError("template must contain {score} and {prompt} fields")
    return [
        {"prompt": condition_prompt(prompt, score_chosen, template), "chosen": chosen, "rejected": rejected},
        {"prompt": condition_prompt(prompt, score_rejected, template), "chosen": rejected, "rejected": chosen},
    ]


def augment_pair_row(row: dict, template: str = DEFAULT_TEMPLATE) -> list[dict]:
    """reward_augment on a loaded pair row (id, prompt or JSON `messages`, chosen, rejected, score_chosen,
    score_rejected): two rows with ids suffixed /w and /l. A conversational prompt is conditioned in its last
    user message, so the chat template still frames it."""
    out = []
    for suffix, ex in zip(("/w", "/l"), reward_augment(row["prompt"], row["chosen"], row["rejected"],
                                                        row["score_chosen"], row["score_rejected"], template)):
        new = {**row, **ex, "id": f"{row['id']}{suffix}"}
        if row.get("messages"):
            score = row["score_chosen"] if suffix == "/w" else row["score_rejected"]
            messages = json.loads(row["messages"])
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[last] = {**messages[last], "content": condition_prompt(messages[last]["content"], score, template)}
            new.update(prompt=row["prompt"], messages=json.dumps(messages))
        out.append(new)
    return out
