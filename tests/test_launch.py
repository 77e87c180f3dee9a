"""launch/ and docker/: checked with the tools their formats have, since none of them can run here (no AWS, no
SLURM, no Docker engine). The cluster YAML against the JSON schema Ray ships and Ray's own config checks; shell
scripts with bash -n and shellcheck; Dockerfiles with hadolint; the pins the images and pyproject share; and the
SLURM helper against a real two-node Ray cluster on this machine."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "launch" / "aws-p4" / "cluster.yaml"
SBATCH = ROOT / "launch" / "slurm" / "posttrain.sbatch"
HELPER = ROOT / "launch" / "slurm" / "ray-cluster.sh"
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


def _shell_scripts() -> list[Path]:
    """Every file under launch/ that starts with a shell shebang."""
    found = []
    for path in sorted((ROOT / "launch").rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                first = f.readline()
            if first.startswith(b"#!") and re.search(rb"\b(ba)?sh\b", first):
                found.append(path)
    return found


def _tool(name: str) -> str:
    """A linter binary from the dev extra (installed beside this interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if path is None:
        reason = f"{name} is not installed: `pip install -e '.[dev]'` provides it"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI installs the dev extra, so it must be there)")
        pytest.skip(reason)
    return path


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _pins() -> dict[str, str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*meta["dependencies"], *meta["optional-dependencies"]["vllm"]]
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", r.strip()).groups() for r in reqs if "==" in r)
    return {"torch": pins["torch"], "vllm": pins["vllm"]}


# ------------------------------------------------------------------ AWS cluster launcher config
def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema

    spec = importlib.util.find_spec("ray")
    schema_path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(_cluster(), schema)  # top level is closed: a misspelled key fails here


def test_cluster_yaml_passes_rays_own_config_checks():
    """What `ray up` does before it talks to AWS: fill in the provider's defaults, merge setup commands, check
    the docker section and the node types (no credentials needed)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:  # private API: say so rather than fail on a Ray refactor
        pytest.skip(f"Ray's config helpers moved ({exc}); the schema test still runs")
    config = prepare_config(copy.deepcopy(_cluster()))
    validate_config(config)
    assert config["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def test_cluster_yaml_content():
    c = _cluster()
    assert c["provider"]["type"] == "aws" and c["provider"]["region"] == "us-east-1"
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    workers = [t for name, t in types.items() if name != c["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert [w["node_config"]["InstanceType"] for w in workers] == ["p4d.24xlarge"]
    assert workers[0]["min_workers"] == 0 and 1 <= workers[0]["max_workers"] <= c["max_workers"]
    for t in types.values():
        assert t["node_config"]["ImageId"].startswith("ami-")  # a placeholder the user replaces (README)

    docker = c["docker"]
    assert docker["image"] and docker["container_name"]
    options = " ".join(docker["run_options"])
    assert "--gpus all" in options and "--shm-size=" in options and "memlock=-1" in options

    head_start = " ".join(c["head_start_ray_commands"])
    worker_start = " ".join(c["worker_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head_start and "--dashboard-port=8265" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    port = re.search(r"--port=(\d+)", head_start).group(1)
    assert f'--address="$RAY_HEAD_IP:{port}"' in worker_start
    for local in c["file_mounts"].values():
        assert (ROOT / local).exists(), f"file_mounts source {local} (relative to the repo root) is missing"


def test_cluster_yaml_commands_are_clean_shell(tmp_path):
    """Ray runs each command with bash; parse them and shellcheck them as one script per list."""
    c = _cluster()
    shellcheck = _tool("shellcheck")
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for key in keys:
        commands = c.get(key) or []
        for command in commands:
            run = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert run.returncode == 0, f"{key}: {command!r}: {run.stderr}"
        if commands:
            script = tmp_path / f"{key}.sh"
            script.write_text("#!/usr/bin/env bash\n" + "\n".join(commands) + "\n")
            run = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
            assert run.returncode == 0, f"{key}:\n{run.stdout}{run.stderr}"


# ------------------------------------------------------------------ shell scripts
def test_launch_has_the_expected_scripts():
    assert {SBATCH, HELPER} <= set(_shell_scripts())


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_parses(script):
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_passes_shellcheck(script):
    run = subprocess.run([_tool("shellcheck"), "--shell=bash", "--external-sources", str(script)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


def test_sbatch_header():
    """sbatch reads #SBATCH lines only before the first command; after it they are silently ignored."""
    lines = SBATCH.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
    directives = {}
    for i, line in enumerate(lines):
        if line.startswith("#SBATCH"):
            assert i < first_command, f"line {i + 1}: #SBATCH after the first command is ignored by sbatch"
            option = shlex.split(line[len("#SBATCH"):])
            assert len(option) == 1, f"line {i + 1}: one option per #SBATCH line, no trailing comments"
            name, _, value = option[0].partition("=")
            directives[name] = value
    assert directives["--nodes"] == "1" and directives["--ntasks-per-node"] == "1"
    assert int(directives["--gpus-per-node"]) == 8
    assert "--exclusive" in directives and directives["--job-name"] == "posttrain"
    assert re.fullmatch(r"\d+:\d\d:\d\d", directives["--time"])
    assert "%j" in directives["--output"]
    assert re.fullmatch(r"B:TERM@\d+", directives["--signal"])  # to the batch shell, so its trap tears Ray down


# ------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    run = subprocess.run([_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _args(dockerfile: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile.read_text(), flags=re.M))


def test_docker_pins_match_pyproject():
    """The images install torch (and vLLM) from ARGs; they must be pyproject's pins or the image drifts."""
    pins = _pins()
    gpu, cpu = (_args(d) for d in DOCKERFILES)
    assert gpu["TORCH_VERSION"] == cpu["TORCH_VERSION"] == pins["torch"]
    assert gpu["VLLM_VERSION"] == pins["vllm"]
    gpu_text, cpu_text = (d.read_text() for d in DOCKERFILES)
    assert '"torch==${TORCH_VERSION}"' in gpu_text and '"vllm==${VLLM_VERSION}"' in gpu_text
    assert '"torch==${TORCH_VERSION}"' in cpu_text and "download.pytorch.org/whl/cpu" in cpu_text
    assert "posttrain[vllm]" in gpu_text
    assert 'CMD ["posttrain", "run", "recipes/quickstart.yaml"]' in cpu_text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_docker_context_allows_every_copy_source(dockerfile):
    """The build context is the repo root, filtered by the allow-list beside the Dockerfile: everything COPY
    names must exist and be allowed, or the build fails with "not found" far from the cause."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list: exclude everything, then re-include"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such file in the repo"
                assert source.split("/")[0] in allowed, f"{dockerfile.name}: COPY {source} is left out by {ignore.name}"


# ------------------------------------------------------------------ the SLURM helper, on a real Ray
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _count(env: dict[str, str]) -> int:
    out = subprocess.run(["bash", str(HELPER), "count", "127.0.0.1"], env=env, capture_output=True, text=True,
                         timeout=90).stdout.strip()
    return int(out or 0)


def _wait_for_nodes(n: int, env: dict[str, str], procs: list[subprocess.Popen], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"`ray-cluster.sh` exited early ({p.returncode}): {p.args}"
        if _count(env) >= n:
            return
        time.sleep(2)
    raise AssertionError(f"{n} Ray node(s) did not come up within {timeout_s}s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_cluster_helper_runs_a_two_node_cluster(tmp_path):
    """A head and a worker on this machine, as posttrain.sbatch starts them on two nodes (token auth handed over
    through the environment, as the sbatch does): both join, `count` sees them, SIGTERM stops every process."""
    temp_dir = tempfile.mkdtemp(prefix="ptl", dir="/tmp")  # short: Ray's socket paths must fit in 107 chars
    gcs, dashboard, client, *agent = _free_ports(7)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HOME": str(tmp_path / "home"), "RAY_PORT": str(gcs), "RAY_DASHBOARD_PORT": str(dashboard),
           "CPUS_PER_NODE": "1", "GPUS_PER_NODE": "0", "RAY_TEMP_DIR": temp_dir}
    env.pop("RAY_ADDRESS", None)
    token = subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True)
    if token.returncode == 0:
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token.stdout.strip(), "HOME": str(tmp_path / "other")}

    def start(role: str, ports: list[int], log: Path) -> subprocess.Popen:
        flags = f"--dashboard-agent-listen-port={ports[0]} --metrics-export-port={ports[1]} " \
                f"--object-store-memory={100 * 1024**2}"
        if role == "head":
            flags += f" --ray-client-server-port={client}"
        return subprocess.Popen(["bash", str(HELPER), role, "127.0.0.1"], env={**env, "RAY_START_ARGS": flags},
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    procs: list[subprocess.Popen] = []
    try:
        procs.append(start("head", agent[0:2], tmp_path / "head.log"))
        _wait_for_nodes(1, env, procs)
        procs.append(start("worker", agent[2:4], tmp_path / "worker.log"))
        _wait_for_nodes(2, env, procs)

        for p in procs:  # what srun does to its steps when the sbatch's trap kills them
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=90)
        deadline = time.monotonic() + 60
        while _processes_mentioning(temp_dir) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _processes_mentioning(temp_dir), "Ray processes outlived `ray start --block` after SIGTERM"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for pid in _processes_mentioning(temp_dir):  # only processes of this test's own Ray
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        for log in ("head.log", "worker.log"):
            if (tmp_path / log).exists():
                print(f"--- {log}\n" + (tmp_path / log).read_text()[-3000:])
