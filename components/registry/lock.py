"""A promotion lock that every MLflow backend honours.

MLflow has no compare-and-set for aliases. Creating a registered model is
atomic (its name is unique in the tracking store), so a lock is a registered
model named ``<model>.medflow-lock``: whoever creates it holds the lock, and
deletes it when done. A lock older than ``stale_after_s`` (a crashed holder)
is broken. No library offers a lock over the MLflow API, hence this module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from components.errors import PromotionRefused

LOCK_SUFFIX = ".medflow-lock"
STALE_AFTER_S = 600.0

logger = logging.getLogger("medflow.registry")


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


def _already_exists(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_ALREADY_EXISTS)


def _try_create(client: MlflowClient, name: str, holder: str) -> bool:
    try:
        client.create_registered_model(name, description=f"medflow promotion lock held by {holder}")
        return True
    except MlflowException as exc:
        # RESOURCE_DOES_NOT_EXIST: the name was taken when we inserted and released before the server looked
        # the holder up for its "already exists" answer (seen with 20 racers on SQLite): a lost race all the same
        if _already_exists(exc) or exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False
        raise


def _break_stale(client: MlflowClient, name: str, holder: str) -> bool:
    """Delete a lock left by a crashed holder and take it; False if someone else was quicker."""
    try:
        client.delete_registered_model(name)
    except MlflowException:
        pass
    return _try_create(client, name, holder)


@contextmanager
def promotion_lock(
    client: MlflowClient, model_name: str, *, holder: str, stale_after_s: float = STALE_AFTER_S
) -> Iterator[None]:
    """Hold the model's promotion lock for the ``with`` block, or refuse at once.

    Raises:
        PromotionRefused: another promotion or rollback of the model holds the lock.
    """
    name = lock_name(model_name)
    if not _try_create(client, name, holder):
        description, age = "", 0.0
        try:
            held = client.get_registered_model(name)
            description, age = held.description or "", time.time() - held.creation_timestamp / 1000
        except MlflowException:
            pass  # released in between: still refuse, the caller may try again
        if not (age > stale_after_s and _break_stale(client, name, holder)):
            raise PromotionRefused(
                f"another promotion of {model_name} is in progress ({description or 'lock just released'}); "
                "no alias was changed"
            )
    try:
        yield
    finally:
        try:
            client.delete_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            # Seen once with 8 racers on PostgreSQL: the lock was already gone at release. The decision was
            # made under it and the alias move re-checks the champion, so the release only logs it.
            logger.warning("promotion lock %s was already released when %s let it go", name, holder)
