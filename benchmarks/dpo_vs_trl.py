"""DPO training throughput on CPU: posttrain's learner against TRL's DPOTrainer, same model, data, loss and optimizer.

    python benchmarks/dpo_vs_trl.py [--steps 6] [--pairs 48] [--batch 8] [--mbs 8] [--threads 2]

One invocation builds a random Llama-style model (~48M parameters) and a word-level tokenizer, saves them once, and
trains sigmoid DPO (beta 0.1, AdamW, constant lr, grad clip 1.0, float32) on the same synthetic preference pairs, in
the same order, with:

posttrain packed:   LearnerWorker (torch backend) after posttrain's one-off reference pass; the sequences of a
                    micro-batch are packed into rows of max_length tokens (no padding; posttrain's default).
posttrain padded:   the same with one right-padded row per sequence (`packing: false`).
TRL default:        DPOTrainer, precompute_ref_log_probs=False: a reference-model forward on every step.
TRL precompute-ref: DPOTrainer, precompute_ref_log_probs=True: one reference pass over the dataset before training.

Each configuration runs in its own spawned process, so peak RSS (ru_maxrss) is its own. Tokens/s counts the real
(non-pad) tokens of the chosen and rejected sequences trained on, divided by the time of the training loop plus
whatever reference work the configuration needs (posttrain's reference pass, TRL's precompute); model loading,
tokenisation and optimizer construction are left out on both sides. At the first step the policy is the reference,
so both losses must be log 2, and both sides' mean chosen/rejected log-probs of that batch must agree.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# Inherited by the spawned children: posttrain imports deepspeed, which must not look for a GPU; nothing is downloaded.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
VOCAB = 28000  # with 6 layers of width 512 this gives ~48M parameters
MAX_LENGTH = 512  # longest possible sequence: <s> + 256 prompt words + 250 response words + </s> = 508
BETA = 0.1
OPTIM = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, grad_clip=1.0)


# ------------------------------------------------------------------------------------------------ model, data


def build_model_dir(path: Path, seed: int) -> int:
    """Save a random Llama-style model and its tokenizer to `path`; both sides load these files. Returns #params."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(VOCAB - len(SPECIALS))})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like Llama: <s> in front when special tokens are asked for (posttrain's prompts and TRL's texts both ask).
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=8, intermediate_size=1408, max_position_embeddings=1024,
                      tie_word_embeddings=False, attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Preference pairs as text: prompt and each response log-normal around 50 words (16-256 and 10-250 words).

    The responses start with a space: TRL tokenises prompt + response as one string, so without it the last prompt
    word and the first response word would fuse into one unknown word.
    """
    import numpy as np

    rng = np.random.default_rng(seed)

    def words(k: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, VOCAB - len(SPECIALS), k))

    def length(lo: int, hi: int) -> int:
        return int(np.clip(rng.lognormal(math.log(50), 0.7), lo, hi))

    return [{"prompt": words(length(16, 256)), "chosen": " " + words(length(10, 250)),
             "rejected": " " + words(length(10, 250))} for _ in range(n)]


def step_rows(step: int, batch: int, n: int) -> list[int]:
    """Dataset rows of optimizer step `step`: consecutive slices, wrapping around (what TRL's sequential sampler
    does with a dataloader that restarts each epoch)."""
    return [(step * batch + j) % n for j in range(batch)]


def child_setup(threads: int) -> None:
    """First thing in every child: the thread count, and only errors from the libraries (the figures are ours)."""
    import logging

    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Stopwatch:
    """Seconds spent inside wrapped callables, by label (wrappers only read perf_counter around the call)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


# ------------------------------------------------------------------------------------------------ posttrain


def run_posttrain(job: dict) -> dict:
    """posttrain's offline DPO path in-process (what `loops.preference.train_pairs` drives over Ray, world size 1)."""
    import torch

    child_setup(job["threads"])
    from posttrain.algorithms.preference_config import DPOConfig
    from posttrain.data.batching import PairExample, collate_pairs, encode_example, shard_pairs
    from posttrain.recipe.schema import OptimConfig
    from posttrain.workers.learner import LearnerSpec, LearnerWorker

    steps, batch, mbs, max_len = job["steps"], job["batch"], job["mbs"], job["max_length"]
    spec = LearnerSpec(model_path=job["model_dir"], dtype="float32", lora=None,
                       optim=OptimConfig(lr=OPTIM["lr"], warmup_steps=0, schedule="constant",
                                         grad_clip=OPTIM["grad_clip"], betas=list(OPTIM["betas"]), eps=OPTIM["eps"],
                                         weight_decay=OPTIM["weight_decay"]),
                       total_steps=steps, micro_batches_per_step=batch // mbs, micro_batch_size=mbs, backend="torch",
                       seed=0, threads=job["threads"])
    w = LearnerWorker(rank=0, world_size=1, spec=spec)
    w.setup("127.0.0.1", 0)  # the torch backend needs no process group
    tok, pad_id = w.tokenizer, w.tokenizer.pad_token_id

    pairs = []  # as posttrain's _encode_pair: prompt and each response tokenised separately, eos after the response
    for row in job["rows"]:
        c, cut_c = encode_example(tok, {"prompt": row["prompt"], "completion": row["chosen"]}, max_len)
        r, cut_r = encode_example(tok, {"prompt": row["prompt"], "completion": row["rejected"]}, max_len)
        assert not (cut_c or cut_r), "max_length too small: a pair would be truncated"
        pairs.append(PairExample(c, r))
    capacity = max_len if job["packed"] else None  # posttrain: capacity = max_length when packing (the default)

    # Split the learner's work into model forward / backward / optimizer; the rest of a step is posttrain's own
    # Python (collation, log-probs from the kept logits, the loss). Instance attributes shadow the class methods.
    clock = Stopwatch()
    w.model.forward = clock.wrap("forward", w.model.forward)
    w.engine.backward = clock.wrap("backward", w.engine.backward)
    w.engine.step = clock.wrap("clip+optimizer", w.engine.step)  # clipping, AdamW, scheduler, zero_grad

    # The reference pass, as loops.preference._reference_pass does it with one rank: every pair once, mbs at a time.
    cpu0 = time.process_time()  # CPU seconds of all this process's threads: shows whether others took the cores
    t0 = time.perf_counter()
    micro = [pairs[i : i + mbs] for i in range(0, len(pairs), mbs)]
    for mb, logps in zip(micro, w.sequence_logps([collate_pairs(mb, pad_id, capacity) for mb in micro])):
        for j, p in enumerate(mb):
            p.ref_chosen, p.ref_rejected = logps[j], logps[len(mb) + j]
    ref_s = time.perf_counter() - t0
    clock.take()

    step_s, losses, first, tokens, positions, head = [], [], {}, 0, 0, 0
    parts: dict[str, float] = {}
    for step in range(steps):
        chunk = [pairs[i] for i in step_rows(step, batch, len(pairs))]
        t0 = time.perf_counter()
        shards = shard_pairs(chunk, 1, mbs, pad_id, capacity)
        out = w.preference_step(step, shards[0], len(chunk), "dpo", DPOConfig(beta=BETA))
        step_s.append(time.perf_counter() - t0)
        for k, v in clock.take().items():
            parts[k] = parts.get(k, 0.0) + v
        losses.append(out["loss_sum"] / out["pairs"])
        if step == 0:
            first = {"logps_chosen": out["logps/chosen"] / out["pairs"],
                     "logps_rejected": out["logps/rejected"] / out["pairs"],
                     "ref_logps_chosen": statistics.fmean(p.ref_chosen for p in chunk),
                     "ref_logps_rejected": statistics.fmean(p.ref_rejected for p in chunk)}
        tokens += sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in chunk)
        positions += sum(mb.tokens.input_ids.numel() for mb in shards[0])
        head += sum(int(mb.tokens.logits_to_keep.sum()) for mb in shards[0])
    cpu_s = time.process_time() - cpu0
    parts["other"] = sum(step_s) - sum(parts.values())
    return {"name": f"posttrain {'packed' if job['packed'] else 'padded'}", "tokens": tokens, "step_s": step_s,
            "ref_s": ref_s, "total_s": ref_s + sum(step_s), "cpu_s": cpu_s, "loss0": losses[0], "losses": losses,
            **first, "rss_mib": peak_rss_mib(), "positions": positions, "head_positions": head, "parts": parts,
            "threads": torch.get_num_threads(), "mbs": mbs}


# ------------------------------------------------------------------------------------------------ TRL


def trl_config(job: dict, out_dir: str, **overrides):
    from trl import DPOConfig

    kwargs = dict(
        output_dir=out_dir, per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1,
        max_steps=job["steps"], logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        loss_type="sigmoid", beta=BETA, max_length=job["max_length"], precompute_ref_log_probs=job["precompute"],
        learning_rate=OPTIM["lr"], lr_scheduler_type="constant", warmup_steps=0, adam_beta1=OPTIM["betas"][0],
        adam_beta2=OPTIM["betas"][1], adam_epsilon=OPTIM["eps"], weight_decay=OPTIM["weight_decay"],
        max_grad_norm=OPTIM["grad_clip"],
        optim="adamw_torch",  # posttrain's torch.optim.AdamW (TRL's default would be the fused variant)
        bf16=False, gradient_checkpointing=False,  # TRL's defaults are bf16 and checkpointing; posttrain: neither
        train_sampling_strategy="sequential",  # no shuffle: both sides take consecutive slices of the dataset
        disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def run_trl(job: dict) -> dict:
    import torch

    child_setup(job["threads"])
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOTrainer

    clock = Stopwatch()
    marks: list[tuple[float, float]] = []  # (wall, CPU) at on_train_begin, then at the end of every optimizer step
    precompute_cpu: list[float] = []
    first_loss: list[float] = []

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):
            cpu0 = time.process_time()
            out = clock.wrap("precompute", super()._precompute_ref_logps)(*args, **kwargs)
            precompute_cpu.append(time.process_time() - cpu0)
            return out

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if model.training and not first_loss:  # the logged loss is the same number, averaged over 1 step
                first_loss.append(float(loss.detach()))
            return loss

    class Clock(TrainerCallback):
        opt_start = 0.0

        def on_train_begin(self, *_, **__):
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *_, **__):
            marks.append((time.perf_counter(), time.process_time()))

        def on_pre_optimizer_step(self, *_, **__):
            self.opt_start = time.perf_counter()

        def on_optimizer_step(self, *_, **__):
            clock.seconds["clip+optimizer"] += time.perf_counter() - self.opt_start

    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    rows = Dataset.from_list(job["rows"])
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Timed(model=job["model_dir"], args=trl_config(job, out_dir), train_dataset=rows,
                        processing_class=tok, callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # it prints every log dict; the figures are read from log_history
        precompute_s = clock.take().get("precompute", 0.0)
        # Same split as on the posttrain side: the policy forward (backbone + TRL's chunked log-prob head), the
        # reference forward, backward; the rest is clipping, the optimizer, collation and TRL's metrics.
        trainer.model.forward = clock.wrap("forward", trainer.model.forward)
        if trainer.ref_model is not None:
            trainer.ref_model.forward = clock.wrap("reference forward", trainer.ref_model.forward)
        trainer.accelerator.backward = clock.wrap("backward", trainer.accelerator.backward)
        trainer._clip_grad_norm = clock.wrap("clip+optimizer", trainer._clip_grad_norm)  # the callbacks add the step
        clock.seconds["clip+optimizer"] = 0.0
        result = trainer.train()
        parts = clock.take()
        data = trainer.train_dataset
        step_s = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
        cpu_s = marks[-1][1] - marks[0][1] + sum(precompute_cpu)
        parts["other"] = sum(step_s) - sum(parts.values())
        logs = [h for h in trainer.state.log_history if "logps/chosen" in h]
        tokens = positions = 0
        for step in range(job["steps"]):  # what TRL's collator builds: 2B rows padded to the longest sequence
            lens = [len(data[i]["prompt_ids"]) + len(data[i][k]) for i in step_rows(step, job["batch"], len(data))
                    for k in ("chosen_ids", "rejected_ids")]
            tokens += sum(lens)
            positions += len(lens) * max(lens)
        return {"name": f"TRL {'precompute-ref' if job['precompute'] else 'default'}", "tokens": tokens,
                "trl_num_tokens": logs[-1].get("num_tokens"), "step_s": step_s, "ref_s": precompute_s,
                "total_s": precompute_s + sum(step_s), "cpu_s": cpu_s,
                "train_runtime": result.metrics["train_runtime"],
                "loss0": first_loss[0], "logged_loss0": logs[0]["loss"], "losses": [h["loss"] for h in logs],
                "logps_chosen": logs[0]["logps/chosen"], "logps_rejected": logs[0]["logps/rejected"],
                "rss_mib": peak_rss_mib(), "positions": positions,
                # Off CUDA/XPU (no Triton) TRL's fused head scores every position of the padded batch.
                "head_positions": positions - 2 * job["batch"] * job["steps"], "parts": parts,
                "threads": torch.get_num_threads()}


def probe_trl_padding_free(job: dict) -> str:
    """Does TRL train padding-free on this machine? Build a trainer with padding_free=True and look."""
    child_setup(job["threads"])
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer = DPOTrainer(model=job["model_dir"], args=trl_config(job, out_dir, padding_free=True),
                                 train_dataset=Dataset.from_list(job["rows"][: job["batch"]]),
                                 processing_class=AutoTokenizer.from_pretrained(job["model_dir"]))
        except Exception as exc:  # noqa: BLE001 (reported, not handled)
            return f"refused: {type(exc).__name__}: {exc}"
        if trainer.padding_free:
            return "accepted (padding_free stays on)"
        import trl

        return (f"accepted, then switched off: TRL {trl.__version__} warns that padding-free is temporarily "
                "unavailable and trains on padded batches (trainer.padding_free is False after __init__)")


def in_child(fn, job: dict):
    """Run fn(job) in a fresh spawned interpreter, so each configuration's peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(fn, job).result()


# ------------------------------------------------------------------------------------------------ report


def tokens_per_s(r: dict) -> float:
    return r["tokens"] / r["total_s"]


def report(results: list[dict], n_params: int, args, pad_probe: str, wall_s: float) -> None:
    pt, trl = results[0], results[2]
    print(f"\nmodel: Llama-style, {n_params / 1e6:.1f}M parameters, vocab {VOCAB}, float32, sdpa; {args.pairs} "
          f"pairs, {args.steps} steps x {args.batch} pairs, max_length {MAX_LENGTH}, {args.threads} threads; posttrain "
          f"micro-batch {pt['mbs']} pairs")
    print(f"tokens trained (real, chosen + rejected sequences): {pt['tokens']} (TRL's own num_tokens: "
          f"{trl['trl_num_tokens']:.0f})\n")
    head = (f"{'configuration':<19}{'tokens/s':>9}{'step 1 s':>9}{'steps 2+ s':>11}{'ref s':>7}{'total s':>8}"
            f"{'RSS MiB':>8}{'CPU use':>8}{'loss step 1':>12}{'logps chosen':>14}{'logps rejected':>15}"
            f"{'loss last':>10}")
    print(head)
    print("-" * len(head))
    for r in results:
        later = statistics.fmean(r["step_s"][1:]) if len(r["step_s"]) > 1 else float("nan")
        print(f"{r['name']:<19}{tokens_per_s(r):>9.0f}{r['step_s'][0]:>9.2f}{later:>11.2f}"
              f"{r['ref_s']:>7.2f}{r['total_s']:>8.1f}{r['rss_mib']:>8.0f}{r['cpu_s'] / r['total_s']:>8.2f}"
              f"{r['loss0']:>12.6f}{r['logps_chosen']:>14.4f}{r['logps_rejected']:>15.4f}{r['losses'][-1]:>10.4f}")
    print("steps 2+ s: mean step time after the first.  ref s: posttrain's reference pass, TRL's precompute (TRL "
          "default has none:\n  its reference forwards are inside the steps).  total s: ref s + all steps, what "
          "tokens/s divides by.  CPU use: CPU seconds\n  / wall seconds over total s (2.00 = both threads busy "
          "throughout; less = waiting, or other processes shared the cores).\n  logps: mean summed response "
          "log-probs of the first batch, as each side computed them in its first step.")
    print(f"\nlog 2 = {math.log(2):.6f}; |loss step 1, posttrain - TRL| = {abs(pt['loss0'] - trl['loss0']):.1e} "
          f"(TRL's logged loss: {trl['logged_loss0']:.6f})")
    for key in ("logps_chosen", "logps_rejected"):
        rel = max(abs(r[key] - trl[key]) / abs(trl[key]) for r in results)
        print(f"first batch mean {key.split('_')[1]} log-prob: posttrain {pt[key]:.4f}, TRL {trl[key]:.4f}; "
              f"largest relative difference over the four configurations {rel:.1e}")
    print(f"posttrain's reference pass on the first batch: chosen {pt['ref_logps_chosen']:.4f}, rejected "
          f"{pt['ref_logps_rejected']:.4f} (the policy is the reference at step 1)")

    print("\nspeed-up (tokens/s / tokens/s; the issue's goal is >= 1.5x TRL):")
    for a in results[:2]:
        for b in results[2:]:
            print(f"  {a['name']:<17} / {b['name']:<19} {tokens_per_s(a) / tokens_per_s(b):.2f}x")
    print(f"  packing alone: posttrain packed / posttrain padded {tokens_per_s(pt) / tokens_per_s(results[1]):.2f}x")

    print("\nwhere the time goes (seconds, whole run; the forwards include the log-prob head):")
    for r in results:
        order = ("forward", "reference forward", "backward", "clip+optimizer", "other")
        parts = ", ".join(f"{k} {r['parts'][k]:.1f}" for k in order if k in r["parts"])
        ref = "reference pass" if r["name"].startswith("posttrain") else "precompute (in DPOTrainer.__init__)"
        runtime = f" (train_runtime {r['train_runtime']:.1f})" if "train_runtime" in r else ""
        print(f"  {r['name']:<19} {ref} {r['ref_s']:.1f}; steps {sum(r['step_s']):.1f}{runtime} = {parts}")
        print(f"  {'':<19} per forward over all steps: {r['positions']} token slots through the backbone "
              f"({r['tokens'] / r['positions']:.0%} real tokens), {r['head_positions']} through the LM head")
    print("  TRL, each step: a policy forward + backward over 2B right-padded rows (B chosen, then B rejected),\n"
          "    and, unless precompute is on, a no-grad reference-model forward over the same rows; without Triton\n"
          "    (CPU) its chunked log-prob head projects every position, prompt and padding included.")
    print("  posttrain, each step: one forward + backward over the packed (or padded) rows, projecting through\n"
          "    the LM head only the positions that predict a response token; reference log-probs come from the\n"
          "    one-off pass.")
    cores = min(args.threads, os.cpu_count() or 1)
    shared = [r["name"] for r in results if r["cpu_s"] / r["total_s"] < 0.85 * cores]
    if shared:
        print(f"\nWARNING: low CPU use in {', '.join(shared)}: other processes probably shared the cores while it "
              "ran, so its times are inflated; rerun on a quiet machine.")
    print(f"\nTRL padding_free=True on CPU: {pad_probe}")
    print(f"torch threads in the children: {sorted({r['threads'] for r in results})}")
    print(f"benchmark wall time: {wall_s:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration")
    ap.add_argument("--pairs", type=int, default=48, help="preference pairs in the dataset (default: one epoch)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (global batch)")
    ap.add_argument("--mbs", type=int, default=None, help="posttrain micro-batch in pairs (default: the whole batch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    mbs = args.mbs or args.batch
    if args.batch % mbs:
        ap.error("--batch must be a multiple of --mbs")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model_dir(Path(tmp) / "model", args.seed)
        job = {"model_dir": str(Path(tmp) / "model"), "rows": make_rows(args.pairs, args.seed), "steps": args.steps,
               "batch": args.batch, "mbs": mbs, "max_length": MAX_LENGTH, "threads": args.threads}
        results = [in_child(run_posttrain, {**job, "packed": True}), in_child(run_posttrain, {**job, "packed": False}),
                   in_child(run_trl, {**job, "precompute": False}), in_child(run_trl, {**job, "precompute": True})]
        pad_probe = in_child(probe_trl_padding_free, {**job, "precompute": False})
    report(results, n_params, args, pad_probe, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
