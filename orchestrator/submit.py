"""``sslab submit``: run any sslab command as a Ray job on a cluster (``JobSubmissionClient``).

The project folder is the job's working directory (data, state, virtual environments and build
outputs excluded). The job's runtime environment, which every dashboard user can read, carries no
secret and none of the submitter's paths: a cluster's pods keep their own ``MLFLOW_TRACKING_URI``,
``SSLAB_HOME``, ``SSLAB_DATA_ROOT`` and credentials (Kubernetes Secrets, the env of ``ray start``).
Only ``--tracking-uri`` and ``--env`` (secret-looking names refused) are sent. When the cluster is
this machine (every node reports this host name, even through a tunnel's loopback address), the
job also gets this checkout's state folder, data root and tracking store, which are then valid
paths for it. ``--wait`` streams the job's logs and returns the job's own exit status.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from trainers.errors import UserError
from trainers.paths import project_root

# Never uploaded with a job (gitwildmatch patterns, as Ray applies them; .gitignore is honoured too,
# but a job must not depend on it): state and data, environments and caches, and anything that
# looks like a credential. Secrets reach jobs through --env / the runtime env or Kubernetes Secrets.
EXCLUDES = [
    # state, data, build outputs
    ".state/", ".venv/", "/venv/", ".git/", ".benchdata*", ".devicekit/", "/data/", "mlruns/", "*.beton",
    "*.beton.json", "*.tar.gz", "*.tgz", "*.zip", "*.npz", "*.pt", "*.pth", "*.ckpt", "*.db", "*.sqlite",
    "**/__pycache__/", ".pytest_cache/", ".ruff_cache/", "bench/results/", "*.egg-info/",
    # credentials
    ".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ed25519*", ".netrc", ".pgpass",
    "auth_token", ".ray/", ".aws/", ".ssh/", ".kube/", "*kubeconfig*", "*credentials*", "*.secret", "*secret*.yaml",
    "*secrets*.yaml", "!cluster/kuberay/secrets.example.yaml",
]
# An --env name that looks like a credential: refused (the runtime env is public to dashboard users).
# Whole words of the name (TOKENIZERS_PARALLELISM passes); a value holding user:password@ in a URL too.
SECRET_NAME = re.compile(r"(?:^|_)(?:PASSWORD|PASSWD|PASS|PWD|TOKEN|SECRET|CREDENTIALS?|API_?KEY|ACCESS_?KEY|"
                         r"PRIVATE_?KEY)(?:_|$)|PASSW(?:OR)?D", re.IGNORECASE)
URL_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOPPED_EXIT = 6  # `submit --wait` when the job was stopped before it ended (docs/errors.md)


def default_address() -> str:
    return os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(extra: list[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` entries (KEY: letters, digits and _, not starting with a digit)."""
    env = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(key):
            raise UserError(f"--env '{item}' must look like KEY=VALUE (KEY: letters, digits and _, not starting "
                            "with a digit), e.g. --env OMP_NUM_THREADS=4")
        env[key] = value
    return env


def check_no_secrets(env: dict[str, str], tracking_uri: str | None = None) -> None:
    where = ("give it to the cluster instead (a Kubernetes Secret in the pods' env, or the environment `ray start` "
             "runs in)")
    for key, value in env.items():
        if SECRET_NAME.search(key):
            raise UserError(f"--env {key}=... would put a secret into the job's runtime env, which every Ray dashboard "
                            f"user can read: {where}")
        if URL_PASSWORD.search(value):
            raise UserError(f"--env {key}=... holds a URL with a password (user:password@), which every Ray dashboard "
                            f"user could read in the job's runtime env: drop the password from the URL and {where}")
    if tracking_uri and URL_PASSWORD.search(tracking_uri):
        raise UserError("--tracking-uri holds a password (user:password@), which every Ray dashboard user could read in "
                        "the job's runtime env: pass the URL without it; the pods log in with MLFLOW_TRACKING_USERNAME/"
                        "PASSWORD from a Kubernetes Secret")


def job_env(tracking_uri: str | None, extra: list[str], same_machine: bool = False) -> dict[str, str]:
    """The job's runtime env: ``--env`` entries, ``--tracking-uri``, and on this machine only, the
    submitter's state folder, data root and tracking store. Never a secret, never the submitter's
    paths on another machine."""
    env = parse_env(extra)
    check_no_secrets(env, tracking_uri)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if same_machine:
        # the job runs in a temporary copy of the checkout: point it at this checkout's state and data
        from orchestrator.tracking import resolve_tracking_uri
        from trainers.paths import default_data_root, state_dir

        env.setdefault("SSLAB_HOME", str(state_dir()))
        root_dir = default_data_root()
        if root_dir is not None:
            env.setdefault("SSLAB_DATA_ROOT", str(root_dir))
        env.setdefault("MLFLOW_TRACKING_URI", resolve_tracking_uri(None))
    return env


def cluster_is_this_machine(client) -> bool:
    """True when every alive node of the job server's cluster reports this machine's host name (a
    ``ray start`` here), False for a remote cluster, also one reached through a tunnel on 127.0.0.1,
    and when the server does not say (the safe answer: nothing local is sent)."""
    import socket

    names: set = set()
    for attempt in range(10):  # a dashboard that has just started may not list its nodes yet
        try:
            response = client._do_request("GET", "/nodes?view=hostNameList", timeout=10)
            names = set(response.json()["data"]["hostNameList"])
        except Exception:  # noqa: BLE001 - an older or proxied dashboard
            return False
        if names:
            break
        time.sleep(0.5)
    return names == {socket.gethostname()}


def check_working_dir(working_dir: str | Path | None) -> Path:
    """The project folder a job carries: an existing sslab checkout (the job runs ``python -m
    sslab`` in it)."""
    hint = "pass the sslab project folder (the one with pyproject.toml and sslab/cli.py)"
    if working_dir is None or working_dir == "":
        root = project_root()
        if root is None:
            raise UserError(f"no project checkout to send: --working-dir is needed: {hint}")
        return root
    root = Path(working_dir).expanduser()
    if not root.exists():
        raise UserError(f"--working-dir {working_dir} does not exist: {hint}")
    if not root.is_dir():
        raise UserError(f"--working-dir {working_dir} is a file, not a folder: {hint}")
    missing = [name for name in ("pyproject.toml", "sslab/cli.py") if not (root / name).is_file()]
    if missing:
        raise UserError(f"--working-dir {working_dir} is not an sslab checkout (it has no {' and no '.join(missing)}; "
                        f"the job runs python -m sslab there): {hint}")
    return root.resolve()


def check_submit_options(args: list[str], gpus: float = 0.0, cpus: float | None = None, env: list[str] = (),
                         working_dir: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """Everything ``submit`` can check before it connects to the job server; returns the working dir."""
    if not args or args == ["sslab"]:
        raise UserError("nothing to run: put the sslab command after --, e.g. sslab submit -- pretrain --config ...")
    for option, value in (("--gpus", gpus), ("--cpus", cpus)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UserError(f"{option} {value:g} must be a number >= 0 (resources reserved for the job's entrypoint)")
    check_no_secrets(parse_env(list(env)), tracking_uri)
    return check_working_dir(working_dir)


def upload_listing(root: str | Path) -> list[str]:
    """The files a job submitted from ``root`` would carry, as Ray packs them (with EXCLUDES and
    ``root``'s .gitignore)."""
    import tempfile
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory(prefix="sslab-package-") as folder:
        target = Path(folder) / "package.zip"
        try:
            create_package(str(root), target, include_gitignore=True, excludes=EXCLUDES)
        except OSError as exc:  # an unreadable file or a special folder (/proc): the package cannot be made
            where = f" ({exc.filename})" if exc.filename else ""
            raise UserError(f"cannot pack {root} for the job{where}: {exc.strerror or exc}; pass a --working-dir "
                            "whose files are all readable (the sslab checkout)") from None
        with zipfile.ZipFile(target) as archive:
            return sorted(n for n in archive.namelist() if not n.endswith("/"))


def submit(args: list[str], address: str | None = None, name: str | None = None, wait: bool = False,
           gpus: float = 0.0, cpus: float | None = None, tracking_uri: str | None = None, env: list[str] = (),
           python: str = "python", working_dir: str | None = None, log: Callable[[str], None] = print) -> int:
    root = check_submit_options(args, gpus=gpus, cpus=cpus, env=env, working_dir=working_dir, tracking_uri=tracking_uri)
    if args[0] == "sslab":
        args = args[1:]
    address = address or default_address()
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, auth errors, bad URLs
        raise UserError(f"cannot reach the Ray job server at {address} ({str(exc).splitlines()[0][:160]}): start a "
                        f"head with `ray start --head` (dashboard on port 8265) or pass --address http://HEAD:8265")
    same_machine = cluster_is_this_machine(client)
    variables = job_env(tracking_uri, list(env), same_machine=same_machine)
    uri = variables.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:") and not same_machine:
        log(f"warning: the job logs to {uri}, a file on the cluster's machines; use a tracking server "
            f"(--tracking-uri http://mlflow:5000) to see the runs here")
    entrypoint = f"{python} -m sslab {shlex.join(args)}"
    kwargs = {}
    if gpus:
        kwargs["entrypoint_num_gpus"] = gpus
    if cpus:
        kwargs["entrypoint_num_cpus"] = cpus
    try:
        job_id = client.submit_job(entrypoint=entrypoint, submission_id=name,
                                   runtime_env={"working_dir": str(root), "excludes": EXCLUDES, "env_vars": variables},
                                   **kwargs)
    except Exception as exc:  # noqa: BLE001 - the SDK raises RuntimeError with the server's answer
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        hint = (f"pick another --name (`ray job list --address {address}` shows the used ones)" if name and
                "already" in reason.lower() else "check the job server's answer above and the cluster's dashboard")
        raise UserError(f"the Ray job server at {address} refused the job ({reason}): {hint}") from None
    log(f"submitted job {job_id} to {address}: {entrypoint}")
    log(f"follow it: ray job logs -f --address {address} {job_id}   status: ray job status --address {address} {job_id}")
    print(job_id)
    if not wait:
        return 0
    return follow(client, job_id)


def follow(client, job_id: str, poll_s: float = 1.0) -> int:
    """Print the job's new log text until it ends. Returns 0 when it succeeded; when it failed, the
    job's own exit status (2 for its bad config, 3 for missing data, ... as if run here), or 1 when it
    has none (it never started); STOPPED_EXIT when it was stopped (``ray job stop``)."""
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in TERMINAL:
            if status == "SUCCEEDED":
                return 0
            info = client.get_job_info(job_id)
            print(f"job {job_id} {status.lower()}: {info.message or ''}".strip(), file=sys.stderr)
            if status == "STOPPED":
                return STOPPED_EXIT
            code = getattr(info, "driver_exit_code", None)
            return code if isinstance(code, int) and 0 < code < 256 else 1
        time.sleep(poll_s)
