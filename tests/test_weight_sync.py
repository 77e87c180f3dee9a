"""Verified weight sync: the parity probe passes on a sampler that loaded the pushed weights and stops the run,
with a clear message, on one that ignored the update; stale rollout versions are refused."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.weights import (PushedWeights, WeightSyncError, parity_report, require_parity,
                                     require_version, state_of)
from posttrain.workers.sampler import SamplerWorker


@pytest.fixture(scope="module")
def updated_model(tiny_model, tmp_path_factory):
    """The tiny model after a (fake) optimizer step: every weight moved a little, saved as a new checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("models") / "step-1"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


PROMPT, COMPLETION = [10, 20, 30, 40], [50, 60, 70, 2]


def learner_logprobs(path) -> list[float]:
    """Independently: a plain transformers forward, log-softmax, one token at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = PROMPT + COMPLETION
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return [logp[t - 1, ids[t]].item() for t in range(len(PROMPT), len(ids))]


class StaleSampler(SamplerWorker):
    """A sampler whose weight update does nothing but bump the version: the failure the probe exists for."""

    def load_weights(self, model_path: str, version: int) -> int:
        if not hasattr(self, "model"):
            return super().load_weights(model_path, version)
        self.version = version
        return version


def test_probe_passes_after_a_real_sync(tiny_model, updated_model):
    sampler = SamplerWorker(str(tiny_model))
    assert sampler.load_weights(str(updated_model), 1) == 1
    version, got = sampler.probe(PROMPT, COMPLETION)
    report = parity_report(version, got, learner_logprobs(updated_model), tolerance=1e-4)
    assert version == 1 and report.ok and report.tokens == 4 and report.max_abs_diff < 1e-5
    require_parity(report)  # does not raise


def test_a_sampler_that_ignores_the_update_is_caught(tiny_model, updated_model):
    sampler = StaleSampler(str(tiny_model))
    sampler.load_weights(str(updated_model), 1)
    version, got = sampler.probe(PROMPT, COMPLETION)
    assert version == 1  # the version alone says all is well: only the probe can tell
    report = parity_report(version, got, learner_logprobs(updated_model), tolerance=1e-4)
    assert not report.ok and report.max_abs_diff > 1e-2
    assert got == pytest.approx(learner_logprobs(tiny_model), abs=1e-5)  # it still serves the old weights
    with pytest.raises(WeightSyncError, match=r"weights version 1: sampler 0's log-probs .* did\s+nothing"):
        require_parity(report, "sampler 0")


def test_stale_rollouts_and_malformed_probes_are_refused():
    require_version(3, 3)
    with pytest.raises(WeightSyncError, match="sampled with weights version 2, but the learner pushed version 3"):
        require_version(2, 3)
    with pytest.raises(WeightSyncError, match="returned 2 sampler and 3 learner log-probs"):
        parity_report(1, [0.0, 0.0], [0.0, 0.0, 0.0], 1e-4)


def test_pushed_weights_keep_every_dtype_bit_for_bit():
    """bfloat16 (which numpy lacks) travels as its raw bits; the other dtypes as themselves."""
    import pickle

    state = {"w": torch.randn(3, 4), "b16": torch.randn(5).to(torch.bfloat16), "h": torch.randn(2, 2).half(),
             "steps": torch.arange(4)}
    back = state_of(pickle.loads(pickle.dumps(PushedWeights.of(state), protocol=5)))
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in state.items()}
    assert all(torch.equal(back[k].view(torch.int16) if v.dtype == torch.bfloat16 else back[k],
                           v.view(torch.int16) if v.dtype == torch.bfloat16 else v) for k, v in state.items())


def test_a_push_through_the_object_store_is_served(ray_local, tiny_model, updated_model):
    """The push as the loop makes it: a Ray task returns PushedWeights (read-only arrays in the object store), the
    sampler actor loads them from the reference and its probe equals the updated model's log-probs."""
    import ray
    from transformers import AutoModelForCausalLM

    @ray.remote
    def push(path: str) -> PushedWeights:
        return PushedWeights.of(AutoModelForCausalLM.from_pretrained(path).state_dict())

    sampler = ray.remote(SamplerWorker).remote(str(tiny_model))
    assert ray.get(sampler.update_weights.remote(push.remote(str(updated_model)), 1)) == 1
    version, got = ray.get(sampler.probe.remote(PROMPT, COMPLETION))
    report = parity_report(version, got, learner_logprobs(updated_model), tolerance=1e-4)
    assert version == 1 and report.max_abs_diff < 1e-5
    ray.kill(sampler)
