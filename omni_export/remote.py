"""``profile --device ssh://user@host[:port]``: measure on the device itself.

The bundle (or checkpoint), the turn script's directory and this package's own source go to a
fresh temporary directory on the device in one tar stream over ssh; the device runs the same
``profile --device local`` with its Python (which needs torch and the backend's runtime, not
the compile stack); the report comes back and the directory is removed. Only the ``ssh`` client
is used, so keys, agents and ~/.ssh/config work as they do for the user."""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omni_export.errors import OmniExportError


class RemoteError(OmniExportError):
    """The device could not be reached or the run there failed."""


@dataclass(frozen=True)
class SSHTarget:
    host: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


@dataclass(frozen=True)
class SSHOptions:
    identity: Path | None = None
    options: tuple[str, ...] = ()  # ssh -o settings, e.g. "StrictHostKeyChecking=accept-new"
    python: str = "python3"  # the device's interpreter
    timeout_s: float = 3600.0


_URL = re.compile(r"^ssh://(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:]+)(?::(?P<port>\d+))?/?$")


def parse_device(device: str) -> SSHTarget | None:
    """None for ``local``; an SSHTarget for ``ssh://[user@]host[:port]``; anything else is an error."""
    if device == "local":
        return None
    m = _URL.match(device)
    if not m:
        raise RemoteError(f"--device {device!r} is neither 'local' nor ssh://[user@]host[:port]")
    return SSHTarget(m["host"], m["user"], int(m["port"]) if m["port"] else None)


def _ssh(target: SSHTarget, opts: SSHOptions, command: str, stdin: bytes | None = None) -> bytes:
    argv = ["ssh", "-o", "BatchMode=yes"]
    if target.port:
        argv += ["-p", str(target.port)]
    if opts.identity:
        argv += ["-i", str(opts.identity), "-o", "IdentitiesOnly=yes"]
    for o in opts.options:
        argv += ["-o", o]
    argv += [target.destination, command]
    try:
        res = subprocess.run(argv, input=stdin, capture_output=True, timeout=opts.timeout_s)
    except FileNotFoundError:
        raise RemoteError("the ssh client is not installed here (apt-get install openssh-client)") from None
    except subprocess.TimeoutExpired:
        raise RemoteError(f"ssh {target.destination}: {command.split()[0]} did not finish in {opts.timeout_s:.0f} s") from None
    if res.returncode != 0:
        tail = res.stderr.decode(errors="replace").strip()[-2000:]
        raise RemoteError(f"ssh {target.destination} failed (exit {res.returncode}) running `{command[:120]}`:\n{tail}")
    return res.stdout


def _pack(entries: dict[str, Path]) -> bytes:
    """One tar of the package source, the model and the script (bytecode caches left out)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for arc, src in entries.items():
            tar.add(src, arcname=arc, filter=lambda ti: None if "__pycache__" in ti.name else ti)
    return buf.getvalue()


def remote_profile(target: SSHTarget, model: Path, script_dir: Path, script_name: str, runs: int, profile_name: str | None,
                   dtype: str, opts: SSHOptions | None = None, progress: Callable[[str], None] | None = None,
                   torch_device: str = "cpu") -> dict:  # fmt: skip
    import omni_export

    opts = opts or SSHOptions()
    step = progress or (lambda what: None)
    if not model.is_dir():
        raise RemoteError(f"{model} is not a bundle or checkpoint directory")
    step(f"connecting to {target.destination}")
    work = _ssh(target, opts, "mktemp -d /tmp/omni-export-XXXXXX").decode().strip()
    try:
        step(f"copying {model.name} to {target.destination}:{work}")
        payload = _pack({"pkg/omni_export": Path(omni_export.__file__).parent, "model": model, "script": script_dir})
        _ssh(target, opts, f"tar -xf - -C {shlex.quote(work)}", stdin=payload)
        argv = [opts.python, "-m", "omni_export", "profile", f"{work}/model", "--device", "local", "--runs", str(runs),
                "--script", f"{work}/script/{script_name}", "--out", f"{work}/out", "--dtype", dtype, "--torch-device", torch_device, "--quiet"]  # fmt: skip
        if profile_name:
            argv += ["--profile", profile_name]
        step(f"profiling on {target.destination} ({runs} runs after a warm-up)")
        _ssh(target, opts, f"cd {shlex.quote(work)} && PYTHONPATH={shlex.quote(work + '/pkg')} " + shlex.join(argv))
        report = json.loads(_ssh(target, opts, f"cat {shlex.quote(work)}/out/reports/latency.json"))
    finally:
        try:
            _ssh(target, opts, f"rm -rf {shlex.quote(work)}")
        except RemoteError:
            pass  # the device's /tmp is cleaned on reboot; the report matters more
    report["source"] = str(model)
    return report
