"""The file MLflow runs to build the served model ("models from code"; nothing is unpickled)."""
import mlflow

from tasks.pipeline.serving import AdapterSetModel

mlflow.models.set_model(AdapterSetModel())
