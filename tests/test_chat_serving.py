"""The edited model as an MLflow chat model: in process, batched, and through `mlflow models serve`."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from mlflow.types.llm import ChatMessage, ChatParams

from editing import load_model
from editing.offline import OFFLINE_ENV
from tasks.pipeline.chat import ChatAdapterModel, log_chat_model
from tasks.settings import ServingSettings
from flows.cli.server import stop_process_groups
from test_serving import FACTS, _free_port, adapter_dir  # noqa: F401 -- a fixture

UNRELATED = "What colour is the sky on a clear day?"
SERVING = {"max_input_tokens": 96, "max_tokens": 32, "default_max_tokens": 8, "max_batch": 3,
           "batch_wait_ms": 5}


def _user(text):
    return [ChatMessage(role="user", content=text)]


def _greedy(max_tokens, **kw):
    """MLflow's ChatParams fills an absent temperature with 1.0 (OpenAI's default): 0 is greedy."""
    return ChatParams(max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def chat(adapter_dir, tiny_dir):  # noqa: F811
    from mlflow.pyfunc import PythonModelContext
    model = ChatAdapterModel()
    model.load_context(PythonModelContext(artifacts={"adapter_set": adapter_dir}, model_config={
        "base_model": tiny_dir, "adapter_version": "v7", "fired_weight": 0.5, "serving": SERVING}))
    return model


def test_a_chat_answer_names_the_facts_that_fired_and_the_version(chat):
    edited = chat.predict(None, _user(FACTS[0].prompt), _greedy(6)).to_dict()
    assert edited["custom_outputs"] == {"fired_facts": [chat.adapter_set.blocks[0].fact_ids[0]],
                                        "adapter_version": "v7"}
    assert edited["choices"][0]["message"]["role"] == "assistant"
    assert edited["usage"]["completion_tokens"] <= 6
    plain = chat.predict(None, _user(UNRELATED), _greedy(6)).to_dict()
    assert plain["custom_outputs"]["fired_facts"] == []


def test_stop_strings_cut_the_text_and_sampling_is_honoured(chat):
    full = chat.predict(None, _user(FACTS[1].prompt), _greedy(12)).to_dict()
    text = full["choices"][0]["message"]["content"]
    assert len(text) > 2
    stop = text[2:4]
    cut = chat.predict(None, _user(FACTS[1].prompt), _greedy(12, stop=[stop])).to_dict()
    assert cut["choices"][0]["message"]["content"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    sampled = {chat.predict(None, _user(UNRELATED), ChatParams(max_tokens=8, temperature=5.0, top_p=1.0))
               .choices[0].message.content for _ in range(4)}
    assert len(sampled) > 1               # a hot temperature on a random tiny model: answers differ


def test_a_batched_answer_equals_the_same_request_answered_alone(chat):
    asks = [(FACTS[0].prompt, 10), (UNRELATED + " Please answer in one long sentence.", 4),
            (FACTS[1].prompt, 7)]
    alone = [chat.predict(None, _user(p), _greedy(n)).to_dict() for p, n in asks]
    sizes = len(chat.batcher.sizes)
    together = [None] * len(asks)

    def ask(i):
        together[i] = chat.predict(None, _user(asks[i][0]), _greedy(asks[i][1])).to_dict()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    chat.batcher.wait_s = 60.0            # the batch closes when all three (max_batch) are in
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        chat.batcher.wait_s = SERVING["batch_wait_ms"] / 1000
    assert chat.batcher.sizes[sizes:] == [3]          # one left-padded batch of all three
    for a, b in zip(alone, together):
        assert (a["choices"], a["custom_outputs"]) == (b["choices"], b["custom_outputs"])


def test_serving_settings_are_checked():
    from editing.config import ConfigError
    with pytest.raises(ConfigError, match="serving.max_batch"):
        ServingSettings.from_dict({"max_batch": 0})
    with pytest.raises(ConfigError, match="default_max_tokens"):
        ServingSettings.from_dict({"max_tokens": 4, "default_max_tokens": 8})


def _call(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _serve(uri, model_uri, tmp_path):
    port = _free_port()
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, **OFFLINE_ENV, PATH=path, MLFLOW_TRACKING_URI=uri)
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return server, log, f"http://127.0.0.1:{port}/invocations"
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process_groups([server], 30)
            pytest.fail((tmp_path / "serve.log").read_text()[-3000:])
        time.sleep(1)


def _check_bad_requests(url, chat_model):
    long = " ".join(["word"] * 200)
    cases = {"'messages' must be a non-empty list": {"messages": []},
             "role must be one of": {"messages": [{"role": "wizard", "content": "hi"}]},
             "max_tokens": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
             "serving.max_input_tokens": {"messages": [{"role": "user", "content": long}]}}
    for message, payload in cases.items():
        status, body = _call(url, payload)
        assert 400 <= status < 500, (payload, status, body)
        assert message in body["message"], (payload, body)


@pytest.mark.integration  # a real SQLite MLflow registry, `mlflow models serve`, and a trace
def test_production_chat_model_over_rest_with_fired_facts_errors_and_trace(adapter_dir, tiny_dir,  # noqa: F811
                                                                           tmp_path, chat):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    uri, name = f"sqlite:///{tmp_path}/mlflow.db", "baft-adapter-set"
    with _use_tracking_uri(uri):
        client = MlflowClient(uri)
        exp = client.create_experiment("serving", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            info = log_chat_model(adapter_dir, tiny_dir, adapter_version="v7", trace_experiment="serving",
                                  serving=ServingSettings.from_dict(dict(SERVING, trace=True)))
        client.create_registered_model(name)
        mv = client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id,
                                         model_id=info.model_id)
        client.set_registered_model_alias(name, "production", mv.version)
    server, log, url = _serve(uri, f"models:/{name}@production", tmp_path)
    try:
        messages = [{"role": "user", "content": FACTS[0].prompt}]
        status, body = _call(url, {"messages": messages, "max_tokens": 6, "temperature": 0})
        expected = chat.predict(None, _user(FACTS[0].prompt), _greedy(6)).to_dict()
        assert status == 200, body
        assert body["choices"] == expected["choices"]
        assert body["custom_outputs"] == {"fired_facts": [chat.adapter_set.blocks[0].fact_ids[0]],
                                          "adapter_version": "v7"}
        _check_bad_requests(url, chat)
        traces = []
        for _ in range(60):               # the trace may be exported after the response
            traces = client.search_traces(locations=[exp])
            if traces:
                break
            time.sleep(1)
        spans = [s for t in traces for s in t.data.spans if s.name == "baft_chat"]
        assert [s.attributes["ledit.fired_facts"] for s in spans] == [body["custom_outputs"]["fired_facts"]]
        assert spans[0].attributes["ledit.adapter_version"] == "v7"
    finally:
        stop_process_groups([server], 30)
        log.close()
