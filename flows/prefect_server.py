"""Prefect for a command: the embedded server under ``.medflow/prefect`` (shielded from Ctrl-C, stopped so its
folder can go) or the server ``PREFECT_API_URL`` names (checked at once), and one-line task errors."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from components import paths
from components.errors import AuthenticationFailed, MedflowError, ServerUnavailable


def use_embedded_prefect() -> None:
    """Ephemeral Prefect under ``.medflow/prefect`` unless ``PREFECT_API_URL`` names a server.

    Must run before Prefect is imported: Prefect reads its settings then.
    """
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(paths.medflow_home() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    if not os.environ.get("PREFECT_API_URL"):
        shield_embedded_server()


_starting: list[threading.Thread] = []  # start_embedded_server's thread, while this process has one


def start_embedded_server() -> None:
    """Start the embedded server now, on a thread, when this command's flow will use one (after
    :func:`use_embedded_prefect`): its process starts (4 s here on an existing database, 12 on a new one) on
    another core while this one imports torch and MONAI for the preflight, instead of after.
    :func:`wait_embedded_server` waits for it before the flow; Prefect's client then finds it running. A start
    that fails is left to Prefect's client, which starts it again and says why it could not (Prefect has no way
    to start its server without waiting for it)."""
    from prefect.server.api.server import SubprocessASGIServer  # noqa: PLC0415
    from prefect.settings import get_current_settings  # noqa: PLC0415

    if get_current_settings().api.url or _starting:  # a server of its own (a profile's too), or started already
        return
    server = SubprocessASGIServer()

    def start() -> None:
        with contextlib.suppress(Exception):
            server.start()

    thread = threading.Thread(target=start, name="medflow-prefect-server", daemon=True)
    _starting.append(thread)
    thread.start()


@contextlib.contextmanager
def starting_beside():
    """Start the embedded server (:func:`start_embedded_server`) while the block runs, the model's checks that
    import torch and MONAI; a block that raises (a refused command, which starts no flow) stops it again."""
    start_embedded_server()
    try:
        yield
    except BaseException:
        stop_embedded_server()
        raise


def wait_embedded_server() -> None:
    """Wait for :func:`start_embedded_server`'s start to end (the server answering, or the start failed)."""
    for thread in _starting:
        thread.join()


def stop_embedded_server() -> None:
    """Send Prefect's queued logs and events, then stop its embedded server, so that its folder can go
    (Prefect stops it at exit otherwise; a server writing into a removed folder kept the run waiting).
    A server still starting on :func:`start_embedded_server`'s thread is stopped once its process exists, without
    waiting for it to answer."""
    if os.environ.get("PREFECT_API_URL") or "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker  # noqa: PLC0415
    from prefect.logging.handlers import APILogWorker  # noqa: PLC0415
    from prefect.server.api.server import SubprocessASGIServer  # noqa: PLC0415

    server = SubprocessASGIServer()
    for thread in _starting:  # the start launches the process first: moments
        while thread.is_alive() and server.server_process is None:
            thread.join(0.05)
    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)
    server.stop()
    for thread in _starting:  # its wait for the server ends once the process is gone
        thread.join(10)
    _starting.clear()


def shield_embedded_server() -> None:
    """Let Prefect's embedded server outlive a Ctrl-C, so that the interrupted flow run is recorded.

    Ctrl-C reaches every process of the terminal's foreground group, the embedded server's too: it died
    first, the flow run stayed "Running" for good, and Prefect's exit-time drain waited over a minute on
    a server that was gone. Prefect starts the server lazily in its client (one instance for the process,
    :class:`SubprocessASGIServer` with no port); this wraps that instance's launch so the server process
    starts with SIGINT blocked (a blocked signal is inherited, and uvicorn installs handlers but never
    unblocks it). Prefect still stops the server at exit, with SIGTERM. Prefect has no setting for this.
    """
    import signal  # noqa: PLC0415

    from prefect.server.api.server import SubprocessASGIServer  # noqa: PLC0415

    server = SubprocessASGIServer()  # the instance Prefect's clients start (one per port; None: any free port)
    launch = getattr(server, "_run_uvicorn_command", None)
    if launch is None or getattr(launch, "medflow_shielded", False):
        return

    def launch_shielded():
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return launch()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    launch_shielded.medflow_shielded = True
    server._run_uvicorn_command = launch_shielded


def check_prefect_server(timeout_s: float = 10.0) -> None:
    """With ``PREFECT_API_URL`` set, fail at once, in one line, when that server does not answer or refuses us."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        return
    try:
        with urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=timeout_s):
            pass  # urlopen raises HTTPError for any answer but 2xx
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            raise ServerUnavailable(f"the Prefect server at {api} does not answer (HTTP {exc.code}); start it, or "
                                    "unset PREFECT_API_URL to run on the embedded server") from None
    except OSError as exc:
        raise ServerUnavailable(f"the Prefect server at {api} does not answer ({getattr(exc, 'reason', exc)}); start "
                                "it, or unset PREFECT_API_URL to run on the embedded server") from None
    check_prefect_access(api)


def check_prefect_access(api: str) -> None:
    """Fail at once, in one line, when the Prefect server refuses our credentials (its health check is open,
    so this asks for one flow, through Prefect's own client and its PREFECT_API_AUTH_STRING or PREFECT_API_KEY)."""
    import httpx  # noqa: PLC0415
    from prefect.client.orchestration import get_client  # noqa: PLC0415

    try:
        with get_client(sync_client=True) as client:
            client.read_flows(limit=1)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code not in (401, 403):
            raise
        given = os.environ.get("PREFECT_API_AUTH_STRING") or os.environ.get("PREFECT_API_KEY")
        why = "refused the credentials given" if given else "requires credentials"
        raise AuthenticationFailed(f"authentication failed: the Prefect server at {api} {why} (HTTP "
                                   f"{exc.response.status_code}); set PREFECT_API_AUTH_STRING (user:password) or "
                                   "PREFECT_API_KEY") from None


class _UserErrorsWithoutTraceback:
    """Logging filter: Prefect logs a failed task with its traceback; for a
    MedflowError (bad input, failed validation) or an MLflow server's refusal or
    absence the message alone says it all (``--debug`` keeps the tracebacks)."""

    def filter(self, record) -> bool:
        from mlflow.exceptions import MlflowException  # noqa: PLC0415 (imported by the flow already)

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MedflowError | MlflowException | KeyboardInterrupt):
            record.msg, record.args = f"{type(exc).__name__}: {exc}", ()
            record.exc_info = record.exc_text = None
        return True


def hide_user_tracebacks() -> None:
    """Prefect's task and flow loggers print a MedflowError or an MLflow refusal as one line (``--debug``,
    ``MEDFLOW_DEBUG=1``, keeps the tracebacks)."""
    import logging  # noqa: PLC0415

    if os.environ.get("MEDFLOW_DEBUG") != "1":
        for name in ("prefect.task_runs", "prefect.flow_runs"):
            logging.getLogger(name).addFilter(_UserErrorsWithoutTraceback())
