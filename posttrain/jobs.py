"""Run recipes as Ray jobs on a cluster: `posttrain submit | jobs | logs | stop`.

A job ships the working directory (recipe, local model and data files) to the cluster and runs
`posttrain run` there as the job's driver, which joins the cluster (`cluster.address=auto`) instead of
starting an embedded Ray. Everything a user can get wrong locally (recipe keys, paths that would not reach
the cluster, the address) is checked before anything is uploaded. Ray is imported only where a cluster is
talked to, so the path and entrypoint helpers test without it.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.recipe.schema import Recipe

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never useful on the cluster and often large. Ray also honours .gitignore and .rayignore.
EXCLUDES = (".git/", ".venv/", "__pycache__/", ".cache/", "/runs/")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
START_HEAD = "ray start --head --dashboard-host 0.0.0.0"
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz")


# ------------------------------------------------------------ pure helpers
def default_address(env: Mapping[str, str] = os.environ) -> str:
    """RAY_ADDRESS when it names the job API (an http(s) URL); Ray also uses it for GCS addresses, not ours."""
    value = env.get("RAY_ADDRESS", "")
    return value.rstrip("/") if value.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def job_api_url(address: str | None) -> str:
    address = (address or default_address()).strip().rstrip("/")
    if address.startswith("ray://") or address == "auto":
        raise PosttrainError(
            f"--address {address!r}: jobs are submitted to the head's dashboard (job API), e.g. http://HEAD:8265, "
            "not to a Ray client or GCS address")
    return address if "://" in address else f"http://{address}"


def entrypoint(recipe: str, overrides: Sequence[str], resume: bool = False) -> str:
    """The job's shell command. `python -m` works whether posttrain is installed on the cluster or only shipped
    in the working dir (which is on the job's sys.path); the last override wins, so the driver joins the cluster."""
    flags = ["--resume"] if resume else []
    return shlex.join(["python", "-m", "posttrain.cli", "run", recipe, *flags, *overrides, "cluster.address=auto"])


@dataclass(frozen=True)
class PathRef:
    """A local file or directory a recipe names."""

    key: tuple[str, ...]  # recipe field, e.g. ("data", "gsm8k", "path")
    value: str  # as written
    base: str = ""  # relative values resolve against this (split files: their data path), itself against the root
    built: bool = False  # model.path with `model.tiny`: built on the cluster when missing, so never an error

    @property
    def field(self) -> str:
        return ".".join(self.key)


def recipe_paths(recipe: Recipe) -> list[PathRef]:
    """Every path-like field of the recipe ("@stage" references and built-in tasks name no file)."""
    refs = [PathRef(("model", "path"), recipe.model.path, built=recipe.model.tiny is not None)]
    for name, d in recipe.data.items():
        if d.path:
            refs.append(PathRef(("data", name, "path"), d.path))
        refs += [PathRef(("data", name, "splits", split), file, base=d.path or "") for split, file in d.splits.items()]
    for i, s in enumerate(recipe.stages):
        online, reward, critic = (getattr(s, k, None) for k in ("online", "reward", "critic"))
        for field, value in ((("model",), s.model), (("online", "reward_model"), getattr(online, "reward_model", None)),
                             (("reward", "reward_model"), getattr(reward, "reward_model", None)),
                             (("critic", "model"), getattr(critic, "model", None))):
            if value and not value.startswith("@"):
                refs.append(PathRef(("stages", str(i), *field), value))
    return refs


def _looks_local(ref: PathRef, root: Path) -> bool:
    """Hub ids ("org/name") are fetched by the cluster; the same rule as the loaders' for what is a path."""
    v = ref.value
    return bool(ref.base) or v.startswith((".", "/", "~")) or v.count("/") > 1 or v.endswith(_DATA_SUFFIXES) \
        or (root / v).exists()


def resolve(value: str, root: Path, base: str = "") -> Path:
    """Where the job will look: relative paths resolve against its cwd, the uploaded copy of `root`. Lexical
    (symlinks kept): Ray uploads a symlink's target under the link's name."""
    return Path(os.path.normpath(root / Path(base).expanduser() / Path(value).expanduser()))


def _within(path: Path, root: Path) -> Path | None:
    """`path` as seen inside `root` (also through symlinks in either), or None when it lies outside."""
    if path.is_relative_to(root):
        return path
    real = path.resolve()
    return root / real.relative_to(root.resolve()) if real.is_relative_to(root.resolve()) else None


def check_paths(refs: Iterable[PathRef], root: Path, uploaded: Callable[[Path], bool] | None = None,
                excludes: Sequence[str] = EXCLUDES) -> tuple[list[str], list[str]]:
    """(problems, overrides). A problem names the field of a path that would not reach the cluster: outside
    `root`, missing, or left out of the upload (`uploaded`: Ray's own file filter, None to skip that check).
    Absolute paths inside `root` get a relative override: on another machine only the uploaded copy exists."""
    root = Path(os.path.abspath(root))
    problems: list[str] = []
    overrides: list[str] = []
    for ref in refs:
        if not _looks_local(ref, root):
            continue
        path = _within(resolve(ref.value, root, ref.base), root)
        if path is None:
            if not ref.built:
                problems.append(f"{ref.field}: {ref.value} lies outside the uploaded directory {root}, so the "
                                f"cluster would not see it: move or copy it into {root} and point {ref.field} there, "
                                "or pass --working-dir with a directory holding both it and the recipe")
            continue
        if not path.exists():
            if not ref.built:
                problems.append(f"{ref.field}: {ref.value} does not exist (looked for {path}; relative paths resolve "
                                f"against the uploaded directory {root}, as on the cluster)")
        elif uploaded is not None and not ref.built and (left := _left_out(path, uploaded)):
            problems.append(f"{ref.field}: {left} would not be uploaded: it matches {', '.join(excludes)} or a "
                            ".gitignore/.rayignore pattern. Move it elsewhere under the working directory or "
                            "change the ignore file")
        if (override := _relative_override(ref, path, root)) is not None:
            overrides.append(override)
    return problems, overrides


def _relative_override(ref: PathRef, path: Path, root: Path) -> str | None:
    """`field=relative/path` for an absolute path inside the upload, when an override can express it."""
    if not Path(ref.value).expanduser().is_absolute() or any("." in k or "=" in k for k in ref.key):
        return None
    start = resolve(ref.base, root) if ref.base else root  # split files are relative to their data path
    if not (start.is_dir() and start.is_relative_to(root)):
        return None
    return f"{ref.field}={Path(os.path.relpath(path, start)).as_posix()}"


def _left_out(path: Path, uploaded: Callable[[Path], bool]) -> str:
    """'' when `path` (and every visible file under a directory) is uploaded, else what is missing."""
    if not uploaded(path):
        return str(path)
    if path.is_dir():
        missing = [p for p in sorted(path.rglob("*")) if p.is_file() and not uploaded(p)
                   and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts)]
        if missing:
            return f"{len(missing)} file(s) under {path} (e.g. {missing[0].name})"
    return ""


def upload_excludes(recipe: Recipe, root: Path) -> list[str]:
    """EXCLUDES plus the run's output directory when it lies inside the upload (earlier runs' checkpoints)."""
    root = Path(os.path.abspath(root))
    out = resolve(recipe.tracking.output_dir, root)
    own = f"/{out.relative_to(root).as_posix()}/" if out.is_relative_to(root) and out != root else None
    return [*EXCLUDES, *([own] if own and own not in EXCLUDES else [])]


def recipe_in(recipe: Path, root: Path) -> str:
    """The recipe's path inside the upload, as the job's command names it."""
    inside = _within(Path(os.path.abspath(recipe)), Path(os.path.abspath(root)))
    if inside is None:
        raise PosttrainError(
            f"the recipe {recipe} lies outside the working directory {root}, which is what reaches the cluster: "
            f"copy it into {root}, or run from (or pass --working-dir) a directory that holds it")
    return inside.relative_to(os.path.abspath(root)).as_posix()


def jobs_table(jobs: Sequence[Any]) -> str:
    """One line per job, oldest first: id, status, start time, and the recipe (or the command of other jobs)."""
    rows = [("ID", "STATUS", "START", "RECIPE / ENTRYPOINT")]
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        what = (j.metadata or {}).get("posttrain_recipe") or j.entrypoint or "-"
        rows.append((j.submission_id or j.job_id or "-", _status(j.status), start, what))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)


def _status(status: Any) -> str:
    return str(getattr(status, "value", status))


# --------------------------------------------------------------- the cluster
def connect(address: str | None, timeout_s: float = 5.0) -> tuple[Any, str]:
    """(JobSubmissionClient, url), failing in seconds with what to do. The SDK sets no timeout on its HTTP
    calls, so its connection check runs under a default socket timeout (a wrong port may accept and stay mute)."""
    import socket

    url = job_api_url(address)
    logging.getLogger("ray").setLevel(logging.WARNING)  # the SDK's INFO lines (upload, websocket closed) are noise
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(url), url
    except Exception as exc:  # requests', Ray's and the URL parser's own types: classified by what they say
        problem = _connection_problem(exc, timeout_s)
    finally:
        socket.setdefaulttimeout(previous)
    if problem.startswith("authentication"):
        raise PosttrainError(
            f"the Ray cluster at {url} requires token authentication ({problem}): on this machine set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> (or put the token in ~/.ray/auth_token); "
            "`ray get-auth-token` on the head prints it")
    raise PosttrainError(
        f"cannot reach the Ray job API at {url}: {problem}. Start a head there with `{START_HEAD}` (the job API "
        "listens on the dashboard port, 8265 by default), or pass --address http://HEAD:8265 "
        f"(default: $RAY_ADDRESS when it is an http(s) URL, else {DEFAULT_ADDRESS})")


def _connection_problem(exc: Exception, timeout_s: float) -> str:
    text = str(exc)
    if type(exc).__name__ == "AuthenticationError" or text.startswith("Authentication"):
        return "authentication " + ("failed: the token was refused" if "failed" in text.split(":")[0] else "required")
    if type(exc).__name__ in ("InvalidURL", "MissingSchema", "InvalidSchema", "LocationParseError"):
        return f"not a valid URL ({text.splitlines()[0][:200]})"
    if isinstance(exc, ConnectionError) or "refused" in text:
        return "nothing accepts connections there (connection refused or unreachable)"
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return f"no answer within {timeout_s:g} s"
    if "404" in text or isinstance(exc, ValueError):  # a web server that is no dashboard; a reply that is not JSON
        return "something answered, but not a Ray dashboard's job API (wrong port?)"
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def job_info(client: Any, job_id: str, url: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise PosttrainError(f"no job {job_id!r} at {url}; `posttrain jobs --address {url}` lists them") from None
        raise PosttrainError(f"job {job_id!r} at {url}: {exc}") from None


def upload_filter(root: Path, excludes: Sequence[str]) -> Callable[[Path], bool] | None:
    """Whether Ray will upload a path: Ray's own walk (excludes, nested .gitignore/.rayignore files). None when
    this Ray lacks these internals: the submission still works, only that check is skipped."""
    import inspect

    try:
        from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    except ImportError:
        return None
    kept: set[Path] = set()
    quiet = logging.getLogger(f"{__name__}.upload")
    quiet.setLevel(logging.WARNING)  # Ray's walk names every ignore file it reads, at INFO
    kwargs: dict[str, Any] = {"logger": quiet}
    if "include_gitignore" in inspect.signature(_dir_travel).parameters:
        kwargs["include_gitignore"] = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    _dir_travel(root, [_get_excludes(root, list(excludes))], kept.add, **kwargs)
    return kept.__contains__


@dataclass
class Submitted:
    job_id: str
    url: str
    entrypoint: str
    client: Any


def submit(recipe_file: str, overrides: Sequence[str], address: str | None, working_dir: str,
           resume: bool = False) -> Submitted:
    """Validate locally, then ship `working_dir` and start `posttrain run` on the cluster as a job."""
    from posttrain.recipe.load import load_recipe

    recipe = load_recipe(recipe_file, overrides)  # a bad key fails here, before anything is uploaded
    root = Path(os.path.abspath(working_dir))
    if not root.is_dir():
        raise PosttrainError(f"--working-dir {working_dir}: no such directory")
    rel = recipe_in(Path(recipe_file), root)
    excludes = upload_excludes(recipe, root)
    uploaded = upload_filter(root, excludes)
    problems, rewrites = check_paths([PathRef(("recipe",), rel), *recipe_paths(recipe)], root, uploaded, excludes)
    if problems:
        raise PosttrainError("nothing was submitted; the job would miss files:\n  " + "\n  ".join(problems))
    client, url = connect(address)
    command = entrypoint(rel, [*overrides, *rewrites], resume)
    if not Path(recipe.tracking.output_dir).expanduser().is_absolute():
        log.warning("tracking.output_dir %r is relative: the run writes inside the job's copy of the working "
                    "directory on the head node, which Ray may delete later. Set tracking.output_dir to an absolute "
                    "path on the cluster (shared storage) to keep checkpoints", recipe.tracking.output_dir)
    log.info("uploading %s to %s (skipping %s and .gitignore/.rayignore matches)", root, url, ", ".join(excludes))
    try:
        job_id = client.submit_job(entrypoint=command, runtime_env={"working_dir": str(root), "excludes": excludes},
                                   metadata={"posttrain_recipe": shlex.join([rel, *(["--resume"] if resume else []),
                                                                             *overrides])})
    except (RuntimeError, ValueError, ConnectionError) as exc:  # upload too large, cluster refused, ...
        raise PosttrainError(f"submitting to {url} failed: {str(exc).splitlines()[0][:500]}") from None
    return Submitted(job_id, url, command, client)


def follow(client: Any, job_id: str, url: str) -> str:
    """Stream a job's logs from its start until it ends; returns its final status."""
    import asyncio

    job_info(client, job_id, url)  # an unknown id: a clear message, not a websocket error

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # the stream broke (dashboard restarted, network; aiohttp's many types): the job goes on
        raise PosttrainError(f"lost the log stream of job {job_id} ({exc}); follow again with "
                             f"`posttrain logs {job_id} --follow --address {url}`") from None
    # The stream closes when the driver exits; the status turns terminal moments later.
    deadline = time.monotonic() + 30
    while (status := _status(client.get_job_status(job_id))) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def outcome(client: Any, job_id: str, url: str) -> tuple[str, str]:
    """(status, a one-line summary for the end of the logs)."""
    info = job_info(client, job_id, url)
    status = _status(info.status)
    line = f"job {job_id}: {status}"
    if status == "FAILED" and info.message:
        line += f": {info.message.splitlines()[0].split(', last available logs')[0]}"  # the rest repeats the logs
    return status, line


def stop(client: Any, job_id: str, url: str, wait_s: float = 20.0) -> tuple[bool, str]:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL) and wait briefly for it to end.
    Returns (whether it was still running, its status now)."""
    status = _status(job_info(client, job_id, url).status)
    if status in TERMINAL:
        return False, status
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while (status := _status(client.get_job_status(job_id))) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return True, status
