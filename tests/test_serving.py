"""The edited model as an MLflow pyfunc, in process and through `mlflow models serve`."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest

from conftest import make_tiny_llama
from editing import AdapterError, Fact, edit, load_model
from editing.offline import OFFLINE_ENV
from flows.cli.server import stop_process_groups
from flows.cli.steps import generate_with_adapter_set
from tasks.pipeline.serving import AdapterSetModel, log_pyfunc_model
from tasks.settings import load_settings

FACTS = [Fact(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target_new="English"),
         Fact(subject="Toko Yasuda", prompt="Toko Yasuda plays the", target_new="piano")]
PROMPTS = [f.prompt for f in FACTS]


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    config = load_settings().edit.override({"layers": [2], "steps": 4, "batch_size": 8, "baft": {
        "gate_layer": 1, "prefixes": 1, "prefix_tokens": 3, "subject_swaps": 1}})
    model, tok = load_model(tiny_dir, dtype="float32")
    return str(edit(model, tok, FACTS, config, progress=False).save(tmp_path_factory.mktemp("set") / "set"))


def _context(adapter, base):
    from mlflow.pyfunc import PythonModelContext
    return PythonModelContext(artifacts={"adapter_set": adapter}, model_config={"base_model": base})


def test_pyfunc_answers_like_the_adapter_set_in_process(adapter_dir, tiny_dir):
    model = AdapterSetModel()
    model.load_context(_context(adapter_dir, tiny_dir))
    model.handle.remove()                 # lend the model to the reference, then attach again
    ref = (model.model, model.tokenizer)
    expected = generate_with_adapter_set(adapter_dir, PROMPTS, model_and_tokenizer=ref, max_new_tokens=24)
    short = generate_with_adapter_set(adapter_dir, PROMPTS[1:], model_and_tokenizer=ref, max_new_tokens=3)
    model.handle = model.adapter_set.attach(model.model)
    assert model.predict(None, pd.DataFrame({"prompt": PROMPTS})) == expected
    assert model.predict(None, PROMPTS[0]) == expected[:1]
    mixed = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "max_new_tokens": 3}]
    assert model.predict(None, mixed) == expected[:1] + short


def test_a_corrupted_adapter_or_another_base_model_is_refused_at_load(adapter_dir, tiny_dir, tmp_path, tokenizer):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    weights = bad / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum"):
        AdapterSetModel().load_context(_context(str(bad), tiny_dir))

    other = tmp_path / "other-model"
    make_tiny_llama(len(tokenizer), seed=1).save_pretrained(other, safe_serialization=True)
    tokenizer.save_pretrained(other)
    with pytest.raises(AdapterError, match="fingerprint"):
        AdapterSetModel().load_context(_context(adapter_dir, str(other)))


# What ``serving_entry.py`` said before the move to tasks/pipeline/; MLflow copied it into
# every version logged then, and loads it from there.
OLD_ENTRY = """import mlflow

from tasks.serving import AdapterSetModel

mlflow.models.set_model(AdapterSetModel())
"""


def test_a_version_logged_before_the_move_still_loads_and_answers(adapter_dir, tiny_dir, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from tasks.pipeline.serving import pip_requirements, signature

    entry = tmp_path / "serving_entry.py"
    entry.write_text(OLD_ENTRY)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with _use_tracking_uri(uri):
        client = MlflowClient(uri)
        exp = client.create_experiment("old", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            info = mlflow.pyfunc.log_model(
                name="pyfunc", python_model=str(entry), artifacts={"adapter_set": adapter_dir},
                model_config={"base_model": tiny_dir, "dtype": "float32", "max_new_tokens": 24},
                signature=signature(), pip_requirements=pip_requirements())
        client.create_registered_model("old-set")
        mv = client.create_model_version("old-set", source=info.model_uri, run_id=run.info.run_id,
                                         model_id=info.model_id)
        entry.unlink()                    # what loads is the version's own copy
        served = mlflow.pyfunc.load_model(f"models:/old-set/{mv.version}")
    assert isinstance(served.unwrap_python_model(), AdapterSetModel)
    ref = load_model(tiny_dir, dtype="float32")
    expected = generate_with_adapter_set(adapter_dir, PROMPTS, model_and_tokenizer=ref, max_new_tokens=24)
    assert served.predict(pd.DataFrame({"prompt": PROMPTS})) == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["predictions"]


@pytest.mark.integration  # a real SQLite MLflow registry and `mlflow models serve`
def test_registered_production_model_answers_over_rest(adapter_dir, tiny_dir, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    name = "baft-adapter-set"
    with _use_tracking_uri(uri):
        client = MlflowClient(uri)
        exp = client.create_experiment("serving", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            info = log_pyfunc_model(adapter_dir, tiny_dir)
        client.create_registered_model(name)
        mv = client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id,
                                         model_id=info.model_id)
        client.set_registered_model_alias(name, "production", mv.version)

    port = _free_port()
    # `mlflow models serve` execs `uvicorn`: the venv's bin must be on PATH.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, **OFFLINE_ENV, PATH=path, MLFLOW_TRACKING_URI=uri)
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@production",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        url = f"http://127.0.0.1:{port}/invocations"
        ref = load_model(tiny_dir, dtype="float32")
        expected = generate_with_adapter_set(adapter_dir, PROMPTS, model_and_tokenizer=ref, max_new_tokens=24)
        assert _post(url, {"dataframe_records": [{"prompt": p} for p in PROMPTS]}) == expected
        short = generate_with_adapter_set(adapter_dir, PROMPTS, model_and_tokenizer=ref, max_new_tokens=3)
        records = [{"prompt": p, "max_new_tokens": 3} for p in PROMPTS]
        assert _post(url, {"dataframe_records": records}) == short
    finally:
        stop_process_groups([server], 30)
        log.close()


def test_the_served_model_takes_its_share_of_the_cores_from_the_serving_settings(adapter_dir, tiny_dir):
    """serving.threads (logged in the chat model's model_config) sets the server's torch threads;
    model.threads does the same for any process that loads a model; 0 leaves them as they are."""
    import torch
    from mlflow.pyfunc import PythonModelContext

    from editing.config import ConfigError, ModelConfig
    from tasks.pipeline.serving import load_served

    before = torch.get_num_threads()
    try:
        load_served(PythonModelContext(artifacts={"adapter_set": adapter_dir},
                                       model_config={"base_model": tiny_dir, "serving": {"threads": 1}}))
        assert torch.get_num_threads() == 1
        load_model(ModelConfig(str(tiny_dir)))                  # threads 0: left as they are
        assert torch.get_num_threads() == 1
        if before > 1:
            load_model(ModelConfig(str(tiny_dir), threads=before))
            assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads"):
        ModelConfig(threads=-1)
