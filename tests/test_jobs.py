"""posttrain submit | jobs | logs | stop: the pure helpers, the CLI's refusals before anything is uploaded, and
end to end against a real Ray head started on loopback (one head for the module)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cli_helpers import posttrain, small_recipe, write
from posttrain import jobs
from posttrain.recipe.load import load_recipe


def _fails_cleanly(res, *phrases):
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    for p in phrases:
        assert p in res.stderr, f"{p!r} not in:\n{res.stderr}"


# ------------------------------------------------------------------ pure helpers
def test_entrypoint_quotes_overrides_and_joins_the_cluster():
    cmd = jobs.entrypoint("recipes/my run.yaml", ["name=a b", "stages.0.optim.lr=1e-3", "x=$(rm -rf ~)"])
    assert cmd == ("python -m posttrain.cli run 'recipes/my run.yaml' 'name=a b' stages.0.optim.lr=1e-3 "
                   "'x=$(rm -rf ~)' cluster.address=auto")


def test_default_address_and_job_api_url():
    assert jobs.default_address({}) == "http://127.0.0.1:8265"
    assert jobs.default_address({"RAY_ADDRESS": "https://head:8265/"}) == "https://head:8265"
    assert jobs.default_address({"RAY_ADDRESS": "10.0.0.1:6379"}) == "http://127.0.0.1:8265"  # a GCS address
    assert jobs.job_api_url("head:8265") == "http://head:8265"
    with pytest.raises(jobs.PosttrainError, match="dashboard"):
        jobs.job_api_url("ray://head:10001")


def _recipe_with_paths(tmp: Path, root: Path) -> Path:
    """Every kind of path field: model, data path + split files, stage model, reward model, critic, hub ids."""
    text = f"""
name: paths
model: {{path: {root}/models/base}}
data:
  arith: {{task: arithmetic}}
  local: {{path: data, splits: {{train: train.jsonl, test: {root}/data/test.jsonl}}}}
  hub: {{path: openai/gsm8k, subset: main, format: gsm8k}}
  pairs: {{path: {tmp}/outside/pairs.jsonl, format: pairs}}
stages:
  - {{kind: sft, data: arith, model: ./models/missing}}
  - {{kind: ppo, data: arith, model: Qwen/Qwen2.5-0.5B, reward: {{source: reward_model, reward_model: {root}/models/rm}},
      critic: {{model: '@sft'}}}}
"""
    path = root / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_paths_and_checks(tmp_path):
    root = tmp_path / "work"
    for d in ("models/base", "models/rm", "data"):
        (root / d).mkdir(parents=True)
    (root / "data/train.jsonl").write_text("{}\n")
    (root / "data/test.jsonl").write_text("{}\n")
    recipe = load_recipe(_recipe_with_paths(tmp_path, root))
    refs = jobs.recipe_paths(recipe)
    assert [r.field for r in refs] == ["model.path", "data.local.path", "data.local.splits.train",
                                       "data.local.splits.test", "data.hub.path", "data.pairs.path", "stages.0.model",
                                       "stages.1.model", "stages.1.reward.reward_model"]  # "@sft" names no file
    problems, overrides = jobs.check_paths(refs, root)
    assert len(problems) == 2, problems  # hub ids (openai/gsm8k, Qwen/...) are the cluster's to fetch
    assert problems[0].startswith(f"data.pairs.path: {tmp_path}/outside/pairs.jsonl lies outside the uploaded "
                                  f"directory {root}")
    assert "--working-dir" in problems[0]
    assert problems[1].startswith("stages.0.model: ./models/missing does not exist")
    # Absolute paths inside the upload become relative: on another machine only the uploaded copy exists.
    # A split file is relative to its data path.
    assert overrides == ["model.path=models/base", "data.local.splits.test=test.jsonl",
                         "stages.1.reward.reward_model=models/rm"]


def test_tiny_model_to_build_is_no_problem(tmp_path):
    refs = [jobs.PathRef(("model", "path"), str(tmp_path / "w/models/tiny"), built=True),
            jobs.PathRef(("model", "path"), "/elsewhere/tiny", built=True)]
    (tmp_path / "w").mkdir()
    assert jobs.check_paths(refs, tmp_path / "w") == ([], ["model.path=models/tiny"])


def test_upload_filter_follows_rays_excludes_and_gitignore(tmp_path):
    for f in ("keep/a.txt", "models/m/config.json", "models/m/w.safetensors", ".venv/x", "runs/r/ckpt/config.json"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    (tmp_path / ".gitignore").write_text("*.safetensors\n")
    uploaded = jobs.upload_filter(tmp_path, jobs.EXCLUDES)
    assert uploaded is not None
    assert uploaded(tmp_path / "keep/a.txt") and not uploaded(tmp_path / ".venv/x")
    refs = [jobs.PathRef(("model", "path"), "models/m"), jobs.PathRef(("stages", "1", "model"), "runs/r/ckpt")]
    problems, _ = jobs.check_paths(refs, tmp_path, uploaded)
    assert problems[0].startswith("model.path: 1 file(s) under") and "w.safetensors" in problems[0]
    assert problems[1].startswith("stages.1.model:") and "would not be uploaded" in problems[1]


def test_upload_excludes_the_runs_output_dir(tmp_path):
    recipe = load_recipe(_sft_recipe(tmp_path, tmp_path / "m", output_dir="out/runs"))
    assert jobs.upload_excludes(recipe, tmp_path)[-1] == "/out/runs/"
    recipe = load_recipe(_sft_recipe(tmp_path, tmp_path / "m", output_dir=str(tmp_path.parent / "elsewhere")))
    assert jobs.upload_excludes(recipe, tmp_path) == list(jobs.EXCLUDES)


# ------------------------------------------------- refusals before any upload
def _sft_recipe(root: Path, model: Path, output_dir: str | Path = "runs", steps: int = 4, data: dict | None = None,
                name: str = "recipe.yaml") -> Path:
    """One short sft stage, plain-torch learner with 1 actor: the quickest real run."""
    recipe = small_recipe(root, model)
    recipe["data"] = data or {"arith": {"task": "arithmetic",
                                        "arithmetic": {"n_operands": 2, "n_sft": 16, "n_pool": 0, "n_test": 8}}}
    recipe["cluster"] = {"address": "local", "num_cpus": 2, "learner": {"actors": 1, "cpus": 1, "backend": "torch"}}
    recipe["tracking"] = {"output_dir": str(output_dir), "report": False}
    recipe["stages"] = [{"kind": "sft", "data": next(iter(recipe["data"])), "train_split": "sft", "steps": steps,
                         "batch_size": 4, "micro_batch_size": 2, "max_length": 32, "save_every": steps,
                         "log_every": 2, "optim": {"lr": 1e-3}}]
    root.mkdir(parents=True, exist_ok=True)
    return write(root, recipe, name)


def test_submit_refuses_missing_and_outside_files_before_contacting_a_cluster(tmp_path, tiny_model):
    work = tmp_path / "work"
    recipe = _sft_recipe(work, tiny_model)  # the model lies outside the working dir
    res = posttrain("submit", str(recipe), "data.d.path=data/absent.jsonl", "--working-dir", str(work),
                    "--address", "http://127.0.0.1:9")
    _fails_cleanly(res, "nothing was submitted", f"model.path: {tiny_model} lies outside the uploaded directory",
                   "data.d.path: data/absent.jsonl does not exist")
    assert "cannot reach" not in res.stderr  # refused before the address was tried


def test_submit_refuses_a_recipe_outside_the_working_dir_and_a_bad_key(tmp_path, tiny_model):
    (tmp_path / "work").mkdir()
    recipe = _sft_recipe(tmp_path, tiny_model)
    res = posttrain("submit", str(recipe), "--working-dir", str(tmp_path / "work"), "--address", "http://127.0.0.1:9")
    _fails_cleanly(res, f"the recipe {recipe} lies outside the working directory {tmp_path / 'work'}", "copy it into")
    res = posttrain("submit", str(recipe), "stages.0.stpes=3", "--address", "http://127.0.0.1:9")
    _fails_cleanly(res, "stages.0.stpes", "did you mean 'steps'")


def test_unreachable_address_fails_fast():
    t0 = time.monotonic()
    for args in (["jobs"], ["logs", "raysubmit_x"], ["stop", "raysubmit_x"]):
        res = posttrain(*args, "--address", f"http://127.0.0.1:{_free_ports(1)[0]}")
        _fails_cleanly(res, "cannot reach the Ray job API at http://127.0.0.1:", "ray start --head --dashboard-host")
    res = posttrain("jobs", "--address", "ray://127.0.0.1:10001")
    _fails_cleanly(res, "http://HEAD:8265")
    assert time.monotonic() - t0 < 30


# --------------------------------------------------- end to end: a real head
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_tree(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop this head only: `ray stop` would stop every Ray on the machine (other tests', other users')."""
    import psutil

    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for p in psutil.process_iter(["cmdline"]):  # anything of this head that left the tree
        if p not in victims and temp_dir in " ".join(p.info["cmdline"] or ()):
            victims.append(p)
    for p in victims:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback with its own ports and temp dir, and token authentication as `ray start` enables
    by default. Yields its job API URL, GCS port and token; the CLI finds the token in the environment, as a
    user's would."""
    gcs, dash, client, node, objects, metrics, agent, agent_grpc, runtime_env = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp")  # short: Ray's socket paths live under it
    token = secrets.token_hex(16)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "POSTTRAIN_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node}", f"--object-manager-port={objects}",
           f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
           f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats"]
    log = open(f"{temp_dir}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    mp = pytest.MonkeyPatch()
    try:
        _wait_ready(url, token, proc, f"{temp_dir}.log")
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "POSTTRAIN_PROGRESS"):
            mp.setenv(key, env[key])
        mp.delenv("RAY_ADDRESS", raising=False)
        yield {"url": url, "gcs": gcs, "token": token}
    finally:
        mp.undo()
        _kill_tree(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        Path(f"{temp_dir}.log").unlink(missing_ok=True)


def _wait_ready(url: str, token: str, proc: subprocess.Popen, log: str, timeout: float = 90) -> None:
    """Until the job API answers (a first submission then waits for the head's agent by itself)."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    while True:
        assert proc.poll() is None, f"ray start exited: {Path(log).read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the Ray head did not come up: {Path(log).read_text()[-3000:]}"
        try:
            urllib.request.urlopen(request, timeout=2)
            return
        except OSError:
            time.sleep(0.5)


def _job_id(stdout: str) -> str:
    m = re.search(r"submitted job (\S+) to", stdout)
    assert m, stdout
    return m.group(1)


@pytest.mark.slow
def test_submit_follow_logs_and_list(ray_head, tmp_path, tiny_model):
    url, work, out = ray_head["url"], tmp_path / "work", tmp_path / "out"
    shutil.copytree(tiny_model, work / "models/tiny")
    _sft_recipe(work, work / "models/tiny", output_dir=out)  # an absolute model path inside the upload
    res = posttrain("submit", "recipe.yaml", "name=e2e", "--follow", "--address", url, cwd=work, timeout=300)
    assert res.returncode == 0, (res.stdout, res.stderr)
    job = _job_id(res.stdout)
    assert f"posttrain logs {job} --follow --address {url}" in res.stdout
    assert f"posttrain stop {job} --address {url}" in res.stdout
    assert "run recipe.yaml name=e2e model.path=models/tiny cluster.address=auto" in res.stdout
    assert "sft: " in res.stdout and "run directory:" in res.stdout  # the run's own output, streamed
    assert f"job {job}: SUCCEEDED" in res.stderr
    summary = json.loads((out / "e2e" / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["done"]
    assert summary["stages"][0]["metrics"]

    logs = posttrain("logs", job, "--address", url)
    assert logs.returncode == 0 and "sft: " in logs.stdout and "SUCCEEDED" in logs.stderr
    table = posttrain("jobs", "--address", url)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(job))
    assert "SUCCEEDED" in row and "recipe.yaml name=e2e" in row
    assert table.stdout.splitlines()[0].split() == ["ID", "STATUS", "START", "RECIPE", "/", "ENTRYPOINT"]
    stop = posttrain("stop", job, "--address", url)
    assert stop.returncode == 0 and "already ended: SUCCEEDED" in stop.stdout


@pytest.mark.slow
def test_failing_job_and_stopped_job(ray_head, tmp_path, tiny_model):
    url, work = ray_head["url"], tmp_path / "work"
    shutil.copytree(tiny_model, work / "models/tiny")
    (work / "data").mkdir()
    (work / "data/bad.jsonl").write_text("{not json\n[1, 2]\n")  # exists, so it is uploaded; fails at run time
    _sft_recipe(work, Path("models/tiny"), output_dir=tmp_path / "out", data={"bad": {"path": "data/bad.jsonl"}},
                name="bad.yaml")
    _sft_recipe(work, Path("models/tiny"), output_dir=tmp_path / "out", steps=100_000, name="long.yaml")

    long = posttrain("submit", "long.yaml", "name=long", "--address", url, cwd=work)
    assert long.returncode == 0, long.stderr
    long_job = _job_id(long.stdout)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {ray_head['token']}"})
    deadline = time.monotonic() + 60
    while str(client.get_job_status(long_job)) != "RUNNING":
        assert time.monotonic() < deadline, client.get_job_info(long_job)
        time.sleep(0.3)
    stop = posttrain("stop", long_job, "--address", url)
    assert stop.returncode == 0 and f"job {long_job}: STOPPED" in stop.stdout, (stop.stdout, stop.stderr)
    logs = posttrain("logs", long_job, "--follow", "--address", url)
    assert logs.returncode == 1 and f"job {long_job}: STOPPED" in logs.stderr

    bad = posttrain("submit", "bad.yaml", "name=bad", "stages.0.train_split=train", "--follow", "--address", url,
                    cwd=work)
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    bad_job = _job_id(bad.stdout)
    assert "data.bad" in bad.stdout and f"job {bad_job}: FAILED" in bad.stderr
    logs = posttrain("logs", bad_job, "--address", url)
    assert logs.returncode == 1
    assert "error: data.bad.path" in logs.stdout  # the driver's own message, from the cluster
    assert f"job {bad_job}: FAILED: Job entrypoint command failed with exit code 2\n" in logs.stderr


@pytest.mark.slow
def test_bad_job_ids_ports_and_tokens(ray_head):
    url = ray_head["url"]
    for args in (["logs", "raysubmit_nope", "--follow"], ["stop", "raysubmit_nope"]):
        _fails_cleanly(posttrain(*args, "--address", url), "no job 'raysubmit_nope'", "posttrain jobs --address")
    t0 = time.monotonic()
    _fails_cleanly(posttrain("jobs", "--address", f"http://127.0.0.1:{ray_head['gcs']}"),  # GCS port, not the dashboard
                   "cannot reach the Ray job API", "ray start --head")
    assert time.monotonic() - t0 < 20
    env_without_token = {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env_without_token.items():
            mp.setenv(k, v)
        _fails_cleanly(posttrain("jobs", "--address", url), "requires token authentication", "RAY_AUTH_MODE=token")
