"""RewardModelWorker: scores (prompt, response) pairs with a trained reward model.

It tokenises exactly as the reward model was trained (`encode_example`: the prompt, rendered with the
chat template when the row has messages, then the response and eos), so a score means the same thing
at training and at labelling time. Sequences are length-sorted into batches to keep padding small.
"""

from __future__ import annotations

import torch

from posttrain.data.batching import collate, encode_example


class RewardModelWorker:
    def __init__(self, path: str, dtype: str = "float32", threads: int = 1, batch_size: int = 16,
                 max_length: int | None = None):
        from posttrain.models.load import load_reward_model, load_tokenizer

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_reward_model(path, dtype, lora=None, trainable=False).to(self.device)
        self.tokenizer = load_tokenizer(path)
        self.batch_size = batch_size
        self.max_length = max_length or getattr(self.tokenizer, "model_max_length", 4096)

    @torch.no_grad()
    def score(self, rows: list[dict], responses: list[str]) -> list[float]:
        """r(x, y) for each (prompt row, response); a row has `prompt` (text) or `messages` (a JSON chat history)."""
        examples = [encode_example(self.tokenizer, {"prompt": row.get("prompt"), "messages": row.get("messages"),
                                                    "completion": y}, self.max_length)[0]
                    for row, y in zip(rows, responses)]
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        scores = [0.0] * len(examples)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = collate([examples[i] for i in idx], self.tokenizer.pad_token_id)
            out = self.model(input_ids=batch.input_ids.to(self.device),
                             attention_mask=batch.attention_mask.to(self.device), use_cache=False)
            for i, r in zip(idx, out.logits.squeeze(-1).float().tolist()):
                scores[i] = r
        return scores
