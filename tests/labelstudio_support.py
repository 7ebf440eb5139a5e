"""A real Label Studio server for the tests, installed and started offline.

Label Studio lives in its own virtual environment outside the repository
(``~/.cache/dinoprop/labelstudio-<version>``, or ``$DINOPROP_CACHE``),
installed once from PyPI (about a minute and 1 GB). Its first start
migrates an empty database (half a minute or more); that migrated data
directory is cached beside the environment, so later sessions start from a
copy in a few seconds. The server listens on 127.0.0.1 only, keeps its data
under the test session's directory, sends no analytics, Sentry reports or
version checks, and has one user with a legacy API token.
"""

import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

VERSION = "1.23.2"
CACHE = Path(os.environ.get("DINOPROP_CACHE", Path.home() / ".cache" / "dinoprop"))
VENV = CACHE / ("labelstudio-" + VERSION)
DATA_TEMPLATE = CACHE / ("labelstudio-%s-data" % VERSION)
INSTALLED = VENV / ".dinoprop-installed"

EMAIL = "reviewer@dinoprop.test"
PASSWORD = "dinoprop-review"
TOKEN = "d1n0pr0p" * 5  # a legacy API token (40 characters)

#: Variables Label Studio reads without a prefix, and those that would put
#: the tests' packages (another label-studio-sdk) on its path: never inherit.
SCRUBBED = (
    "HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN",
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
)

_START_TIMEOUT = 300  # seconds; a first start on a busy 2-core machine is slow


def install():
    """The Label Studio environment's Python; installs it on first use.

    Skips the calling test, loudly, when Label Studio cannot be installed.
    """
    from filelock import FileLock

    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE / "labelstudio.lock")):
        if not INSTALLED.exists():
            _install()
    return str(VENV / "bin" / "python")


def _install():
    staging = VENV.with_name(VENV.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(VENV, ignore_errors=True)
    steps = {
        "python -m venv": [sys.executable, "-m", "venv", str(staging)],
        "pip install label-studio==" + VERSION: [
            str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet",
            "label-studio==" + VERSION,
        ],
    }
    for name, step in steps.items():
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            reason = (
                "Label Studio %s could not be installed (`%s` failed): the Label "
                "Studio round-trip tests did NOT run.\n%s"
                % (VERSION, name, done.stderr[-2000:])
            )
            warnings.warn(reason)
            pytest.skip(reason)
    staging.rename(VENV)  # the environment runs as `python -m`, so it may move
    INSTALLED.touch()


class LabelStudioServer:
    """A Label Studio process on 127.0.0.1, stopped by :meth:`stop`.

    Attributes:
        url: its address
        api_key: the user's legacy API token
    """

    def __init__(self, python, data_dir, port):
        self.url = "http://127.0.0.1:%d" % port
        self.api_key = TOKEN
        self.data_dir = Path(data_dir)
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
            LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
            COLLECT_ANALYTICS="false",
            LATEST_VERSION_CHECK="false",
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
            DJANGO_DB="sqlite",
        )
        self.log = open(self.data_dir.parent / "labelstudio.log", "wb")
        self.process = subprocess.Popen(
            [
                python, "-m", "label_studio.server", "start",
                "--data-dir", str(self.data_dir),
                "--internal-host", "127.0.0.1", "--port", str(port),
                "--no-browser",
                "--username", EMAIL, "--password", PASSWORD, "--user-token", TOKEN,
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout=_START_TIMEOUT):
        """Waits until ``/health`` answers on the chosen port and the token
        works (Label Studio moves to another port silently when its port is
        taken, so only this port counts)."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("Label Studio exited: see %s" % self.log.name)
            try:
                health = requests.get(self.url + "/health", timeout=2)
                user = requests.get(
                    self.url + "/api/current-user/whoami",
                    headers={"Authorization": "Token " + self.api_key},
                    timeout=5,
                )
                if health.ok and user.ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError("Label Studio did not start in %d s: see %s" % (timeout, self.log.name))

    def stop(self):
        """Stops the server (its process, by PID) and waits for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def start(python, workdir, port):
    """Starts a server with its data under ``workdir``; returns it ready.

    The data directory is a copy of the cached migrated one when there is
    one; after a first start from nothing, the stopped server's data
    becomes that cache.
    """
    from filelock import FileLock

    data_dir = Path(workdir) / "labelstudio-data"
    with FileLock(str(CACHE / "labelstudio.lock")):  # one migration at a time
        if not DATA_TEMPLATE.exists():
            _migrate(python, data_dir, port)
    if not data_dir.exists():
        shutil.copytree(DATA_TEMPLATE, data_dir)
    server = LabelStudioServer(python, data_dir, port)
    try:
        server.wait_ready()
    except Exception:
        server.stop()
        raise
    return server


def _migrate(python, data_dir, port):
    """A first start from nothing; its stopped data becomes the template."""
    server = LabelStudioServer(python, data_dir, port)
    try:
        server.wait_ready()
    finally:
        server.stop()
    staging = DATA_TEMPLATE.with_name(DATA_TEMPLATE.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(data_dir, staging)
    staging.rename(DATA_TEMPLATE)
