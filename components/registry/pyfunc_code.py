"""Model code for MLflow's models-from-code logging; MLflow loads this file, not a pickle."""

from mlflow.models import set_model

from components.registry.model import MedflowModel

set_model(MedflowModel())
