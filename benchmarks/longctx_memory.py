"""Peak memory and seconds per training step against context length, per gradient engine, for one SSM.

Engines: autograd, autograd with per-layer checkpointing, adjoint exact, adjoint truncated (T̄ = --window).
Each point runs in a fresh process, so the peak is that step's alone: on CPU the peak resident set size
(ru_maxrss) minus the process's size after building the model and a small warm-up step; on a GPU (--device cuda)
torch.cuda.max_memory_allocated minus the memory held before the step. The context doubles from --min-tokens until
an engine passes --max-gib or --max-step-s (or --max-tokens). Prints a table, each engine's memory slope (bytes per
token, least squares over the points from 8K tokens on), the largest context measured within --max-gib and the one
the slope extrapolates to; writes a plot and a markdown table.

    .venv/bin/python benchmarks/longctx_memory.py                      # CPU, 1K .. 256K tokens
    .venv/bin/python benchmarks/longctx_memory.py --device cuda --max-tokens 1048576
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("autograd", "checkpoint", "adjoint", "truncated")
GIB = 1024**3


def child(engine: str, tokens: int, args) -> dict:
    import torch

    from posttrain.longctx.adjoint import Engine, loss_and_grad
    from posttrain.longctx.ssm import SelectiveSSMConfig, SelectiveSSMForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = SelectiveSSMForCausalLM(SelectiveSSMConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                                       state_size=args.state, num_layers=args.layers)).to(device)
    kind = {"truncated": "adjoint"}.get(engine, engine)
    eng = Engine(kind, window=args.window if engine == "truncated" else None, chunk=args.chunk)

    def step(T: int) -> float:
        ids = torch.randint(0, args.vocab, (args.batch, T), device=device)
        t0 = time.perf_counter()
        loss_and_grad(model, ids, ids, eng)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step(256)  # warm-up: kernels, allocator pools, gradient buffers (the fixed part, like parameters)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    seconds = step(tokens)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _maxrss_bytes()) - base
    return {"engine": engine, "tokens": tokens, "peak_bytes": max(0, peak), "step_s": seconds}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(engine: str, tokens: int, args) -> dict | None:
    cmd = [sys.executable, __file__, "--child", engine, str(tokens)] + _forward(args)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_step_s * 4 + 120)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        print(f"  {engine} at {tokens}: failed ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _forward(args) -> list[str]:
    keys = ("device", "threads", "vocab", "hidden", "state", "layers", "batch", "window", "chunk")
    return [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]


def slope(points: list[dict]) -> tuple[float, float]:
    """Least-squares (bytes per token, intercept) over the points from 8K tokens on (all of them if fewer than 2)."""
    use = [p for p in points if p["tokens"] >= 8192] or points
    if len(use) < 2:
        return float("nan"), float("nan")
    n = len(use)
    mx = sum(p["tokens"] for p in use) / n
    my = sum(p["peak_bytes"] for p in use) / n
    sxx = sum((p["tokens"] - mx) ** 2 for p in use)
    s = sum((p["tokens"] - mx) * (p["peak_bytes"] - my) for p in use) / sxx
    return s, my - s * mx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "TOKENS"), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--state", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--window", type=int, default=1024, help="T̄ of the truncated engine")
    p.add_argument("--chunk", type=int, default=1024, help="tokens per batched VJP")
    p.add_argument("--min-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=262144)
    p.add_argument("--max-gib", type=float, default=16.0)
    p.add_argument("--max-step-s", type=float, default=120.0)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args)))
        return

    print(f"model: K={args.layers} P={args.hidden} N={args.state} V={args.vocab}, batch {args.batch}, fp32, "
          f"{args.device} ({args.threads} threads); truncated window {args.window}; VJP chunk {args.chunk}")
    results: dict[str, list[dict]] = {}
    for engine in args.engines.split(","):
        results[engine] = []
        T = args.min_tokens
        while T <= args.max_tokens:
            r = measure(engine, T, args)
            if r is None:
                break
            results[engine].append(r)
            print(f"  {engine:10s} T={T:>8,d}  peak {r['peak_bytes'] / 2**20:9.1f} MiB  {r['step_s']:7.2f} s/step", flush=True)
            if r["peak_bytes"] > args.max_gib * GIB or r["step_s"] > args.max_step_s:
                break
            T *= 2
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = sorted({r["tokens"] for rs in results.values() for r in rs})
    head = "| tokens | " + " | ".join(f"{e} MiB | {e} s" for e in results) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(results))]
    for T in tokens:
        cells = []
        for e, rs in results.items():
            r = next((r for r in rs if r["tokens"] == T), None)
            cells += [f"{r['peak_bytes'] / 2**20:.1f}", f"{r['step_s']:.2f}"] if r else ["-", "-"]
        lines.append(f"| {T:,} | " + " | ".join(cells) + " |")
    lines += ["", "| engine | slope (bytes/token) | largest measured within budget | extrapolated to "
              f"{args.max_gib:g} GiB |", "|---|---|---|---|"]
    slopes = {}
    for e, rs in results.items():
        s, b = slope(rs)
        slopes[e] = s
        fit = [r["tokens"] for r in rs if r["peak_bytes"] <= args.max_gib * GIB]
        reach = (args.max_gib * GIB - b) / s if s == s and s > 0 else float("nan")
        lines.append(f"| {e} | {s:,.0f} | {max(fit):,} | {reach:,.0f} |" if fit else f"| {e} | {s:,.0f} | - | - |")
    if "autograd" in slopes and "adjoint" in slopes:
        lines.append("")
        lines.append(f"autograd / adjoint slope: {slopes['autograd'] / slopes['adjoint']:.2f}x"
                     + (f"; checkpoint / adjoint: {slopes['checkpoint'] / slopes['adjoint']:.2f}x"
                        if "checkpoint" in slopes else ""))
    # What the adjoint engine cannot avoid holding: each layer's x and h, then the top output (overwritten by dL/dy_K).
    stored = 4 * args.batch * (args.layers * (args.hidden + args.state) + args.hidden)
    lines.append(f"adjoint's stored state: 4 B x batch x (K (P + N) + P) = {stored:,} bytes/token"
                 + (f"; autograd / stored: {slopes['autograd'] / stored:.2f}x" if "autograd" in slopes else ""))
    table = "\n".join(lines)
    print("\n" + table)
    (out / f"longctx_memory_{args.device}.md").write_text(table + "\n")
    (out / f"longctx_memory_{args.device}.json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for e, rs in results.items():
        ax1.plot([r["tokens"] for r in rs], [r["peak_bytes"] / GIB for r in rs], "o-", label=e)
        ax2.plot([r["tokens"] for r in rs], [r["step_s"] for r in rs], "o-", label=e)
    for ax, label in ((ax1, "peak memory of a step (GiB)"), (ax2, "seconds per step")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"selective SSM K={args.layers} P={args.hidden} N={args.state}, batch {args.batch}, {args.device}")
    fig.tight_layout()
    fig.savefig(out / f"longctx_memory_{args.device}.png", dpi=120)
    print(f"\nwrote {out}/longctx_memory_{args.device}.{{png,md,json}}")


if __name__ == "__main__":
    main()
