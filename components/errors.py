"""The medflow error hierarchy.

Every error a user can cause derives from :class:`MedflowError`; the CLI turns
one into a single readable line and an exit code, never a traceback.
"""

from __future__ import annotations


class MedflowError(Exception):
    """Base class of every error medflow reports to a user."""

    exit_code: int = 1


class ConfigError(MedflowError):
    """A run config that is missing, malformed or names an unknown key or choice."""


class IngestError(MedflowError):
    """A source folder, labels file or image that cannot be ingested."""


class BadInputData(IngestError):
    """Rows or files of an export that cannot be ingested, all listed; no data version is written."""

    exit_code = 2


class DataValidationError(MedflowError):
    """A dataset that failed its expectation suite; training must not start."""

    exit_code = 2


class UnreadableImage(MedflowError):
    """An image of an ingested dataset that cannot be read any more (cut short, corrupt or gone since ingest)."""

    exit_code = 2


class EvaluationError(MedflowError):
    """Predictions or a manifest that cannot be evaluated."""


class RegistryError(MedflowError):
    """A model, version or tracking server that the registry cannot reach or find."""


class PromotionRefused(MedflowError):
    """A challenger that failed at least one promotion gate."""

    exit_code = 3


class AuthenticationFailed(MedflowError):
    """A tracking or orchestration server refused who we are (missing or wrong credentials)."""


class WorkspaceBusy(MedflowError):
    """Another medflow command is writing to this workspace."""

    exit_code = 4


class ServerUnavailable(MedflowError):
    """A server named by the environment does not answer."""


class DistributedTrainingError(MedflowError):
    """torchrun or one of its ranks failed."""


class PlacedStepFailed(MedflowError):
    """A step placed on a work pool did not complete."""


class UiError(MedflowError):
    """A dashboard could not be started."""


class PredictError(MedflowError):
    """A model, source or output folder that ``medflow predict`` cannot use; nothing was written."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (what Kubernetes sends before evicting a pod) stopped the work.

    A ``KeyboardInterrupt``, not a :class:`MedflowError`, so that Prefect records the run as
    crashed, not failed; the CLI prints its message in one line and exits 130.
    """

    exit_code = 130
