"""Online DPO labelled by a trained reward model vs by the verifier, from the same quickstart checkpoint.

    python benchmarks/reward_model_labels.py runs/quickstart-<time> [--out /tmp/rm-labels] [--rm-steps 200]

Reads a finished quickstart run and:
1. builds verified-vs-failed preference pairs from its own samples: the ReST-EM model's samples of the pool (the dpo
   stage's round-1 samples.jsonl) and the SFT model's (rest_em iter-1 e_step_samples.jsonl), with a fifth of the
   problems held out entirely (their ReST-EM pairs are the reward model's held-out set);
2. runs one recipe from the quickstart's ReST-EM checkpoint: greedy eval of the start; a `reward_model` stage
   (held-out pairwise accuracy); the quickstart's online dpo stage labelled by that reward model, then eval; the same
   dpo stage labelled by the verifier, then eval;
3. prints the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def verified_vs_failed(samples: Path) -> tuple[dict[str, tuple[list[str], list[str]]], dict[str, str]]:
    """problem id -> (distinct finished correct completions, distinct finished failed ones), and id -> prompt."""
    by_id: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    prompts: dict[str, str] = {}
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        if not s["finished"]:
            continue
        prompts[s["id"]] = s["prompt"]
        bucket = by_id[s["id"]][0 if s["correct"] else 1]
        if s["completion"] not in bucket:
            bucket.append(s["completion"])
    return by_id, prompts


def pair_rows(by_id, prompts, ids, per_problem: int = 2) -> list[dict]:
    rows = []
    for i in ids:
        good, bad = by_id.get(i, ([], []))
        rows += [{"id": f"{i}-{k}", "prompt": prompts[i], "chosen": c, "rejected": r}
                 for k, (c, r) in enumerate(list(zip(good, bad))[:per_problem])]
    return rows


def write_pairs(run: Path, out: Path, seed: int = 0) -> tuple[int, int]:
    policy, prompts = verified_vs_failed(run / "dpo" / "round-1" / "samples.jsonl")
    sft, sft_prompts = verified_vs_failed(run / "rest_em" / "iter-1" / "e_step_samples.jsonl")
    prompts.update(sft_prompts)
    problems = sorted(set(policy) | set(sft))
    random.Random(seed).shuffle(problems)
    held = set(problems[: len(problems) // 5])
    seen = [p for p in problems if p not in held]
    splits = {"train": pair_rows(policy, prompts, seen) + pair_rows(sft, prompts, seen),
              "test": pair_rows(policy, prompts, [p for p in problems if p in held])}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(splits["train"]), len(splits["test"])


def recipe(run: Path, pairs: Path, out: Path, rm_steps: int) -> dict:
    r = yaml.safe_load((run / "recipe.yaml").read_text())
    start = json.loads((run / "summary.json").read_text())
    start = next(s for s in start["stages"] if s["kind"] == "rest_em")["checkpoint"]
    dpo = next(s for s in r["stages"] if s["kind"] == "dpo")
    evaluation = {"kind": "eval", "data": dpo["data"], "split": "test", "greedy": True, "max_new_tokens": 40}
    by_rm = copy.deepcopy(dpo) | {"name": "dpo_rm", "model": start}
    by_rm["online"] = by_rm["online"] | {"label": "reward_model", "reward_model": "@rm"}
    by_verifier = copy.deepcopy(dpo) | {"name": "dpo_verifier", "model": start}
    r.update(name="reward-model-labels", tracking={"output_dir": str(out), "report": False})
    r["data"]["pairs"] = {"path": str(pairs), "format": "pairs"}
    r["stages"] = [
        evaluation | {"name": "eval_start", "model": start},
        {"kind": "reward_model", "name": "rm", "model": start, "data": "pairs", "train_split": "train",
         "eval_split": "test", "steps": rm_steps, "batch_size": 32, "micro_batch_size": 16, "max_length": 64,
         "optim": {"lr": 1e-3, "warmup_steps": 10}, "eval_every": 50, "save_every": rm_steps, "log_every": 20},
        by_rm, evaluation | {"name": "eval_rm", "model": "@dpo_rm"},
        by_verifier, evaluation | {"name": "eval_verifier", "model": "@dpo_verifier"},
    ]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished quickstart run directory (runs/quickstart-<time>)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rm-labels"))
    ap.add_argument("--rm-steps", type=int, default=200)
    args = ap.parse_args()
    run = args.run.resolve()
    n_train, n_test = write_pairs(run, args.out / "pairs")
    path = args.out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(run, args.out / "pairs", args.out / "runs", args.rm_steps), sort_keys=False))
    print(f"pairs: {n_train} for training, {n_test} held out; recipe {path}", flush=True)
    subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(path)], cwd=REPO, check=True)
    stages = {s["name"]: s for s in json.loads((args.out / "runs" / "reward-model-labels" / "summary.json")
                                               .read_text())["stages"]}
    rm = stages["rm"]["metrics"]
    print(f"\nreward model: held-out pairwise accuracy {rm['eval_accuracy']:.3f} on {rm['eval_pairs']:.0f} pairs "
          f"(train accuracy {rm['train_accuracy']:.3f})")
    print("held-out greedy pass@1 (1,000 problems):")
    print(f"  start (ReST-EM checkpoint)       {stages['eval_start']['metrics']['pass@1']:.3f}")
    for label in ("rm", "verifier"):
        dpo = stages[f"dpo_{label}"]["metrics"]
        print(f"  online DPO, {label + ' labels':<20} {stages[f'eval_{label}']['metrics']['pass@1']:.3f}"
              f"  ({dpo['pairs']:.0f} pairs)")


if __name__ == "__main__":
    main()
