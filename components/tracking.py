"""MLflow set-up for a step: the tracking URI and the experiment, made when used, and
readable answers when a tracking server refuses us.

Credentials come only from MLflow's own environment variables
(``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``);
medflow never reads, logs or stores them.
"""

from __future__ import annotations

import os

import mlflow
import requests
from mlflow.exceptions import MlflowException

from components import paths
from components.errors import AuthenticationFailed

UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"


def _who() -> str:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    return f"user {user!r}" if user else "this client"


def is_permission_denied(exc: BaseException) -> bool:
    """An MLflow answer of 403: authenticated, but not allowed (the REST API raises MlflowException,
    the artifact proxy a plain ``requests`` HTTPError)."""
    if isinstance(exc, MlflowException):
        return exc.error_code == PERMISSION_DENIED
    response = getattr(exc, "response", None)
    return isinstance(exc, requests.HTTPError) and response is not None and response.status_code == 403


def describe_mlflow_error(exc: Exception, uri: str) -> str:
    """One line for an MLflow failure: authentication and permission refusals say what to set or ask for."""
    if isinstance(exc, requests.HTTPError) and is_permission_denied(exc):
        path = requests.utils.urlparse(exc.response.url).path
        return f"permission denied: MLflow at {uri} does not let {_who()} write {path}"
    if not isinstance(exc, MlflowException):
        return f"MLflow at {uri}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    if exc.error_code == UNAUTHENTICATED:
        if not (os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN")):
            return (f"authentication failed: MLflow at {uri} requires credentials; set MLFLOW_TRACKING_USERNAME "
                    "and MLFLOW_TRACKING_PASSWORD")
        return (f"authentication failed: MLflow at {uri} refused the credentials of {_who()}; check "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if exc.error_code == PERMISSION_DENIED:
        endpoint = str(exc).split("endpoint ", 1)[-1].split(" ", 1)[0] if "endpoint " in str(exc) else "this request"
        return f"permission denied: MLflow at {uri} does not let {_who()} call {endpoint}"
    text = str(exc)
    if "Max retries exceeded" in text or "Connection refused" in text:
        reason = "connection refused" if "Connection refused" in text else "no answer"
        return (f"MLflow at {uri} does not answer ({reason}, after retries); run again once it is back "
                "(an interrupted training resumes from its last checkpoint)")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"MLflow at {uri}: {first}"


def check_tracking_access() -> None:
    """With a tracking server, fail at once when it refuses our credentials (before any work).

    Raises:
        AuthenticationFailed: the server answered 401.
    """
    uri = paths.tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except MlflowException as exc:
        if exc.error_code == UNAUTHENTICATED:
            raise AuthenticationFailed(describe_mlflow_error(exc, uri)) from None
        raise


def use_experiment(name: str) -> str:
    """Point MLflow at the configured tracking store and return the experiment id.

    A new experiment on the embedded store keeps its artifacts under ``.medflow/artifacts``.
    """
    uri = paths.tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (paths.artifact_root() / name).as_uri() if uri.startswith("sqlite:") else None
    return mlflow.create_experiment(name, artifact_location=location)
