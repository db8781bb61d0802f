"""Fuzz every endpoint from the API's own OpenAPI schema (schemathesis), over real HTTP to the
in-process app with the tiny LLM's engine and the tiny diffusion preset's image engine: no 5xx,
and every error is OpenAI's error JSON.

    python -m pytest -q tests/unit/test_hostile_fuzz.py             # a quick pass, ~130 cases
    python -m pytest -q -m faults tests/unit/test_hostile_fuzz.py   # >= 1,000 (make test-faults)

Both schema-conforming (positive) and schema-violating (negative) cases are generated for each
operation; `model` is steered to the served name or an unknown one, so that valid requests
reach the engine instead of stopping at 404.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from fmray.config import validate_config
from fmray.models.diffusion import build_servable_preset
from fmray.serve.app import InProcessAPI, ServeConfig

API_KEY = "sk-fmray-fuzz"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class FuzzReport:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        spread = ", ".join(f"{status}: {n}" for status, n in sorted(self.statuses.items()))
        server_errors = sum(n for status, n in self.statuses.items() if status >= 500)
        return f"{self.cases} cases ({spread}), {server_errors} 5xx, {len(self.failures)} failures"


def fuzz_document(document: dict, served: list[str]) -> dict:
    """The API's schema with `model` limited to the served names plus one unknown one."""
    document = copy.deepcopy(document)
    names = {"type": "string", "enum": [*served, "no-such-model"]}
    schemas = document["components"]["schemas"]
    for request in ("CompletionRequest", "ChatCompletionRequest", "ImageGenerationRequest"):
        schemas[request]["properties"]["model"] = names
    for path in document["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model":
                    parameter["schema"] = names
    return document


def check_answer(response: httpx.Response) -> str | None:
    """Why this answer breaks the contract, or None."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{response.status_code} without OpenAI error JSON: {response.text[:300]}"
        if set(error) != {"message", "type", "param", "code"} or not error["message"]:
            return f"{response.status_code} with a malformed error: {error}"
        return None
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "data: [DONE]":
            return f"stream without [DONE]: {response.text[-300:]}"
        for event in events[:-1]:
            if "error" in json.loads(event[6:]):
                return f"stream ended in an error: {event[:300]}"
        return None
    response.json()  # a 200 is JSON
    return None


def fuzz_api(base: str, headers: dict[str, str], served: list[str], examples: int) -> FuzzReport:
    """`examples` generated cases per operation and mode (positive, negative), sent over HTTP."""
    report = FuzzReport()
    with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
        document = fuzz_document(http.get("/openapi.json").json(), served)
        schema = schemathesis.openapi.from_dict(document)
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=examples,
                    deadline=None,
                    database=None,
                    derandomize=True,  # the same cases every run: a failure reproduces
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                def send(case: schemathesis.Case) -> None:
                    label = operation.label  # noqa: B023 - send() runs within this iteration
                    kwargs = case.as_transport_kwargs(base_url=base, headers=headers)
                    body = {"json": kwargs["json"]} if "json" in kwargs else {}
                    if "data" in kwargs:
                        body = {"content": kwargs["data"]}
                    try:
                        response = http.request(
                            kwargs["method"],
                            kwargs["url"],
                            params=kwargs.get("params"),
                            headers=kwargs.get("headers"),
                            **body,
                        )
                    except httpx.HTTPError as err:
                        report.failures.append(f"{label}: {type(err).__name__}: {err}")
                        return
                    report.cases += 1
                    report.statuses[response.status_code] += 1
                    problem = check_answer(response)
                    if problem:
                        report.failures.append(f"{label} {kwargs}: {problem}"[:800])

                try:
                    send()
                except Unsatisfiable:  # e.g. no schema-violating request exists for GET /health
                    pass
    return report


SERVED = ["tiny", "shapes"]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    torch.set_num_threads(1)
    pipeline = build_servable_preset("tiny", tmp_path_factory.mktemp("t2i"))
    config = {
        # The limits bound what a valid fuzzed request costs.
        "models": {"tiny": {"path": str(tiny_model_dir)}},
        "engine": {"max_model_len": 48},
        "image_models": {"shapes": {"path": str(pipeline)}},
        "image_engine": {"num_inference_steps": 1, "max_inference_steps": 2},
        "serve": {"api_key": API_KEY},
    }
    api = InProcessAPI(validate_config(ServeConfig, config))
    with api.http_server() as url:
        yield url
    api.close()


def test_fuzz_quick_pass(base: str) -> None:
    report = fuzz_api(base, AUTH, SERVED, examples=15)
    print(report.line())
    assert report.cases >= 60 and not report.failures, "\n".join(report.failures[:5])
    assert report.statuses[200] > 0 and report.statuses[400] > 0  # both kinds were reached


@pytest.mark.faults
def test_fuzz_1000_cases(base: str) -> None:
    report = fuzz_api(base, AUTH, SERVED, examples=220)
    print(report.line())
    assert report.cases >= 1000 and not report.failures, "\n".join(report.failures[:5])
    assert report.statuses[200] >= 100
