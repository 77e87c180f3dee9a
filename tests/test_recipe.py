"""Recipe loading: types and defaults, precise error reports (field, line, message), overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.data.tasks.arithmetic import ArithmeticConfig
from posttrain.recipe.load import (
    RecipeError,
    RecipeIssue,
    dump_recipe,
    load_recipe,
    parse_overrides,
    recipe_to_dict,
)
from posttrain.recipe.schema import ClusterConfig, EvalStage, LoraConfig, OptimConfig, Recipe, SFTStage

# Line numbers in the tests below are counted in this text (line 1 is `name: demo`).
BASE = """\
name: demo
seed: 1
model: {path: /tmp/m, dtype: float32}
data:
  arith: {task: arithmetic, arithmetic: {n_sft: 100, n_pool: 0, n_test: 50}}
stages:
  - {kind: sft, data: arith, train_split: sft, steps: 10}
  - {kind: eval, data: arith, split: test}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def issues_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> list[RecipeIssue]:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    return info.value.issues


def find(issues: list[RecipeIssue], field: str) -> RecipeIssue:
    matches = [i for i in issues if i.field == field]
    assert len(matches) == 1, f"expected one issue at {field!r}, got: {[str(i) for i in issues]}"
    return matches[0]


# ------------------------------------------------------------------ valid
def test_minimal_recipe_types_and_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, BASE))
    assert isinstance(recipe, Recipe)
    assert (recipe.name, recipe.seed, recipe.model.path, recipe.model.lora) == ("demo", 1, "/tmp/m", None)
    arith = recipe.data["arith"]
    assert arith.arithmetic == ArithmeticConfig(n_sft=100, n_pool=0, n_test=50)
    assert arith.format == "prompt_completion" and arith.splits == {}
    sft, ev = recipe.stages
    assert isinstance(sft, SFTStage) and isinstance(ev, EvalStage)
    assert (sft.name, ev.name) == ("sft", "eval")
    assert sft.steps == 10 and sft.batch_size == 32 and sft.optim == OptimConfig()
    assert ev.pass_k == [1] and ev.greedy is True
    assert recipe.cluster == ClusterConfig()
    assert recipe.tracking.output_dir == "runs"


def test_ints_become_floats_and_exponents_parse(tmp_path: Path) -> None:
    text = BASE.replace("steps: 10}", "steps: 10, optim: {lr: 1e-3, grad_clip: 2}}")
    optim = load_recipe(write(tmp_path, text)).stages[0].optim
    assert optim.lr == 0.001 and isinstance(optim.grad_clip, float) and optim.grad_clip == 2.0


# ------------------------------------------------------------- malformed
@pytest.mark.parametrize(
    ("old", "new", "field", "line", "phrase"),
    [
        ("stages:", "stagse:", "stagse", 6, "did you mean 'stages'?"),
        ("steps: 10}", "steps: 10, optim: {lrr: 1}}", "stages.0.optim.lrr", 7, "did you mean 'lr'?"),
        ("steps: 10", "steps: many", "stages.0.steps", 7, "expected an integer, got 'many'"),
        ("seed: 1", "seed: true", "seed", 2, "expected an integer, got true"),
        ("train_split: sft", "optim: {lr: fast}", "stages.0.optim.lr", 7, "expected a number, got 'fast'"),
        ("path: /tmp/m", "path: 5", "model.path", 3, "expected a string, got 5"),
        ("kind: sft", "kind: stf", "stages.0.kind", 7, "did you mean 'sft'?"),
        ("{kind: eval, ", "{", "stages.1.kind", 8, "missing required key 'kind' (one of: sft, eval, rest_em, dpo, reward_model, ppo, grpo, rloo, longctx_sft)"),
        ("{kind: eval, data: arith,", "{kind: eval,", "stages.1.data", 8, "missing required key 'data'"),
        ("dtype: float32", "dtype: fp32", "model.dtype", 3, "expected one of 'float32', 'bfloat16', 'float16'"),
        ("data: arith, split", "data: arth, split", "stages.1.data", 8, "unknown dataset 'arth'"),
        ("{kind: eval,", "{kind: eval, name: sft,", "stages.1.name", 8, "duplicate stage name 'sft'"),
        ("float32}", "float32, lora: {r: 0}}", "model.lora.r", 3, "must be >= 1"),
        ("{n_sft", "{n_operands: 1, n_sft", "data.arith.arithmetic", 5, "n_operands must be >= 2"),
        ("task: arithmetic, ", "", "data.arith.task", 5, "set exactly one of `task`"),
        ("{kind: eval, data: arith, split: test}", "[eval]", "stages.1", 8, "expected a stage mapping"),
        ("seed: 1", "seed: 1\nseed: 2", "seed", 3, "duplicate key 'seed' (first given on line 2)"),
        ("name: demo\n", "", "name", 1, "missing required key 'name'"),
        ("stages:", "cluster: {verifier: {workers: 0}}\nstages:", "cluster.verifier.workers", 6, "must be >= 1"),
        ("stages:", "cluster: {sampler: {backend: vllm, gpus: 1, decode: generate}}\nstages:", "cluster.sampler.decode",
         6, "vLLM decodes with its own engine"),
    ],
)
def test_malformed_recipe(tmp_path: Path, old: str, new: str, field: str, line: int, phrase: str) -> None:
    assert old in BASE
    issue = find(issues_of(tmp_path, BASE.replace(old, new, 1)), field)
    assert (issue.line, issue.file) == (line, str(tmp_path / "recipe.yaml"))
    assert phrase in issue.message


def test_code_data_cannot_be_reranked(tmp_path: Path) -> None:
    text = BASE.replace("task: arithmetic, arithmetic: {n_sft: 100, n_pool: 0, n_test: 50}", "task: functions")
    text = text.replace("split: test}", "split: test, samples: 4, rerank_top: 2}")
    issue = find(issues_of(tmp_path, text), "stages.1.rerank_top")
    assert issue.line == 8 and "the code verifier judges by tests" in issue.message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    issue = find(issues_of(tmp_path, BASE.replace("seed: 1", "zzz: 1")), "zzz")
    assert issue.line == 2 and "valid keys: name, model, data, stages, seed, cluster, tracking" in issue.message


def test_yaml_syntax_error_has_its_line(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, BASE.replace("  arith", "\tarith"))
    assert issue.line == 5 and "invalid YAML" in issue.message and issue.field == ""


def test_unclosed_flow_mapping_names_where_it_started(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path, BASE.replace("steps: 10}", "steps: 10"))
    assert issue.line == 8 and "from line 7" in issue.message


@pytest.mark.parametrize(("text", "got"), [("- a\n- b\n", "a list"), ("", "an empty file"), ("hello\n", "a single value")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    (issue,) = issues_of(tmp_path, text)
    assert "top level must be a mapping" in issue.message and got in issue.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert "does not exist" in str(info.value) and str((tmp_path / "nope.yaml").resolve()) in str(info.value)


def test_block_style_lines_and_all_problems_reported_together(tmp_path: Path) -> None:
    text = """\
name: demo
model:
  path: /tmp/m
  dtpye: float32
data:
  arith:
    task: arithmetic
stages:
  - kind: sft
    data: arith
    optim:
      lr: fast
      betas: [0.9]
  - kind: eval
    data: missing
    greedy: false
"""
    issues = issues_of(tmp_path, text)
    expected = {
        "model.dtpye": (4, "did you mean 'dtype'?"),
        "stages.0.optim.lr": (12, "expected a number, got 'fast'"),
        "stages.1.samples": (14, "nothing to evaluate"),
    }
    for field, (line, phrase) in expected.items():
        issue = find(issues, field)
        assert issue.line == line and phrase in issue.message
    assert len(issues) == 3  # stages.0 failed to convert, so recipe-level checks (stages.1.data) did not run


def test_problems_in_sections_and_recipe_reported_together(tmp_path: Path) -> None:
    text = BASE.replace("float32}", "float32, lora: {r: 0, dropout: 1.5}}").replace("data: arith, split", "data: x, split")
    issues = issues_of(tmp_path, text)
    assert [(i.field, i.line) for i in issues] == [("model.lora.r", 3), ("model.lora.dropout", 3), ("stages.1.data", 8)]


def test_issue_and_error_formatting(tmp_path: Path) -> None:
    issue = RecipeIssue("recipes/x.yaml", 12, "stages.0.optim.lr", "expected a number, got 'fast'")
    assert str(issue) == "recipes/x.yaml:12: stages.0.optim.lr: expected a number, got 'fast'"
    assert str(RecipeIssue("x.yaml", None, "", "oops")) == "x.yaml: oops"
    path = write(tmp_path, BASE.replace("seed: 1", "seed: x").replace("steps: 10", "steps: y"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).splitlines() == [
        f"recipe {path} has 2 problems:",
        f"  {path}:2: seed: expected an integer, got 'x'",
        f"  {path}:7: stages.0.steps: expected an integer, got 'y'",
    ]


# -------------------------------------------------------------- overrides
def test_overrides_apply(tmp_path: Path) -> None:
    overrides = ("seed=7", "stages.0.steps=5", "stages.sft.optim.lr=0.01", "model.lora.r=4", "stages.eval.pass_k=[1,2]")
    recipe = load_recipe(write(tmp_path, BASE), overrides)
    assert recipe.seed == 7 and recipe.stages[0].steps == 5
    assert recipe.stages[0].optim.lr == 0.01
    assert recipe.model.lora == LoraConfig(r=4)
    assert recipe.stages[1].pass_k == [1, 2]


def test_override_by_default_name_of_repeated_kind_and_by_explicit_name(tmp_path: Path) -> None:
    text = BASE + "  - {kind: eval, data: arith, max_problems: 3}\n  - {kind: sft, name: polish, data: arith}\n"
    recipe = load_recipe(write(tmp_path, text), ["stages.eval2.max_problems=9", "stages.polish.steps=2"])
    assert recipe.stages[2].name == "eval2" and recipe.stages[2].max_problems == 9
    assert recipe.stages[3].steps == 2


def test_parse_overrides() -> None:
    assert parse_overrides(["a.b=3", "x=1e-3", "y=true", "z={r: 8}", "n=null", "s=hello world"]) == [
        (["a", "b"], 3), (["x"], 0.001), (["y"], True), (["z"], {"r": 8}), (["n"], None), (["s"], "hello world"),
    ]
    with pytest.raises(RecipeError) as info:
        parse_overrides(["ok=1", "noequals", "a..b=1"])
    assert [i.file for i in info.value.issues] == ["override 'noequals'", "override 'a..b=1'"]


def test_bad_override_value_names_the_override(tmp_path: Path) -> None:
    issue = find(issues_of(tmp_path, BASE, ("stages.0.steps=abc",)), "stages.0.steps")
    assert str(issue) == "override 'stages.0.steps=abc': stages.0.steps: expected an integer, got 'abc'"


def test_override_replacing_a_section_reports_at_the_override(tmp_path: Path) -> None:
    text = BASE.replace("steps: 10}", "steps: 10, optim: {lr: 0.1}}")
    issue = find(issues_of(tmp_path, text, ("stages.0.optim={lr: fast}",)), "stages.0.optim.lr")
    assert (issue.file, issue.line) == ("override 'stages.0.optim={lr: fast}'", None)


@pytest.mark.parametrize(
    ("override", "field", "phrase"),
    [
        ("stages.sfft.steps=1", "stages.sfft", "no item named 'sfft' (did you mean 'sft'?)"),
        ("stages.5.steps=1", "stages.5", "index 5 out of range"),
        ("seed.x=1", "seed.x", "not a mapping or list"),
        ("seed", "", "expected key.path=value"),
        ("=3", "", "empty key"),
        ("stages.0.stepz=1", "stages.0.stepz", "did you mean 'steps'?"),
    ],
)
def test_malformed_overrides(tmp_path: Path, override: str, field: str, phrase: str) -> None:
    (issue,) = issues_of(tmp_path, BASE, (override,))
    assert (issue.file, issue.line, issue.field) == (f"override {override!r}", None, field)
    assert phrase in issue.message


# ---------------------------------------------------------------- dumping
def test_dump_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, BASE), ["model.lora.r=4", "stages.sft.optim.eps=1e-8"])
    text = dump_recipe(recipe)
    assert text.startswith("name: demo\nmodel:\n")  # schema order, not sorted
    assert load_recipe(write(tmp_path, text)) == recipe
    json.dumps(recipe_to_dict(recipe))  # plain data


def test_loading_recipes_needs_no_heavy_imports() -> None:
    heavy = "{'torch', 'transformers', 'datasets', 'ray', 'deepspeed', 'wandb'}"
    code = f"import sys, posttrain.recipe.load; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_eval_on_data_without_a_verifier_is_reported(tmp_path) -> None:
    text = """name: demo
model: {path: /tmp/m}
data:
  files: {path: /tmp/d.jsonl}
stages:
  - {kind: eval, data: files}
"""
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "r.yaml")
    assert any(i.field == "stages.0.data" and "verifier" in i.message and i.line == 6 for i in err.value.issues), str(err.value)


# ------------------------------------------------------ preference stages
PREF = """\
name: prefs
model: {path: /tmp/m}
data:
  pairs: {path: /tmp/p.jsonl, format: pairs}
  arith: {task: arithmetic}
stages:
  - {kind: reward_model, name: rm, data: pairs, batch_size: 8, micro_batch_size: 2}
  - {kind: dpo, data: pairs, batch_size: 8, micro_batch_size: 2, loss: {name: ipo, tau: 0.5}}
  - {kind: dpo, name: online, data: arith, batch_size: 8, micro_batch_size: 2, online: {rounds: 2}}
"""


def test_preference_stages_load_with_their_defaults(tmp_path: Path) -> None:
    from posttrain.algorithms.preference_config import IPOConfig
    from posttrain.recipe.schema import DPOStage, RewardModelStage

    rm, dpo, on = load_recipe(write(tmp_path, PREF)).stages
    assert isinstance(rm, RewardModelStage) and rm.eval_fraction == 0.05 and rm.produces_policy is False
    assert isinstance(dpo, DPOStage) and dpo.loss.build() == IPOConfig(tau=0.5) and dpo.packing and dpo.online is None
    assert on.online.label == "verifier" and on.online.xpo_alpha == 0.0


@pytest.mark.parametrize(
    ("old", "new", "field", "phrase"),
    [
        ("loss: {name: ipo, tau: 0.5}", "loss: {name: ipo, beta: 0.5}", "stages.1.loss.beta", "ipo has no knob 'beta'"),
        ("loss: {name: ipo, tau: 0.5}", "loss: {name: hdpo}", "stages.1.loss.name", "hdpo: "),
        ("{kind: reward_model, name: rm, data: pairs,", "{kind: reward_model, name: rm, data: arith,", "stages.0.data",
         "reward_model needs a pair dataset"),
        ("{kind: dpo, data: pairs,", "{kind: dpo, data: arith,", "stages.1.data", "offline dpo needs a pair dataset"),
        ("online: {rounds: 2}", "online: {rounds: 2, label: reward_model}", "stages.2.online.reward_model",
         "exactly when label: reward_model"),
        ("online: {rounds: 2}", "online: {rounds: 2, label: reward_model, reward_model: '@dpo'}",
         "stages.2.online.reward_model", "'@dpo' must name an earlier reward_model stage"),
        ("online: {rounds: 2}", "online: {rounds: 2, min_margin: 1}", "stages.2.online.min_margin",
         "only applies to label: reward_model"),
        ("name: online, data: arith", "name: online, data: pairs", "stages.2.data", "holds preference pairs"),
        ("name: online, data: arith", "name: online, model: '@rm', data: arith", "stages.2.model",
         "'@rm' is a reward model, not a policy"),
        ("rm, data: pairs, batch_size: 8", "rm, data: pairs, eval_fraction: 1.5, batch_size: 8",
         "stages.0.eval_fraction", "must be in [0, 1)"),
        ("loss: {name: ipo, tau: 0.5}", "loss: {name: dpo}, reference_update: {mode: hard, tau: 4}",
         "stages.1.reference_update", "needs `reference: live`"),
        ("loss: {name: ipo, tau: 0.5}", "loss: {name: simpo}, reference: live", "stages.1.reference",
         "simpo uses no reference model"),
        ("loss: {name: ipo, tau: 0.5}", "loss: {name: kto, tau: 0.5}", "stages.1.loss.tau",
         "kto has no knob 'tau' (its knobs: beta, desirable_weight, undesirable_weight)"),
        ("batch_size: 8, micro_batch_size: 2}\n  - {kind: dpo, data: pairs",
         "batch_size: 7, micro_batch_size: 2}\n  - {kind: dpo, data: pairs", "stages.0.batch_size", "must be a multiple"),
    ],
)
def test_preference_stage_problems(tmp_path: Path, old: str, new: str, field: str, phrase: str) -> None:
    assert old in PREF
    issue = find(issues_of(tmp_path, PREF.replace(old, new, 1)), field)
    assert phrase in issue.message, issue.message


def test_online_dpo_labelled_by_a_reward_model_may_read_pair_prompts(tmp_path: Path) -> None:
    text = PREF.replace("name: online, data: arith, batch_size: 8, micro_batch_size: 2, online: {rounds: 2}",
                        "name: online, data: pairs, batch_size: 8, micro_batch_size: 2, "
                        "online: {rounds: 2, label: reward_model, reward_model: '@rm', xpo_alpha: 1.0e-5}")
    on = load_recipe(write(tmp_path, text)).stages[2]
    assert on.online.reward_model == "@rm" and on.online.xpo_alpha == 1e-5


def test_live_reference_is_refused_under_zero3_and_tr_dpo_under_lora(tmp_path: Path) -> None:
    text = PREF.replace("loss: {name: ipo, tau: 0.5}", "reference: live, reference_update: {mode: soft, alpha: 0.6, tau: 2}")
    stage = load_recipe(write(tmp_path, text)).stages[1]
    assert stage.reference == "live" and stage.reference_update.tau == 2
    text = text.replace("model: {path: /tmp/m}", "model: {path: /tmp/m, lora: {r: 4}}\ncluster: {learner: {zero_stage: 3}}")
    issues = issues_of(tmp_path, text)
    assert "ZeRO-3 would not partition" in find(issues, "stages.1.reference").message
    assert "with LoRA only adapters train" in find(issues, "stages.1.reference_update").message


# ------------------------------------------------------------------ online RL stages
RL = BASE.replace("n_pool: 0", "n_pool: 40").replace("arithmetic}", "arithmetic, verifier: arithmetic}", 1)


@pytest.mark.parametrize(("stage", "field", "phrase"), [
    ("{kind: grpo, data: arith, samples_per_prompt: 1}", "stages.2.samples_per_prompt", "needs at least 2"),
    ("{kind: rloo, data: arith, ppo: {clip_eps: 0.1}}", "stages.2.ppo", "applies to kind ppo, not rloo"),
    ("{kind: ppo, data: arith, grpo: {beta: 0.1}}", "stages.2.grpo", "applies to kinds grpo and rloo"),
    ("{kind: grpo, data: arith, prompts_per_step: 3, samples_per_prompt: 3, mini_batches: 2}", "stages.2.mini_batches",
     "= 9 must split into 2 equal minibatches"),
    ("{kind: grpo, data: arith, prompts_per_step: 4, samples_per_prompt: 2, micro_batch_size: 3}",
     "stages.2.micro_batch_size", "must be a multiple of cluster.learner.actors (1) x micro_batch_size (3) = 3"),
    ("{kind: grpo, data: arith, grpo: {aggregation: mean}}", "stages.2.grpo.aggregation",
     "expected one of 'sequence_mean', 'token_mean'"),
    ("{kind: ppo, data: arith, ppo: {gamma: 1.5}}", "stages.2.ppo", "gamma and lam must be in [0, 1]"),
    ("{kind: ppo, data: arith, ppo: {ptx_coef: 0.1}}", "stages.2.ppo.ptx_coef", "name it under `ptx: {data: NAME"),
    ("{kind: grpo, data: arith, ptx: {data: arith}}", "stages.2.ptx", "applies to kind ppo, not grpo"),
    ("{kind: ppo, data: arith, ptx: {data: arith}}", "stages.2.ptx", "set ppo.ptx_coef > 0"),
    ("{kind: ppo, data: arith, ppo: {ptx_coef: 0.1}, ptx: {data: sft_text}}", "stages.2.ptx.data",
     "unknown dataset 'sft_text' (defined under data: arith)"),
    ("{kind: ppo, data: arith, ppo: {ptx_coef: 0.1}, ptx: {data: arith, batch_size: 0}}", "stages.2.ptx.batch_size",
     "must be >= 1"),
    ("{kind: ppo, data: arith, prompts_per_step: 4, samples_per_prompt: 4, micro_batch_size: 4, ppo: {ptx_coef: 0.1},"
     " ptx: {data: arith, batch_size: 2}}", "stages.2.ptx.batch_size", "micro-batches of an update take"),
    ("{kind: grpo, data: arith, reward: {source: reward_model}}", "stages.2.reward.reward_model", "exactly when"),
    ("{kind: ppo, data: arith, reward: {source: reward_model, reward_model: '@sft'}}", "stages.2.reward.reward_model",
     "must name an earlier reward_model stage"),
    ("{kind: grpo, data: arith, truncated_is: 0.5}", "stages.2.truncated_is", "must be >= 1"),
    ("{kind: grpo, data: arith, sync: {parity_tolerance: 0}}", "stages.2.sync.parity_tolerance", "must be > 0"),
])
def test_online_rl_stage_problems_name_the_field(tmp_path: Path, stage: str, field: str, phrase: str) -> None:
    issue = find(issues_of(tmp_path, RL + f"  - {stage}\n"), field)
    assert phrase in issue.message, issue.message


def test_online_rl_stage_defaults_and_colocated_resources(tmp_path: Path) -> None:
    from posttrain.cluster import stage_phases

    text = RL + "  - {kind: ppo, data: arith, prompts_per_step: 8, samples_per_prompt: 2, micro_batch_size: 4}\n"
    text = text.replace("seed: 1\n", "seed: 1\ncluster: {learner: {actors: 2, cpus: 3}, sampler: {actors: 1, cpus: 3}}\n")
    recipe = load_recipe(write(tmp_path, text))
    ppo = recipe.stages[2]
    assert ppo.objective_config().lam == 0.95 and ppo.objective_config().reward_norm and ppo.batch_size == 16
    (phase,) = stage_phases(recipe.cluster, ppo)
    # learners, critic and samplers take turns: each reserves a third of its configured CPUs
    assert [(d.role, d.actors, d.cpus) for d in phase] == [("learner", 2, 1.0), ("critic", 2, 1.0), ("sampler", 1, 1.0),
                                                           ("verifier", 1, 0.5)]
    recipe = load_recipe(write(tmp_path, text), ["stages.ppo.colocate=false"])
    assert [d.cpus for d in stage_phases(recipe.cluster, recipe.stages[2])[0]] == [3.0, 3.0, 3.0, 0.5]
