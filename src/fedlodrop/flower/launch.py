"""Flower's processes for `fedlodrop flower ...` and the tests: the app folder, SuperLink and
SuperNode command lines, connections, submitting a run and waiting for it, certificates and keys,
and stopping every process a workspace started.

Nothing here imports Flower: the commands run Flower's own executables (`flower-superlink`,
`flower-supernode`, `flwr`) from this interpreter's environment, with an environment that
(a) never lets Flower install app dependencies at run time, send telemetry or check for updates,
(b) finds those executables (SuperExec starts `flwr-serverapp`, `flwr-simulation` and
`flwr-clientapp` by name), and (c) imports this very copy of fedlodrop in every Flower process.

Process tree of flwr 1.42 (`--isolation subprocess`):
    flower-superlink --(own session)-- flower-superexec -- flwr-serverapp | flwr-simulation (+ Ray)
    flower-supernode ------------------ flower-superexec -- flwr-clientapp (one per message)
Every process we start gets its own session; `Workspace.stop_all` signals those groups and then
kills, by PID, any process left whose command line names the workspace or whose environment
holds its FLWR_HOME (the SuperLink's SuperExec and Ray leave its group).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fedlodrop
from fedlodrop import __version__
from fedlodrop.errors import UserError

VENV_BIN = Path(sys.executable).parent
APP_NAME = "fedlodrop-app"  # letters, digits, hyphens: what `flwr build` accepts
SIM_CONNECTION = "fedlodrop-sim"
CONNECTION = "fedlodrop"

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never `uv sync` an app's dependencies
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class FlowerError(Exception):
    """A Flower process or command did not do what it should (not the user's input)."""


def source_root() -> Path | None:
    """The folder fedlodrop is imported from, when that is not site-packages (a checkout)."""

    root = Path(fedlodrop.__file__).resolve().parents[1]
    return None if root.name in ("site-packages", "dist-packages") else root


def flower_env(flwr_home: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's processes (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    root = source_root()
    if root is not None:
        rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != root]
        env["PYTHONPATH"] = os.pathsep.join([str(root), *rest])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def write_app(folder: Path) -> Path:
    """The Flower app folder: one pyproject.toml naming the installed fedlodrop.flower.app."""

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f'''[project]
name = "{APP_NAME}"
version = "{__version__}"
description = "fedlodrop on Flower: the code is the installed fedlodrop package (fedlodrop.flower.app)"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "fedlodrop"

[tool.flwr.app.components]
serverapp = "fedlodrop.flower.app:server_app"
clientapp = "fedlodrop.flower.app:client_app"

[tool.flwr.app.config]
config-json = ""
run-dir = ""
force = false
resume = false
''')
    return folder


def free_port(host: str = "127.0.0.1") -> int:
    """A port to listen on, chosen below the kernel's ephemeral range: a port the kernel hands out
    for bind(0) may be taken by some outgoing connection's local end before the server binds it
    (seen on a loaded machine: a SuperNode's Runtime API failed with 'address already in use')."""
    low = _ephemeral_low()
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: let the kernel choose
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    """The bottom of the range outgoing connections take their local ports from (Linux; else IANA's)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 49152
    return max(low, 10001)


# ---------------------------------------------------------------------------- command lines


def superlink_command(
    host: str, port: int, certs: Path | None = None, simulation: bool = False, database: Path | None = None
) -> list[str]:
    """flower-superlink serving Fleet, Control and Runtime APIs on host:port; with `certs` (a
    folder from `certificates`) over TLS and accepting only registered SuperNodes."""
    cmd = [str(VENV_BIN / "flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]
    if simulation:
        cmd.append("--simulation")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def check_port_free(host: str, port: int) -> None:
    """One line instead of Flower's traceback when a SuperNode's Runtime API port is taken (a
    second SuperNode on the same machine without its own --port)."""

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(f"--port {port} on {host} is in use ({err.strerror or err}): another SuperNode on this "
                            "machine? give each its own --port") from None


def _toml_string(text: str) -> str:
    """`text` as a TOML string Flower's node-config parser keeps whole: it takes '...' or "..."
    without escapes inside, so a literal '...' string, else a basic "..." one."""

    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return json.dumps(text)
    raise UserError(f"--data {text}: Flower's node config cannot carry a path with both ' and \"; rename it")


def supernode_command(
    superlink: str, device: int, devices: int, port: int, ca: Path | None, key: Path | None,
    host: str = "127.0.0.1", max_retries: int | None = None, heartbeat_s: float | None = None,
    data: Path | None = None,
) -> list[str]:
    """flower-supernode for device `device` of `devices`, its Runtime API on host:port;
    `max_retries`: give up after that many failed connection attempts (None: never);
    `heartbeat_s`: its heartbeat interval (None: Flower's 30 s; see flower/supernode.py);
    `data`: the device's own training file, in its node config (federation.partition local)."""
    if heartbeat_s is None:
        cmd = [str(VENV_BIN / "flower-supernode")]
    else:
        cmd = [sys.executable, "-m", "fedlodrop.flower.supernode", repr(float(heartbeat_s))]
    node_config = f"partition-id={device} num-partitions={devices}"
    if data is not None:
        node_config += f" data={_toml_string(str(data))}"
    cmd += ["--superlink", superlink, "--host", host, "--port", str(port), "--node-config", node_config]
    cmd += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(key)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


# ---------------------------------------------------------------------------- workspace


@dataclass
class Proc:
    """A process a workspace started: its name, its Popen, and the log file its output goes to."""
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        """The process id (the leader of its own session: stopping it signals the whole group)."""
        return self.popen.pid


@dataclass
class Workspace:
    """A folder with its own FLWR_HOME; the processes started from it, and how to stop them."""

    dir: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    @classmethod
    def create(cls, base: Path | None = None) -> Workspace:
        """A fresh workspace in a new temporary folder (under `base`), with its own FLWR_HOME."""
        d = Path(tempfile.mkdtemp(prefix="fedlodrop-flower-", dir=base)).resolve()
        (d / "flwr-home").mkdir()
        return cls(d, flower_env(d / "flwr-home"))

    @property
    def flwr_home(self) -> Path:
        """The FLWR_HOME of every Flower process this workspace starts."""
        return self.dir / "flwr-home"

    def flwr(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """A `flwr` CLI command with this workspace's FLWR_HOME."""
        cmd = [str(VENV_BIN / "flwr"), *args]
        res = subprocess.run(cmd, env=self.env, cwd=self.dir, capture_output=True, text=True, timeout=timeout,
                             check=False)
        if check and res.returncode != 0:
            raise FlowerError(f"`flwr {' '.join(args[:2])}` failed: {_last_line(res.stdout + res.stderr)}")
        return res

    def flwr_json(self, *args: str, timeout: float = 300) -> dict:
        """A `flwr ... --format json` command's answer; FlowerError with Flower's message if it
        failed (it exits 0 and says `"success": false`)."""
        res = self.flwr(*args, "--format", "json", timeout=timeout, check=False)
        try:
            answer = _json_in(res.stdout)
        except ValueError:
            raise FlowerError(f"`flwr {args[0]}` failed: {_last_line(res.stdout + res.stderr)}") from None
        if answer.get("success") is False or res.returncode != 0:
            text = " ".join(ln.strip() for ln in str(answer.get("error-message", "")).splitlines() if ln.strip())
            raise FlowerError(f"`flwr {args[0]}` failed: {text[:400] or _last_line(res.stdout + res.stderr)}")
        return answer

    def spawn(self, name: str, cmd: list[str], cwd: Path | None = None) -> Proc:
        """Start `cmd` in its own session with the workspace's environment, its output appended to <name>.log."""
        log = self.dir / f"{name}.log"
        with open(log, "ab") as fh:
            popen = subprocess.Popen(cmd, env=self.env, cwd=cwd or self.dir, stdout=fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def add_connection(self, name: str, address: str, ca: Path | None = None) -> None:
        """A SuperLink connection in this FLWR_HOME's config.toml (`flwr` commands take its name)."""
        path = self.flwr_home / "config.toml"
        text = path.read_text() if path.exists() else f'[superlink]\ndefault = "{name}"\n'
        text += f'\n[superlink.{name}]\naddress = "{address}"\n'
        text += f'root-certificates = "{Path(ca).resolve()}"\n' if ca else "insecure = true\n"
        path.write_text(text)

    # ------------------------------------------------------------------ runs
    def submit(self, conn: str, app: Path, run_config: dict[str, Any],
               federation_config: dict[str, Any] | None = None) -> int:
        """`flwr run` -> the run id (it returns once the SuperLink has queued the run)."""
        import tomli_w

        rc = self.dir / f"run-config-{time.time_ns()}.toml"
        rc.write_text(tomli_w.dumps(run_config))
        args = ["run", str(app), conn, "--run-config", str(rc)]
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={_toml(v)}" for k, v in federation_config.items())]
        answer = self.flwr_json(*args)
        try:
            return int(answer["run-id"])
        except (KeyError, TypeError, ValueError):
            raise FlowerError(f"`flwr run` returned no run id: {answer}") from None

    def run_status(self, conn: str, run_id: int) -> dict:
        """Flower's `flwr ls` entry of run `run_id` on connection `conn`."""
        return self.flwr_json("ls", conn, "--run-id", str(run_id))["runs"][0]

    def wait_run(self, conn: str, run_id: int, poll_s: float = 2.0, max_poll_s: float = 8.0,
                 tick: Callable[[], bool] | None = None) -> dict:
        """Until `flwr ls` says the run finished (`flwr run --stream` exits 0 even when a run
        fails). Each `flwr ls` is a new Python process (about 1.5 s of CPU), so the interval grows
        from `poll_s` to `max_poll_s`; `tick()` runs every 0.25 s in between and, when it returns
        True (the run folder says the run ended), the status is asked at once."""
        last, interval = 0.0, poll_s
        while True:
            if time.monotonic() - last >= interval:
                status = self.run_status(conn, run_id)
                if str(status["status"]).startswith("finished"):
                    return status
                last, interval = time.monotonic(), min(interval * 1.5, max_poll_s)
            for proc in self.procs:
                if proc.name == "superlink" and proc.popen.poll() is not None:
                    raise FlowerError(f"the SuperLink exited with code {proc.popen.returncode}")
            time.sleep(0.25)
            if tick is not None and tick():
                last = 0.0

    def run_log(self, conn: str, run_id: int) -> str:
        """What `flwr log` has for run `run_id` (printed when a run fails)."""
        res = self.flwr("log", str(run_id), conn, "--show", check=False, timeout=60)
        return res.stdout + res.stderr

    # ------------------------------------------------------------------ stopping
    def leftovers(self) -> dict[int, str]:
        """Live processes of this workspace (their environment holds its FLWR_HOME)."""
        return processes_of(str(self.dir))

    def stop_all(self, grace: float = 10.0) -> dict[int, str]:
        """SIGTERM each process group we started, give them `grace` s, then SIGKILL whatever of
        ours is left (by PID). Returns what is still alive (nothing, normally)."""
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        while time.monotonic() < deadline and self.leftovers():
            time.sleep(0.2)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=5)
        end = time.monotonic() + 5
        while time.monotonic() < end and self.leftovers():
            time.sleep(0.2)
        return self.leftovers()

    def close(self) -> dict[int, str]:
        """Stop everything, then remove the folder (kept if something could not be stopped)."""
        left = self.stop_all()
        if not left:
            shutil.rmtree(self.dir, ignore_errors=True)
        return left


def processes_of(marker: str) -> dict[int, str]:
    """Live processes (not this one) whose command line or environment contains `marker`, and
    their descendants (Ray renames its processes, which can hide both): pid -> command line."""
    me, needle = os.getpid(), marker.encode()
    procs: dict[int, tuple[int, str, bool]] = {}  # pid -> (ppid, command, marked)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes()
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z":
            text = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
            procs[int(d.name)] = (int(stat[1]), text, needle in cmd or needle in env)
    ours = {pid for pid, (_, _, marked) in procs.items() if marked}
    while True:
        new = {pid for pid, (ppid, _, _) in procs.items() if ppid in ours and pid not in ours}
        if not new:
            break
        ours |= new
    return {pid: procs[pid][1] for pid in sorted(ours)}


def wait_http(address: str, ca: Path | None = None, timeout: float = 60.0, proc: Proc | None = None) -> None:
    """Until GET /health answers on a SuperLink's (or SuperNode's) HTTP API."""
    import ssl

    import httpx

    url = f"{'https' if ca else 'http'}://{address}/health"
    verify: Any = ssl.create_default_context(cafile=str(ca)) if ca else False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise FlowerError(f"{proc.name} exited with code {proc.popen.returncode}: {_last_line(proc.log.read_text())}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, verify=verify, timeout=1.0).is_success:
                return
        time.sleep(0.2)
    raise FlowerError(f"{url} did not answer within {timeout:g} s")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _json_in(text: str) -> dict:
    """The JSON object in a `flwr ... --format json` output (a banner line may come first)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in the output")
    return json.loads(text[start:])


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


# ---------------------------------------------------------------------------- certificates and keys


def make_certificates(out: Path, hosts: list[str], days: int = 365) -> list[Path]:
    """A CA and a server certificate for `hosts` (IPs or DNS names the SuperNodes dial):
    ca.crt, ca.key, server.pem, server.key (EC P-256), as Flower's TLS flags expect them."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlodrop Flower CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem, pkcs8, none = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    files = {
        "ca.crt": ca.public_bytes(pem),
        "ca.key": ca_key.private_bytes(pem, pkcs8, none),
        "server.pem": cert.public_bytes(pem),
        "server.key": key.private_bytes(pem, pkcs8, none),
    }
    return _write_new(out, files, private={"ca.key", "server.key"})


def make_node_keys(out: Path, devices: int) -> list[Path]:
    """One key pair per device for SuperNode authentication: deviceK_key (OpenSSH private, EC
    P-384, for `flower-supernode --auth-supernode-private-key`) and deviceK_key.pub (OpenSSH public,
    for `flwr supernode register`), like `ssh-keygen -t ecdsa -b 384`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    files, private = {}, set()
    for k in range(devices):
        key = ec.generate_private_key(ec.SECP384R1())
        files[f"device{k}_key"] = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        files[f"device{k}_key.pub"] = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ) + b"\n"
        private.add(f"device{k}_key")
    return _write_new(out, files, private)


def _write_new(out: Path, files: dict[str, bytes], private: set[str]) -> list[Path]:
    """Write all the files or none: refuse if any exists already."""

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    clash = [name for name in files if (out / name).exists()]
    if clash:
        raise UserError(f"{out / clash[0]} already exists; choose another --out or remove the old files")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if name in private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        paths.append(path)
    return paths
