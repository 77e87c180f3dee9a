"""The command line on good and bad input: one clear message, exit code 2, never a traceback."""

from __future__ import annotations

import json

import pytest

from cli_helpers import REPO, posttrain, small_recipe, write


def _fails_cleanly(res, *phrases):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    for p in phrases:
        assert p in res.stderr, f"{p!r} not in:\n{res.stderr}"


def test_validate_show_and_overrides(tmp_path, tiny_model):
    path = write(tmp_path, small_recipe(tmp_path, tiny_model))
    res = posttrain("validate", str(path))
    assert res.returncode == 0 and "ok (2 stage(s): sft, eval)" in res.stdout
    res = posttrain("show", str(path), "seed=5", "stages.sft.optim.lr=0.01", "model.lora.r=4")
    assert res.returncode == 0, res.stderr
    assert "seed: 5" in res.stdout and "lr: 0.01" in res.stdout and "r: 4" in res.stdout
    assert "target_modules:" in res.stdout  # defaults of the section an override created


def test_misspelled_key_names_file_line_and_suggestion(tmp_path, tiny_model):
    text = write(tmp_path, small_recipe(tmp_path, tiny_model)).read_text().replace("warmup_steps", "warmup_stpes")
    (tmp_path / "bad.yaml").write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "warmup_stpes" in l)
    res = posttrain("run", str(tmp_path / "bad.yaml"))
    _fails_cleanly(res, f"bad.yaml:{line}", "stages.0.optim.warmup_stpes", "did you mean 'warmup_steps'")


def test_bad_override_type(tmp_path, tiny_model):
    res = posttrain("validate", str(write(tmp_path, small_recipe(tmp_path, tiny_model))), "stages.0.steps=many")
    _fails_cleanly(res, "override 'stages.0.steps=many'", "expected an integer")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_model):
    res = posttrain("run", str(write(tmp_path, small_recipe(tmp_path, tiny_model))), "--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for phrase in ("stage 1 'sft' [sft]", "arith:sft (64 rows)", "20 steps x 8 sequences", "deepspeed ZeRO-2",
                   "2 learner actor(s) x 1 CPU", "stage 2 'eval' [eval]", "arith:test (40 rows)",
                   "1 sampler actor(s) x 1 CPU", "1 verifier actor(s) x 0.5 CPU", "summary.json"):
        assert phrase in out, f"{phrase!r} not in plan:\n{out}"
    assert not (tmp_path / "runs").exists()


def test_missing_model_path(tmp_path, tiny_model):
    res = posttrain("run", str(write(tmp_path, small_recipe(tmp_path, tiny_model))), f"model.path={tmp_path}/nope")
    _fails_cleanly(res, "model.path: no such model directory", "nope")
    assert not (tmp_path / "runs").exists()


def test_unreachable_hub_id(tmp_path, tiny_model):
    res = posttrain("run", str(write(tmp_path, small_recipe(tmp_path, tiny_model))), "model.path=some-org/some-model")
    _fails_cleanly(res, "'some-org/some-model' is not a local directory and could not be fetched", "hf download")


def test_missing_data_path(tmp_path, tiny_model):
    recipe = small_recipe(tmp_path, tiny_model, data={"arith": {"path": str(tmp_path / "absent.jsonl"), "verifier": "arithmetic"}})
    res = posttrain("run", str(write(tmp_path, recipe)), "--dry-run")
    _fails_cleanly(res, "data.arith.path", "no such file")


def test_more_actors_than_cpus(tmp_path, tiny_model):
    res = posttrain("run", str(write(tmp_path, small_recipe(tmp_path, tiny_model))), "cluster.learner.actors=4")
    _fails_cleanly(res, "stage 'sft' needs 4 CPUs", "4 learner actor(s) x 1 CPU", "the Ray cluster has 2",
                   "cluster.<role>.actors")
    assert not (tmp_path / "runs").exists()


def test_unreachable_ray_address(tmp_path, tiny_model):
    res = posttrain("run", str(write(tmp_path, small_recipe(tmp_path, tiny_model))), "cluster.address=127.0.0.1:9")
    _fails_cleanly(res, "cannot reach Ray at '127.0.0.1:9'", "ray start --head")
    assert not (tmp_path / "runs").exists()


def test_existing_run_is_never_overwritten(tmp_path, tiny_model):
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    summary = {"recipe": {}, "stages": [{"name": "sft", "kind": "sft", "status": "done", "metrics": {}, "checkpoint": None}]}
    (run / "summary.json").write_text(json.dumps(summary))
    before = (run / "summary.json").read_bytes()
    res = posttrain("run", str(write(tmp_path, small_recipe(tmp_path, tiny_model))))
    _fails_cleanly(res, "already holds a run (stages done: sft)", "--resume")
    assert (run / "summary.json").read_bytes() == before


def test_list_names_stages_algorithms_verifiers_and_recipes():
    res = posttrain("list")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    for kind, name in (("stage", "sft"), ("stage", "eval"), ("algorithm", "sft"), ("verifier", "arithmetic"), ("verifier", "code"),
                       ("recipe", "recipes/quickstart.yaml"), ("recipe", "recipes/quickstart_lora.yaml")):
        assert any(l.split()[:2] == [kind, name] and len(l.split()) > 2 for l in lines), f"{kind} {name} missing:\n{res.stdout}"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_bundled_recipes_validate(recipe):
    res = posttrain("validate", f"recipes/{recipe}")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("recipe", ["rest_em_gsm8k.yaml", "rest_em_math.yaml", "rest_em_code.yaml"])
def test_gpu_recipes_dry_run_offline(recipe):
    res = posttrain("run", f"recipes/{recipe}", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "[rest_em]" in res.stdout and "vllm" not in res.stderr
    assert "sampler actor(s) x 4 CPU, 1 GPU" in res.stdout and "learner actor(s) x 8 CPU, 1 GPU" in res.stdout


def test_dpo_hh_recipe_dry_runs_offline():
    res = posttrain("run", "recipes/dpo_hh.yaml", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "[dpo]" in res.stdout and "loss dpo (beta=0.1)" in res.stdout and "8 learner actor(s) x 8 CPU, 1 GPU" in res.stdout


def test_verify_code_runs_one_program_in_the_sandbox(tmp_path):
    tests = tmp_path / "tests.py"
    tests.write_text("def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n")
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("def add(a, b):\n    return a + b\n")
    bad.write_text("class Eq:\n    def __eq__(self, o): return True\ndef add(a, b):\n    print('passed')\n    return Eq()\n")
    res = posttrain("verify", "code", "--program", str(good), "--tests", str(tests), "--entry", "add")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["passed"] is True and out["tests"][0]["status"] == "passed"
    res = posttrain("verify", "code", "--program", str(bad), "--tests", str(tests), "--entry", "add")
    assert res.returncode == 0, res.stderr  # the sandbox worked; the verdict is in the JSON
    out = json.loads(res.stdout)
    assert out["passed"] is False and "only plain built-in values" in out["error"] and out["stdout"] == "passed\n"
    res = posttrain("verify", "code", "--program", str(tmp_path / "missing.py"), "--tests", str(tests), "--entry", "add")
    assert res.returncode == 2 and "missing.py: no such file" in res.stderr and "Traceback" not in res.stderr


def test_verify_math_prints_a_json_verdict():
    res = posttrain("verify", "math", r"so the answer is \boxed{\frac{1}{2}}", "0.5")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["correct"] is True and out["prediction"] == r"\frac{1}{2}"
    res = posttrain("verify", "math", r"\boxed{4\sqrt{2}}", "4")
    assert json.loads(res.stdout)["correct"] is False


def test_overrides_may_follow_flags(tmp_path, tiny_model):
    path = str(write(tmp_path, small_recipe(tmp_path, tiny_model)))
    res = posttrain("run", path, "--dry-run", "stages.sft.steps=7", "seed=3")
    assert res.returncode == 0, res.stderr
    assert "7 steps x 8 sequences" in res.stdout
    res = posttrain("run", path, "--resume", "name=never-ran")
    assert res.returncode == 2 and "nothing to resume" in res.stderr and "never-ran" in res.stderr
    res = posttrain("run", path, "--bogus")
    assert res.returncode == 2 and "unrecognized arguments: --bogus" in res.stderr


def test_online_dpo_with_reward_model_recipe_dry_runs_offline():
    res = posttrain("run", "recipes/online_dpo_rm_hh.yaml", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "[reward_model]" in res.stdout and "Bradley-Terry on a scalar head + 0.01 (r_w + r_l)^2" in res.stdout
    assert "best vs worst by reward model @rm" in res.stdout and "XPO alpha 1e-05" in res.stdout
    assert "4 reward_model actor(s) x 4 CPU, 1 GPU" in res.stdout


def test_online_rl_recipes_dry_run_offline():
    res = posttrain("run", "recipes/grpo_gsm8k.yaml", "--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "[grpo]" in out and "500 steps x 64 prompts x 8 samples" in out and "verifier math" in out
    assert "grpo: beta=0.04, clip_eps=0.2, aggregation=sequence_mean" in out and "truncated IS at 2" in out
    assert "parity probe every 1 step(s), tolerance 0.25" in out and "colocate" not in out
    assert "4 learner actor(s) x 8 CPU, 1 GPU; 4 sampler actor(s) x 4 CPU, 1 GPU" in out
    res = posttrain("run", "recipes/ppo_rlhf.yaml", "--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "[reward_model]" in out and "[ppo]" in out and "reward: reward model @rm; -1 without EOS" in out
    assert "kl_coef=0.05, kl_estimator=k1" in out and "reward_norm=True, reward_clip=10.0" in out
    assert "critic: value head initialised from @rm, lr 5e-06" in out
    assert "2 epoch(s) x 4 minibatch(es) of 32 sequences" in out
    assert "4 critic actor(s) x 8 CPU, 1 GPU" in out and "4 reward_model actor(s) x 4 CPU, 1 GPU" in out


def test_rl_stage_with_a_missing_reward_model_stops_before_starting(tmp_path, tiny_model):
    recipe = small_recipe(tmp_path, tiny_model)
    recipe["cluster"]["reward_model"] = {"cpus": 0}
    recipe["stages"] = [{"kind": "ppo", "data": "arith", "train_split": "sft", "prompts_per_step": 4,
                         "samples_per_prompt": 2, "micro_batch_size": 4,
                         "reward": {"source": "reward_model", "reward_model": str(tmp_path / "no-rm")}}]
    res = posttrain("run", str(write(tmp_path, recipe)))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"stages.0.reward.reward_model: no such model directory: {tmp_path / 'no-rm'}" in res.stderr
