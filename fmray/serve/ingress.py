"""The HTTP front door: FastAPI routes of the OpenAI API, auth, limits, errors, model routing.

    curl localhost:8000/v1/models
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'

The ingress holds no weights: it checks the key, the body size and the schema, then forwards
the parsed request to the model's deployment by `model` name. Every failure, wherever it
happened, leaves here as OpenAI's error JSON with its status (and Retry-After on overload).
"""

import asyncio
import hmac
import json
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException

from fmray.serve.errors import (
    APIError,
    from_validation_error,
    internal_error,
    invalid_request,
    overloaded,
    unwrap,
)
from fmray.serve.schemas import SSE_DONE, ChatCompletionRequest, CompletionRequest, ModelList, sse

R = TypeVar("R", bound=BaseModel)
PING_TIMEOUT_S = 5.0

app = FastAPI(title="fmray", summary="OpenAI-compatible API over Ray Serve")


@app.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


@app.exception_handler(HTTPException)
async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return await _api_error(_, APIError(err.status_code, str(err.detail), code=code))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return await _api_error(_, invalid_request(f"Invalid request: {err.errors()[0]['msg']}"))


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, err: Exception) -> JSONResponse:
    return await _api_error(_, internal_error(f"{type(err).__name__}: {err}"))


# Helpers come before the class: Serve pickles the ingress class while this module is
# still importing, so names defined below it would be missing in the replica.


def _parse(schema: type[R], body: Any) -> R:
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_json")
    try:
        return schema.model_validate(body)
    except ValidationError as err:
        raise from_validation_error(err) from None


def as_api_error(err: BaseException) -> APIError:
    """Any failure of a call to a model deployment, as the error the client should see."""
    err = unwrap(err)
    if isinstance(err, APIError):
        return err
    if isinstance(err, BackPressureError):
        return overloaded(str(err), err.status_code, err.retry_after_s)
    if isinstance(err, DeploymentUnavailableError):
        return overloaded(f"model deployment unavailable: {err}", 503)
    return internal_error(f"{type(err).__name__}: {err}")


async def _result(response: Any) -> Any:
    try:
        result = await response
    except asyncio.CancelledError:
        raise
    except Exception as err:  # noqa: BLE001 - every failure becomes an OpenAI error body
        raise as_api_error(err) from None
    if isinstance(result, APIError):  # client errors come back as values (see deployment.py)
        raise result
    return result


async def _stream(chunks: DeploymentResponseGenerator) -> StreamingResponse:
    """SSE response; the first chunk is awaited first so request errors keep their status."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = SSE_DONE
    except Exception as err:  # noqa: BLE001
        chunks.cancel()
        raise as_api_error(err) from None
    if isinstance(first, APIError):
        raise first
    return StreamingResponse(
        _relay(first, chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _relay(first: str, chunks: DeploymentResponseGenerator) -> Any:
    done = first == SSE_DONE
    try:
        yield first
        async for chunk in chunks:
            if isinstance(chunk, APIError):
                raise chunk
            yield chunk
        done = True
    except Exception as err:  # noqa: BLE001 - headers are sent: report in-band, then end
        yield sse(as_api_error(err).body())
        yield SSE_DONE
        done = True
    finally:
        if not done:  # the client went away: stop generating for it
            chunks.cancel()


@serve.deployment
@serve.ingress(app)
class OpenAIIngress:
    def __init__(
        self, models: dict[str, DeploymentHandle], api_key: str | None, max_body_bytes: int
    ) -> None:
        self.models = models
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.cards: dict[str, dict] = {}

    @app.get("/health")
    async def health(self) -> JSONResponse:
        names = list(self.models)
        states = await asyncio.gather(*(self._ping(name) for name in names))
        healthy = all(state["status"] != "unavailable" for state in states)
        return JSONResponse(
            {
                "status": "ok" if healthy else "unavailable",
                "models": dict(zip(names, states, strict=True)),
            },
            status_code=200 if healthy else 503,
        )

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        cards = [await self._card(name) for name in self.models]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/v1/models/{model:path}")
    async def get_model(self, model: str, request: Request) -> JSONResponse:
        self._authorize(request)
        self._handle(model)
        return JSONResponse(await self._card(model))

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        self._authorize(request)
        body = _parse(CompletionRequest, await self._read_json(request))
        handle = self._handle(body.model)
        if body.stream:
            return await _stream(handle.options(stream=True).completions_stream.remote(body))
        return JSONResponse(await _result(handle.completions.remote(body)))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        self._authorize(request)
        body = _parse(ChatCompletionRequest, await self._read_json(request))
        handle = self._handle(body.model)
        if body.stream:
            return await _stream(handle.options(stream=True).chat_stream.remote(body))
        return JSONResponse(await _result(handle.chat.remote(body)))

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401,
                "You didn't provide an API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _read_json(self, request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(int(declared))
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: chunked bodies too
            body += chunk
            if len(body) > self.max_body_bytes:
                raise self._too_large(len(body))
        try:
            return json.loads(body)
        except ValueError:
            message = "We could not parse the JSON body of your request."
            raise invalid_request(message, code="invalid_json") from None

    def _too_large(self, size: int) -> APIError:
        message = f"Request body of {size} bytes exceeds the limit of {self.max_body_bytes} bytes."
        return APIError(413, message, code="request_too_large")

    def _handle(self, model: str) -> DeploymentHandle:
        handle = self.models.get(model)
        if handle is None:
            message = f"The model `{model}` does not exist (served: {', '.join(self.models)})."
            raise APIError(404, message, param="model", code="model_not_found")
        return handle

    async def _card(self, name: str) -> dict:
        if name not in self.cards:  # cached: the context length is known once a replica loaded
            self.cards[name] = await _result(self.models[name].card.remote())
        return self.cards[name]

    async def _ping(self, name: str) -> dict:
        try:
            ping = await asyncio.wait_for(_result(self.models[name].ping.remote()), PING_TIMEOUT_S)
            return {"status": "ok", **ping}
        except APIError as err:
            status = "overloaded" if err.status in (429, 503) and err.code == "overloaded" else None
            return {"status": status or "unavailable", "error": err.message}
        except TimeoutError:
            return {"status": "unavailable", "error": f"no answer in {PING_TIMEOUT_S:.0f}s"}
