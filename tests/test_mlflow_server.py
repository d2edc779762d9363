"""cluster/mlflow/mlflow.yaml's MLflow server, run here the way the manifest runs it.

The Deployment's command and env, the readiness probe's command and the user Job's command are taken
from the manifest and run unchanged but for: the backend store, a PostgreSQL started here in a
temporary folder (Debian's `postgresql` package; `make setup` installs it), in place of the Secret's
URI; artifacts to a local folder in place of s3://; the auth config generated here, at the path the
manifest mounts it to; the namespace `sslab-test`; the server's listen address and worker count
(ONE_WORKER). Names resolve as
in the cluster: `sslab-mlflow` (and its FQDN, and the pod-local 127.0.0.1:5000) lead to this server,
through a getaddrinfo wrapper (in-process, and a sitecustomize for the subprocesses), so clients send
the Host header a pod sends. One server for the whole file: about 20 s on 2 busy cores, most of it
the server's start; skipped (with the reason) where PostgreSQL's server programs are not installed.

Each case of docs/errors.md's `mlflow-*` rows is a test here.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from glob import glob
from pathlib import Path

import pytest
import requests
import yaml

from orchestrator import tracking
from sslab.cli import main

pytestmark = pytest.mark.slow  # starts MLflow servers (and PostgreSQL): `make test-fast` leaves it out
ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "cluster" / "mlflow" / "mlflow.yaml"
NAMESPACE = "sslab-test"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
UNLISTED = "mlflow.example.com"  # resolves to the server too, but is not in --allowed-hosts
# `mlflow server`'s env for --workers (the manifest leaves the default, 4): one worker starts in a
# quarter of the time, and makes a changed password take effect at once (each worker caches logins)
ONE_WORKER = {"MLFLOW_WORKERS": "1"}


# --------------------------------------------------------------------------- the manifest
def _documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _one(kind: str) -> dict:
    found = [d for d in _documents() if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def _container(kind: str) -> dict:
    return _one(kind)["spec"]["template"]["spec"]["containers"][0]


def _service() -> tuple[str, int]:
    service = _one("Service")
    return service["metadata"]["name"], service["spec"]["ports"][0]["port"]


def _env(container: dict, secret_values: dict, mounts: dict[str, Path]) -> dict[str, str]:
    """The container's env as Kubernetes would set it: Secret keys from ``secret_values``, the
    namespace from the downward API, paths under a volume mount moved to that mount's local folder."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            value = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            value = secret_values[(ref["name"], ref["key"])]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", item
            value = NAMESPACE
        for mount_path, local in mounts.items():
            if value.startswith(mount_path + "/"):
                value = str(local) + value[len(mount_path):]
        env[item["name"]] = value
    return env


def _base_env(home: Path) -> dict[str, str]:
    """A clean environment (no MLFLOW_* of the test runner) with the venv's python and mlflow first."""
    return {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(home), "LANG": "C.UTF-8"}


# --------------------------------------------------------------------------- cluster DNS, simulated
def _names(service: str) -> set[str]:
    """What leads to the server: the Service's name and FQDN, the pod's own 127.0.0.1 (readiness
    probe), and UNLISTED (a name the server must refuse)."""
    return {service, f"{service}.{NAMESPACE}.svc.cluster.local", "127.0.0.1", UNLISTED}


SITECUSTOMIZE = '''
import os, socket
_real = socket.getaddrinfo
_names = set(os.environ["SSLAB_TEST_NAMES"].split(","))
_to = int(os.environ["SSLAB_TEST_PORT"])
_from = os.environ["SSLAB_TEST_SERVICE_PORT"]

def getaddrinfo(host, port, *args, **kwargs):
    if host in _names and str(port) == _from:
        return _real("127.0.0.1", _to, *args, **kwargs)
    return _real(host, port, *args, **kwargs)

socket.getaddrinfo = getaddrinfo
'''


def _dns_env(server) -> dict[str, str]:
    """Env that makes a Python subprocess resolve the Service's names (port 5000) to the test server."""
    return {"PYTHONPATH": str(server.dns), "SSLAB_TEST_NAMES": ",".join(sorted(server.names)),
            "SSLAB_TEST_PORT": str(server.port), "SSLAB_TEST_SERVICE_PORT": str(server.service_port)}


@pytest.fixture
def cluster_dns(server, monkeypatch):
    """The same mapping in this process (MLflow's client and requests resolve through it)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in server.names and str(port) == str(server.service_port):
            return real("127.0.0.1", server.port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for var in ("USERNAME", "PASSWORD", "TOKEN", "URI"):
        monkeypatch.delenv(f"MLFLOW_TRACKING_{var}", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("HOME", str(server.home))  # no ~/.mlflow/credentials of the machine's


# --------------------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL on a free port of 127.0.0.1 (password login over TCP, as in the cluster),
    its socket and data in a temporary folder; run as user postgres when the tests run as root."""
    bin_dir = _postgres_bin()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed: apt-get install postgresql "
                    "(make setup does)")
    folder = Path(tempfile.mkdtemp(prefix="sslab-pg-"))  # under /tmp: the postgres user must reach it
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port, password = _free_port(), secrets.token_hex(16)

    def run(*argv: str) -> None:
        done = subprocess.run([*as_user, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{argv[0]}: {done.stderr or done.stdout}"

    run(str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "postgres", "-E", "UTF8", "--no-sync",
        "--auth-local=trust", "--auth-host=scram-sha-256")
    run(str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "-t", "60",
        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        psql = [str(bin_dir / "psql"), "-h", str(folder), "-p", str(port), "-U", "postgres", "-q",
                "-v", "ON_ERROR_STOP=1", "-c"]
        run(*psql, f"CREATE ROLE mlflow LOGIN PASSWORD '{password}'")
        run(*psql, "CREATE DATABASE mlflow OWNER mlflow")
        run(*psql, "CREATE DATABASE mlflow_auth OWNER mlflow")
        yield {"port": port, "password": password,
               "uri": f"postgresql://mlflow:{password}@127.0.0.1:{port}"}
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- the server
class Server:
    pass


def _auth_ini(database_uri: str, admin_password: str) -> str:
    return ("[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {database_uri}\nadmin_username = admin\nadmin_password = {admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n")  # as the manifest's comment advises


def _process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(Path(stat).parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    container = _container("Deployment")
    mounts = {m["mountPath"]: tmp / m["name"] for m in container["volumeMounts"]}
    for folder in mounts.values():
        folder.mkdir()
    s = Server()
    s.tmp, s.home, s.mounts = tmp, tmp / "home", mounts
    s.home.mkdir()
    s.service, s.service_port = _service()
    s.port, s.names = _free_port(), _names(s.service)
    s.admin_password = secrets.token_hex(16)
    s.pg_password = postgres["password"]
    s.auth_uri = f"{postgres['uri']}/mlflow_auth"
    (mounts["/etc/mlflow-auth"] / "basic_auth.ini").write_text(_auth_ini(s.auth_uri, s.admin_password))
    s.user, s.password = "sslab-pods", secrets.token_hex(16)
    s.secrets = {("sslab-mlflow-server", "backend_uri"): f"{postgres['uri']}/mlflow",
                 ("sslab-artifacts", "AWS_ACCESS_KEY_ID"): "unused",
                 ("sslab-artifacts", "AWS_SECRET_ACCESS_KEY"): "unused",
                 ("sslab-mlflow-client", "username"): s.user, ("sslab-mlflow-client", "password"): s.password}
    s.env = _env(container, s.secrets, mounts)
    assert s.env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    s.artifacts = tmp / "artifacts"
    s.env["MLFLOW_ARTIFACTS_DESTINATION"] = s.artifacts.as_uri()  # no bucket here
    s.dns = tmp / "dns"
    s.dns.mkdir()
    (s.dns / "sitecustomize.py").write_text(SITECUSTOMIZE)

    shell, flag, script = container["command"]
    assert (shell, flag) == ("sh", "-c")
    listen = f"--host 0.0.0.0 --port {s.service_port}"
    assert script.count(listen) == 1, "the server listens on the Service's target port on every interface"
    s.command = [shell, flag, script.replace(listen, f"--host 127.0.0.1 --port {s.port}")]
    log = open(tmp / "server.log", "w")
    s.process = subprocess.Popen(s.command, env={**_base_env(s.home), **s.env, **ONE_WORKER}, cwd=tmp, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        if s.process.poll() is not None:
            pytest.fail(f"the manifest's MLflow server exited ({s.process.returncode}):\n"
                        f"{(tmp / 'server.log').read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{s.port}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, (tmp / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    try:
        yield s
    finally:
        os.killpg(s.process.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            s.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(s.process.pid, signal.SIGKILL)
            s.process.wait(timeout=20)
        log.close()


def _job(server, password: str | None = None, config_dir: Path | None = None) -> subprocess.CompletedProcess:
    """The manifest's user Job, its command as written, with the pods' Secret (password changed if given)."""
    container = _container("Job")
    secret_values = dict(server.secrets)
    if password is not None:
        secret_values[("sslab-mlflow-client", "password")] = password
    mounts = {m["mountPath"]: config_dir or server.mounts[m["mountPath"]] for m in container["volumeMounts"]}
    env = {**_base_env(server.home), **_env(container, secret_values, mounts), **_dns_env(server)}
    return subprocess.run(container["command"], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def pods_user(server):
    """The Job's first run: the pods' user does not exist before it."""
    assert _status(server, server.user, server.password) == 401
    return _job(server)


def _status(server, user: str | None, password: str | None, host: str | None = None, path: str = SEARCH) -> int:
    headers = {"Host": host or f"{server.service}:{server.service_port}"}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return requests.get(f"http://127.0.0.1:{server.port}{path}", headers=headers, timeout=10).status_code


# --------------------------------------------------------------------------- the tests
def test_the_manifest_keeps_the_database_password_out_of_argv_and_replaces_its_pod(server):
    deployment = _one("Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = _one("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert claim["metadata"]["name"] in [v["persistentVolumeClaim"]["claimName"] for v in volumes
                                         if "persistentVolumeClaim" in v]
    tree = _process_tree(server.process.pid)
    assert len(tree) >= 2, "the shell's exec'd `mlflow server` and the web server it starts"
    argv = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            for pid in tree if Path(f"/proc/{pid}/cmdline").exists()]
    assert any("mlflow server" in a and "--allowed-hosts" in a for a in argv), argv
    assert any("uvicorn" in a for a in argv), argv
    assert not [a for a in argv if server.pg_password in a], "the database password is on a command line"
    environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
    assert f"MLFLOW_BACKEND_STORE_URI={server.secrets[('sslab-mlflow-server', 'backend_uri')]}".encode() in environ


def test_the_pods_user_logs_a_run_through_the_service_name(server, pods_user, cluster_dns, monkeypatch):
    uri = _env(_container("Job"), server.secrets, {})["MLFLOW_TRACKING_URI"]
    assert uri == f"http://{server.service}:{server.service_port}"  # what the pods use (tests/test_cluster.py)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, "server-test", uri)
    run_id = client.create_run(experiment).info.run_id
    client.log_metric(run_id, "loss", 0.25, step=7)
    client.log_param(run_id, "method", "swav")
    client.log_text(run_id, "proxied", "notes/hello.txt")  # through --serve-artifacts
    client.set_terminated(run_id)
    run = client.get_run(run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(7, 0.25)]
    assert run.data.params == {"method": "swav"} and run.info.status == "FINISHED"
    assert [p.read_text() for p in server.artifacts.rglob("hello.txt")] == ["proxied"]
    fqdn = f"http://{server.service}.{NAMESPACE}.svc.cluster.local:{server.service_port}"
    assert tracking.check_reachable(uri) is None and tracking.check_reachable(fqdn) is None


def test_a_wrong_login_gets_401_and_an_unknown_host_403_while_health_still_answers(server, pods_user):
    assert _status(server, server.user, server.password) == 200
    assert _status(server, server.user, server.password,
                   host=f"{server.service}.{NAMESPACE}.svc.cluster.local:{server.service_port}") == 200
    assert _status(server, server.user, "wrong-password-123") == 401
    assert _status(server, None, None) == 401
    answer = requests.get(f"http://127.0.0.1:{server.port}{SEARCH}", timeout=10, auth=(server.user, server.password),
                          headers={"Host": f"{UNLISTED}:5000"})
    assert answer.status_code == 403 and "Invalid Host header" in answer.text
    # what the old readiness probe and --require-tracking saw: /health skips the Host check and the login
    assert _status(server, None, None, host=f"{UNLISTED}:5000", path="/health") == 200


def test_the_user_job_creates_the_pods_user_and_is_idempotent(server, pods_user, tmp_path):
    assert pods_user.returncode == 0, pods_user.stderr
    assert pods_user.stdout.strip() == f"created MLflow user {server.user} at http://sslab-mlflow:5000"
    assert _status(server, server.user, server.password) == 200
    again = _job(server)
    assert again.returncode == 0, again.stderr
    assert f"MLflow user {server.user} exists" in again.stdout
    assert _status(server, server.user, server.password) == 200
    # a changed Secret: the rerun sets the new password, the old one stops working
    rotated = _job(server, password=secrets.token_hex(16))
    assert rotated.returncode == 0 and _status(server, server.user, server.password) == 401
    assert _job(server).returncode == 0 and _status(server, server.user, server.password) == 200
    # a wrong admin password: a clear refusal, not a silent success
    (tmp_path / "basic_auth.ini").write_text(_auth_ini(server.auth_uri, "not-the-admin-password"))
    refused = _job(server, config_dir=tmp_path)
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr and "check admin_username/admin_password in basic_auth.ini" in refused.stderr


def test_the_readiness_probe_needs_the_login_and_the_service_host(server, tmp_path):
    container = _container("Deployment")
    probe = container["readinessProbe"]["exec"]["command"]
    assert re.search(r'"Host": "([^"]+)"', probe[-1]).group(1) == f"{server.service}:{server.service_port}"
    env = {**_base_env(server.home), **_env(container, server.secrets, server.mounts), **_dns_env(server)}
    ready = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=60)
    assert ready.returncode == 0, ready.stderr
    (tmp_path / "basic_auth.ini").write_text(_auth_ini(server.auth_uri, "not-the-admin-password"))
    env = {**env, **_env(container, server.secrets, {"/etc/mlflow-auth": tmp_path})}
    refused = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "HTTP Error 401" in refused.stderr


def _refused(argv: list[str], capsys, monkeypatch) -> str:
    """The one error line of ``sslab <argv>``; a check that wrongly passes stops where Ray would start."""
    from orchestrator import train

    def no_ray(*args, **kwargs):
        raise AssertionError("--require-tracking let the run start")

    monkeypatch.setattr(train, "init_ray", no_ray)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_mlflow_host_refused(server, pods_user, cluster_dns, monkeypatch, capsys):
    """docs/errors.md `mlflow-host-refused`: --require-tracking through a name the server does not list."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
    line = _refused(["pretrain", "--require-tracking", "--tracking-uri", f"http://{UNLISTED}:5000"], capsys,
                    monkeypatch)
    assert (f"refused the Host header '{UNLISTED}:5000' (403 Invalid Host header): add {UNLISTED}:5000 to the "
            f"server's --allowed-hosts (or drop --require-tracking") in line
    tracking.require_reachable(f"http://{server.service}:{server.service_port}")  # the Service's name passes


def test_mlflow_login_refused(server, pods_user, cluster_dns, monkeypatch, capsys):
    """docs/errors.md `mlflow-login-refused`: --require-tracking with a password the server does not take."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
    line = _refused(["pretrain", "--require-tracking", "--tracking-uri", "http://sslab-mlflow:5000"], capsys,
                    monkeypatch)
    assert (f"MLflow server http://sslab-mlflow:5000 refused the login of user '{server.user}' (401): set "
            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") in line


def test_mlflow_login_missing(server, pods_user, cluster_dns, monkeypatch, capsys):
    """docs/errors.md `mlflow-login-missing`: --require-tracking without a login, against a server that needs one."""
    line = _refused(["pretrain", "--require-tracking", "--tracking-uri", "http://sslab-mlflow:5000"], capsys,
                    monkeypatch)
    assert "asks for a login (401) and MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD are not set" in line
    with pytest.raises(Exception, match=r"asks for a login \(401\).*\(or drop --require-tracking\)$"):
        tracking.require_reachable("http://sslab-mlflow:5000", train_later=False)  # the sweep's wording
