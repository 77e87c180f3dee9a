"""Ray: start an embedded local instance or connect to a cluster, and place each role's actors.

Each stage creates the actors it needs and removes them when it ends, so a laptop with a few
cores can run learners in one stage and samplers in the next.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from posttrain.errors import PosttrainError
from posttrain.recipe.schema import ClusterConfig

log = logging.getLogger(__name__)

# The phases of each stage kind: the actor roles alive at the same time in each (resource check and plan).
STAGE_PHASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "sft": (("learner",),),
    "eval": (("sampler", "verifier"),),
    "rest_em": (("sampler", "verifier"), ("learner",)),  # E-step and eval, then M-step: never together
    "dpo": (("learner",),),  # offline: pairs from a dataset
    "dpo_online": (("sampler", "verifier"), ("learner",)),  # each round samples and labels, then trains
    "dpo_online_rm": (("sampler",), ("reward_model",), ("learner",)),  # sample, then score with a reward model
    "reward_model": (("learner",),),
    # Online RL: every role lives for the whole stage (sampling, scoring and updates take turns each step).
    "rl": (("learner", "sampler", "verifier"),),
    "rl_rm": (("learner", "sampler", "reward_model"),),
    "ppo": (("learner", "critic", "sampler", "verifier"),),
    "ppo_rm": (("learner", "critic", "sampler", "reward_model"),),
    # Long-context SSM training runs in the driver; with gradient.workers > 0 its adjoint VJPs go to Ray workers.
    "longctx_sft": (("adjoint_shard",),),
}
COLOCATED = ("learner", "critic", "sampler")  # the roles an RL stage with `colocate: true` puts on shared resources
# One torch.distributed group each: their ranks all-reduce every step, so they are packed on few nodes.
GROUPED = ("learner", "critic")


def phase_key(stage) -> str:
    """The STAGE_PHASES entry of a stage: its kind, dpo_online(_rm) for a dpo stage with `online` set, and
    rl / ppo (+ _rm with a reward model) for the online RL kinds."""
    online = getattr(stage, "online", None)
    if stage.kind == "dpo" and online:
        return "dpo_online_rm" if online.label == "reward_model" else "dpo_online"
    if stage.kind in ("ppo", "grpo", "rloo"):
        base = "ppo" if stage.kind == "ppo" else "rl"
        return base + ("_rm" if stage.reward.source == "reward_model" else "")
    return stage.kind


@dataclass
class Demand:
    role: str
    actors: int
    cpus: float  # per actor
    gpus: float

    def __str__(self) -> str:
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.actors} {self.role} actor(s) x {self.cpus:g} CPU{gpu}"


def stage_phases(cfg: ClusterConfig, stage) -> list[list[Demand]]:
    """The actors of each phase of `stage` with what each reserves. The critic is a second learner group.

    Colocated roles (an RL stage's `colocate`) take turns on the same CPUs/GPUs, so each reserves its configured
    share divided by the number of colocated roles (Ray's fractional resources)."""
    if stage.kind == "longctx_sft":
        workers = stage.gradient.workers
        return [[Demand("adjoint_shard", workers, 1.0, 0.0)]] if workers else [[]]
    roles = {"learner": cfg.learner, "critic": cfg.learner, "sampler": cfg.sampler, "verifier": cfg.verifier,
             "reward_model": cfg.reward_model}
    phases = []
    for phase in STAGE_PHASES[phase_key(stage)]:
        shared = [r for r in phase if r in COLOCATED] if getattr(stage, "colocate", False) else []
        k = max(1, len(shared))
        phases.append([Demand(r, roles[r].actors, roles[r].cpus / (k if r in shared else 1),
                              getattr(roles[r], "gpus", 0.0) / (k if r in shared else 1)) for r in phase])
    return phases


def local_resources(cfg: ClusterConfig) -> dict[str, float]:
    return {"CPU": float(cfg.num_cpus or os.cpu_count() or 1), "GPU": float(cfg.num_gpus)}


def check_fits(stage: str, demands: list[Demand], available: dict[str, float]) -> None:
    """Refuse a stage whose actors cannot all be placed at once, saying which knob to turn."""
    for res, key in (("CPU", "cpus"), ("GPU", "gpus")):
        need = sum(d.actors * getattr(d, key) for d in demands)
        have = available.get(res, 0.0)
        if need > have + 1e-9:
            parts = " + ".join(str(d) for d in demands if getattr(d, key))
            raise PosttrainError(
                f"stage {stage!r} needs {need:g} {res}s ({parts}) but the Ray cluster has {have:g}. "
                f"Lower cluster.<role>.actors or cluster.<role>.{key}"
                + (", or raise cluster.num_cpus" if res == "CPU" else ", or run where GPUs are available")
            )


@contextmanager
def ray_session(cfg: ClusterConfig, env: dict[str, str]) -> Iterator[dict[str, float]]:
    """Start or join Ray for the run; yields the cluster's total resources."""
    import ray

    runtime_env = {"env_vars": env}
    if cfg.address == "local":
        res = local_resources(cfg)
        ray.init(num_cpus=int(res["CPU"]), num_gpus=int(res["GPU"]), include_dashboard=False,
                 logging_level=logging.WARNING, runtime_env=runtime_env, configure_logging=True)
    else:
        _probe(cfg.address)
        try:
            ray.init(address=cfg.address, runtime_env=runtime_env, logging_level=logging.WARNING)
        except Exception as exc:  # ConnectionError, or RuntimeError/ValueError on malformed addresses
            raise PosttrainError(
                f"cluster.address: could not connect to Ray at {cfg.address!r} ({type(exc).__name__}: {exc}). "
                "Start a cluster there (`ray start --head`) or use cluster.address=local for an embedded one."
            ) from None
    try:
        yield {k: float(v) for k, v in ray.cluster_resources().items()}
    finally:
        ray.shutdown()


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a cluster address (Ray itself retries for long)."""
    import socket

    if address == "auto":
        return  # Ray reads the local cluster's address file and fails fast on its own
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except ValueError:
        problem = "expected host:port, ray://host:port or auto"
    except OSError as exc:
        problem = f"nothing answered at {hostport} within {timeout_s:g} s ({exc.strerror or exc})"
    raise PosttrainError(
        f"cluster.address: cannot reach Ray at {address!r}: {problem}. Start a cluster there (`ray start --head`) "
        "or use cluster.address=local for an embedded one."
    )


@dataclass
class ActorGroup:
    """The actors of one role for one stage; closing it frees their resources for the next stage."""

    actors: list
    placement: object = None

    def __enter__(self) -> list:
        return self.actors

    def __exit__(self, *exc) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        if self.placement is not None:
            ray.util.remove_placement_group(self.placement)


def placement_strategy(demand: Demand, grouped: bool) -> str | None:
    """The Ray placement-group strategy of a role's actors (one bundle per actor), or None for no group.

    A distributed group (learners, the critic: grouped) is PACKed: Ray puts every bundle on one node when one has
    room, so ZeRO's collectives stay on NVLink, and spans the fewest nodes otherwise (STRICT_PACK would wait forever
    instead). Independent GPU actors (vLLM samplers, reward models) SPREAD over nodes, so they do not share a host's
    memory, PCIe links or failures. CPU-only actors need no group: Ray's default scheduling, as before."""
    if grouped:
        return "PACK"
    return "SPREAD" if demand.gpus else None


def spawn(cls: type, demand: Demand, args_per_actor: list[tuple], pack: bool = False) -> ActorGroup:
    """Create one actor of `cls` per argument tuple, each reserving the role's CPUs/GPUs.

    pack=True: the actors form one distributed group (learners). The placement group, if any, follows
    placement_strategy.
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    remote = ray.remote(cls)
    opts: list[dict] = [dict(num_cpus=demand.cpus, num_gpus=demand.gpus) for _ in args_per_actor]
    pg = None
    strategy = placement_strategy(demand, grouped=pack)
    if strategy:
        bundle = {"CPU": demand.cpus, **({"GPU": demand.gpus} if demand.gpus else {})}
        pg = placement_group([bundle] * len(args_per_actor), strategy=strategy)
        ready, _ = ray.wait([pg.ready()], timeout=120)
        if not ready:
            ray.util.remove_placement_group(pg)
            raise PosttrainError(f"could not place {demand} within 120 s: the cluster lacks free resources")
        for i, o in enumerate(opts):
            o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
    return ActorGroup([remote.options(**o).remote(*a) for o, a in zip(opts, args_per_actor)], pg)


def gather(refs: list) -> list:
    """ray.get for a group's calls that fails fast: the first actor error is raised at once.

    When one rank of a process group dies, the others block in their next collective; waiting for
    every result in order would hang on a survivor. Raising here lets the caller tear the group down.
    """
    import ray

    results: dict = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results[ready[0]] = ray.get(ready[0])  # raises RayActorError / RayTaskError for a failed actor
    return [results[r] for r in refs]


def round_robin(actors: list, method: str, batches: list, lockstep: bool = False) -> list:
    """Batch i goes to actor i % n, one call per actor; the results come back in batch order.

    lockstep: every actor gets the same number of batches (the last is repeated, its extra results dropped), as
    ZeRO-3 ranks must run their forwards together."""
    n, real = len(actors), len(batches)
    if lockstep and batches:
        batches = batches + [batches[-1]] * (-real % n)
    outs = gather([getattr(a, method).remote(batches[r::n]) for r, a in enumerate(actors)])
    return [outs[i % n][i // n] for i in range(real)]
