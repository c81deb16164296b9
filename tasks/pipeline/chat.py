"""The edited model as an MLflow chat model: ``mlflow models serve -m
models:/baft-adapter-set@production`` answers OpenAI-style chat requests
(``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``).

It is MLflow's ``ChatModel`` (deprecated since MLflow 3.0 in favour of ``ResponsesAgent``,
which takes the Responses API's ``input`` rather than chat completions' ``messages``).
A ChatModel's signature is MLflow's fixed chat schema, so it cannot also take the
``{"prompt": ...}`` rows of ``serving.AdapterSetModel``: that model is logged alongside in
the same run (``pyfunc``), and this one (``chat``) is the registry version's source.

Prompts go through the base model's own chat template. Each response's ``custom_outputs``
names the facts that fired (editing/provenance.py ``fired_facts``: ``ledit why``'s rule on the
prompt and the answer, at ``audit.fired_weight``, one pass per batch) and the adapter version that answered. Concurrent requests are
generated together (``batching.MicroBatcher``). With ``serving.trace`` each request is an
MLflow trace carrying the same. The settings travel in the logged ``model_config``.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage, TokenUsageStats

from editing.provenance import fired_facts
from tasks.pipeline.batching import Job, MicroBatcher
from tasks.pipeline.serving import load_served, pip_requirements

CHAT_ENTRY = Path(__file__).with_name("chat_entry.py")
ROLES = ("system", "user", "assistant")


def bad_request(message: str) -> MlflowException:
    """Raised from ``predict``: the scoring server answers it with 400 and the message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class ChatAdapterModel(mlflow.pyfunc.ChatModel):
    """Chat completions by the base model with the adapter set attached."""

    def load_context(self, context):
        from editing.config import AuditConfig
        from tasks.settings import ServingSettings

        config = context.model_config or {}
        self.adapter_set, self.model, self.tokenizer = load_served(context)
        self.adapter_set.attach(self.model).remove()       # refuses another base model now, not per request
        self.version = str(config.get("adapter_version") or "unregistered")
        self.fired_weight = float(config.get("fired_weight", AuditConfig.fired_weight))
        self.serving = ServingSettings.from_dict(config.get("serving") or {})
        # MLflow loads (and tries) the model while logging it, inside the logging run: only a
        # process serving it, outside any run, traces, and only there is the experiment set
        self.trace = self.serving.trace and mlflow.active_run() is None
        if self.trace and config.get("trace_experiment"):
            mlflow.set_experiment(config["trace_experiment"])
        self.batcher = MicroBatcher(self._generate, self.serving.max_batch, self.serving.batch_wait_ms / 1000)

    def predict(self, context, messages: list[ChatMessage], params) -> ChatCompletionResponse:
        job = self._job(messages, params)
        if not self.trace:
            return self._respond(self.batcher.submit(job))
        with mlflow.start_span(name="baft_chat", span_type="CHAT_MODEL") as span:
            span.set_inputs({"messages": [m.to_dict() for m in messages], "max_tokens": job.max_tokens,
                             "temperature": job.temperature, "top_p": job.top_p, "stop": list(job.stop)})
            out = self.batcher.submit(job)
            span.set_attributes({"ledit.adapter_version": self.version, "ledit.fired_facts": out["fired"]})
            response = self._respond(out)
            span.set_outputs(response.to_dict())
            return response

    def _job(self, messages, params) -> Job:
        """The request checked (400 with a clear message) and rendered through the chat template."""
        if not messages:
            raise bad_request("'messages' must be a non-empty list of chat messages")
        for i, m in enumerate(messages):
            if m.role not in ROLES:
                raise bad_request(f"messages[{i}].role must be one of {list(ROLES)}, got {m.role!r}")
            if not isinstance(m.content, str):
                raise bad_request(f"messages[{i}].content must be a string")
        if (params.n or 1) != 1:
            raise bad_request(f"only n=1 is served, got n={params.n}")
        max_tokens = _number(params.max_tokens, "max_tokens", int, self.serving.default_max_tokens)
        if not 1 <= max_tokens <= self.serving.max_tokens:
            raise bad_request(f"max_tokens must be between 1 and {self.serving.max_tokens}, got {max_tokens}")
        temperature = _number(params.temperature, "temperature", float, 0.0)
        top_p = _number(params.top_p, "top_p", float, 1.0)
        if temperature < 0 or not 0 < top_p <= 1:
            raise bad_request(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
        ids = self.tokenizer(self._render(messages))["input_ids"]
        if len(ids) > self.serving.max_input_tokens:
            raise bad_request(f"the input is {len(ids)} tokens long, more than the "
                              f"{self.serving.max_input_tokens} served (serving.max_input_tokens)")
        return Job(ids, max_tokens, temperature, top_p, stop=tuple(s for s in stop if s))

    def _render(self, messages) -> str:
        """The base model's own chat template, assistant turn opened; its BOS dropped where
        the tokenizer adds one (as editing/metrics.py ``chat_prompts``)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("the base model's tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                  tokenize=False, add_generation_prompt=True)
        bos = getattr(self.tokenizer, "bos_token", None)
        adds_bos = bos is not None and self.tokenizer("")["input_ids"][:1] == [self.tokenizer.bos_token_id]
        return text[len(bos):] if adds_bos and text.startswith(bos) else text

    def _generate(self, jobs: list[Job]) -> list[dict]:
        """On the batcher's thread: one left-padded generate for jobs of one sampling setting."""
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(j.prompt_ids) for j in jobs)
        device = next(self.model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=device)
        temperature, top_p = jobs[0].sampling
        sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                    if temperature > 0 else {"do_sample": False})
        with torch.no_grad(), self.adapter_set.attach(self.model):
            gen = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                                      max_new_tokens=max(j.max_tokens for j in jobs), **sampling)
        answers = [self._finish(j, row[width:][:j.max_tokens]) for j, row in zip(jobs, gen.tolist())]
        # ``ledit why``'s rule on each prompt and the answer as given, all in one pass
        fired = fired_facts(self.model, self.adapter_set, [a.pop("ids") for a in answers], self.fired_weight)
        return [dict(a, fired=f) for a, f in zip(answers, fired)]

    def _finish(self, job: Job, new_ids: list[int]) -> dict:
        """The answer cut at EOS and at the first stop string, with the token ids as given."""
        eos = self.model.generation_config.eos_token_id
        ends = (set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}) - {None}
        cut = next((i for i, t in enumerate(new_ids) if t in ends), None)
        reason = "stop" if cut is not None else "length"
        answer_ids = new_ids[:cut]
        text = self.tokenizer.decode(answer_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if hits:
            text, reason = text[:min(hits)], "stop"
            answer_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"text": text, "reason": reason, "ids": job.prompt_ids + answer_ids,
                "usage": (len(job.prompt_ids), len(new_ids[:cut]))}

    def _respond(self, out: dict) -> ChatCompletionResponse:
        prompt_tokens, completion_tokens = out["usage"]
        return ChatCompletionResponse(
            choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=out["text"]),
                                finish_reason=out["reason"])],
            usage=TokenUsageStats(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=prompt_tokens + completion_tokens),
            model=f"baft-adapter-set/{self.version}",
            custom_outputs={"fired_facts": out["fired"], "adapter_version": self.version})


def _number(value, key: str, kind, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise bad_request(f"{key} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    return kind(value)


def log_chat_model(adapter_dir: str | Path, model_name_or_dir: str | Path, *, dtype: str = "float32",
                   adapter_version: str | None = None, fired_weight: float | None = None, serving=None,
                   trace_experiment: str | None = None, bundle_model: bool = False):
    """Log the chat model as ``chat`` in the active MLflow run; returns MLflow's ``ModelInfo``.
    ``serving`` (a ``ServingSettings``) and the rest go into its ``model_config``."""
    from editing.config import AuditConfig
    from tasks.settings import ServingSettings

    artifacts = {"adapter_set": str(adapter_dir)}
    if bundle_model:
        artifacts["base_model"] = str(model_name_or_dir)
    config = {"base_model": str(model_name_or_dir), "dtype": dtype, "adapter_version": adapter_version,
              "fired_weight": AuditConfig.fired_weight if fired_weight is None else fired_weight, "serving": (serving or ServingSettings()).to_dict(),
              "trace_experiment": trace_experiment}
    return mlflow.pyfunc.log_model(name="chat", python_model=str(CHAT_ENTRY), artifacts=artifacts,
                                   model_config=config, pip_requirements=pip_requirements())
