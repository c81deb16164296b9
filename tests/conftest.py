"""Shared fixtures: offline settings, a tiny random Llama, the embedded tokenizer and model."""
from editing.offline import apply

apply()

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from editing.models import embedded_model_dir, prepare_tokenizer
    return prepare_tokenizer(AutoTokenizer.from_pretrained(embedded_model_dir()))


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    model.config.name_or_path = f"tiny-llama-seed{seed}"
    return model


@pytest.fixture()
def tiny_model(tokenizer):
    return make_tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_dir(tokenizer, tmp_path_factory):
    """A tiny Llama and the embedded tokenizer saved as a model directory (loaded by path)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def embedded():
    from editing import load_model
    return load_model()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One ephemeral Prefect API for the whole session, with its own PREFECT_HOME."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    base = tmp_path_factory.mktemp("prefect")
    with temporary_settings({PREFECT_HOME: str(base / "home"),
                             PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        with prefect_test_harness(server_startup_timeout=180):
            yield base


@pytest.fixture(scope="module")
def mlflow_in_home(prefect_api):
    """The Prefect test API, and MLflow in each home (``sqlite:///HOME/mlflow.db``), as
    ``ledit`` has it by default."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield prefect_api
    mp.undo()
