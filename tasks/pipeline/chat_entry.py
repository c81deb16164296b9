"""The file MLflow runs to build the served chat model ("models from code"; nothing is unpickled)."""
import mlflow

from tasks.pipeline.chat import ChatAdapterModel

mlflow.models.set_model(ChatAdapterModel())
