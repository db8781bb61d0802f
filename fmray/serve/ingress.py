"""The HTTP front door: FastAPI routes of the OpenAI API, auth, limits, errors, model routing.

    curl localhost:8000/v1/models
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'
    curl localhost:8000/v1/images/generations -H 'Content-Type: application/json' \
        -d '{"model": "shapes", "prompt": "a red circle on the left", "seed": 1}'

`build_api(models, api_key, max_body_bytes, image_models)` is the whole API as a plain ASGI
app: it checks the key, the content type, the body size and the schema, then forwards the
parsed request to the model by `model` name (LLMs for the text routes, image models for
/v1/images/generations; /v1/models and /health list both). On Ray Serve the models are
DeploymentHandles (`OpenAIIngress`); the tests and the reliability bench run the same app
in-process over `InProcessModel`s. Every failure, wherever it happened, leaves as OpenAI's
error JSON with its status (and Retry-After on overload).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from fmray.serve.errors import (
    APIError,
    ErrorResponse,
    from_validation_error,
    internal_error,
    invalid_request,
    overloaded,
    unwrap,
)
from fmray.serve.image_schemas import ImageGenerationRequest
from fmray.serve.schemas import SSE_DONE, ChatCompletionRequest, CompletionRequest, ModelList, sse

R = TypeVar("R", bound=BaseModel)
PING_TIMEOUT_S = 5.0
OPEN_PATHS = ("/health",)  # answered without the API key (load balancers, Serve probes)
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
SHOWN_NAME_CHARS = 80  # an unknown model name is echoed back at most this long
ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "OpenAI error JSON"},
    "5XX": {"model": ErrorResponse, "description": "OpenAI error JSON"},
}


class ChunkStream(Protocol):
    """A model's streamed answer: SSE strings (or an APIError value); close() stops it early."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def close(self) -> None: ...


class ModelClient(Protocol):
    """How the API reaches one model: a Serve handle, or an object in this process."""

    async def call(self, method: str, *args: Any) -> Any: ...

    def stream(self, method: str, *args: Any) -> ChunkStream: ...


def build_api(
    models: Mapping[str, ModelClient],
    api_key: str | None,
    max_body_bytes: int,
    image_models: Mapping[str, ModelClient] | None = None,
) -> Any:
    """The OpenAI API over `models` (LLMs) and `image_models` (by request `model` name), as an
    ASGI app."""
    image_models = dict(image_models or {})
    everything = {**models, **image_models}
    api = FastAPI(
        title="fmray",
        summary="OpenAI-compatible API over Ray Serve",
        openapi_url=None,  # served below, behind the API key
        docs_url=None,
        redoc_url=None,
    )
    cards: dict[str, dict] = {}

    api.add_exception_handler(APIError, _api_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(Exception, _unexpected_error)

    def handle(model: str, kind: str = "llm") -> ModelClient:
        """The client of `model` for a route of `kind`: 404 if nothing has that name, 400 if
        the name belongs to the other kind (a chat request to an image model)."""
        client = (models if kind == "llm" else image_models).get(model)
        if client is None:
            shown = model if len(model) <= SHOWN_NAME_CHARS else model[:SHOWN_NAME_CHARS] + "..."
            if model in everything:
                other = "an image model" if kind == "llm" else "a text model"
                route = "/v1/images/generations" if kind == "llm" else "/v1/chat/completions"
                message = f"The model {shown!r} is {other}: use {route}."
                raise APIError(400, message, param="model", code="model_not_supported")
            message = f"The model {shown!r} does not exist (served: {', '.join(everything)})."
            raise APIError(404, message, param="model", code="model_not_found")
        return client

    async def card(name: str) -> dict:
        if name not in cards:  # cached: the context length is known once a replica loaded
            cards[name] = await _result(everything[name].call("card"))
        return cards[name]

    async def ping(name: str) -> dict:
        try:
            state = await asyncio.wait_for(_result(everything[name].call("ping")), PING_TIMEOUT_S)
            return {"status": "ok", **state}
        except APIError as err:
            status = "overloaded" if err.status in (429, 503) and err.code == "overloaded" else None
            return {"status": status or "unavailable", "error": err.message}
        except TimeoutError:
            return {"status": "unavailable", "error": f"no answer in {PING_TIMEOUT_S:.0f}s"}

    @api.get("/health", responses=ERRORS)
    async def health() -> JSONResponse:
        names = list(everything)
        states = await asyncio.gather(*(ping(name) for name in names))
        healthy = all(state["status"] != "unavailable" for state in states)
        return JSONResponse(
            {
                "status": "ok" if healthy else "unavailable",
                "models": dict(zip(names, states, strict=True)),
            },
            status_code=200 if healthy else 503,
        )

    @api.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models() -> JSONResponse:
        cards_ = [await card(name) for name in everything]
        return JSONResponse(ModelList(data=cards_).model_dump())

    @api.get("/v1/models/{model:path}", responses=ERRORS)
    async def get_model(model: str) -> JSONResponse:
        handle(model, "image" if model in image_models else "llm")
        return JSONResponse(await card(model))

    @api.post("/v1/completions", openapi_extra=_json_body(CompletionRequest), responses=ERRORS)
    async def completions(request: Request) -> Any:
        body = _parse(CompletionRequest, await _read_json(request, max_body_bytes))
        model = handle(body.model)
        if body.stream:
            return await _stream(model.stream("completions_stream", body))
        return JSONResponse(await _result(model.call("completions", body)))

    @api.post(
        "/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest), responses=ERRORS
    )
    async def chat_completions(request: Request) -> Any:
        body = _parse(ChatCompletionRequest, await _read_json(request, max_body_bytes))
        model = handle(body.model)
        if body.stream:
            return await _stream(model.stream("chat_stream", body))
        return JSONResponse(await _result(model.call("chat", body)))

    @api.post(
        "/v1/images/generations",
        openapi_extra=_json_body(ImageGenerationRequest),
        responses=ERRORS,
    )
    async def images_generations(request: Request) -> Any:
        body = _parse(ImageGenerationRequest, await _read_json(request, max_body_bytes))
        model = handle(body.model, "image")
        return JSONResponse(await _result(model.call("images", body)))

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(_openapi_document(api))

    return RequireAPIKey(api, api_key)


# ---- the pieces build_api is made of ----


class RequireAPIKey:
    """ASGI middleware: every path but /health needs `Authorization: Bearer <key>` (when a key
    is set), unknown paths included, so nothing about the API answers without it."""

    def __init__(self, app: FastAPI, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    def add_exception_handler(self, *args: Any) -> None:
        """Serve registers its own handlers (overload -> 503) on the app it is given."""
        self.app.add_exception_handler(*args)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = _check_key(headers.get(b"authorization", b""), self.api_key)
        if error is None:
            return await self.app(scope, receive, send)
        response = JSONResponse(error.body(), status_code=error.status)
        await response(scope, receive, send)


def _check_key(header: bytes, api_key: str) -> APIError | None:
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        message = "You didn't provide an API key: send 'Authorization: Bearer <key>'."
        return APIError(401, message, code="invalid_api_key")
    if not hmac.compare_digest(token.strip(), api_key.encode()):
        return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return None


async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return await _api_error(request, APIError(err.status_code, str(err.detail), code=code))


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    message = f"Invalid request: {err.errors()[0]['msg']}"
    return await _api_error(request, invalid_request(message))


async def _unexpected_error(request: Request, err: Exception) -> JSONResponse:
    return await _api_error(request, as_api_error(err))  # Serve's overload errors: 503


async def _read_json(request: Request, max_body_bytes: int) -> Any:
    """The body as JSON: application/json (or no type), UTF-8, at most max_body_bytes."""
    content_type = request.headers.get("content-type", "application/json")
    media_type, _, params = content_type.partition(";")
    charset = params.strip().lower().removeprefix("charset=").strip('"') if params else "utf-8"
    if media_type.strip().lower() != "application/json" or charset not in ("utf-8", "utf8"):
        message = f"Content-Type must be application/json (UTF-8), not {content_type[:80]!r}."
        raise APIError(415, message, code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise _too_large(int(declared), max_body_bytes)
    body = bytearray()
    async for chunk in request.stream():  # counted as it arrives: chunked bodies too
        body += chunk
        if len(body) > max_body_bytes:
            raise _too_large(len(body), max_body_bytes)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        message = f"The request body is not UTF-8 (byte 0x{body[err.start]:02x} at {err.start})."
        raise invalid_request(message, code="invalid_json") from None
    try:
        value = json.loads(text)
    except ValueError as err:
        message = f"We could not parse the JSON body of your request: {err}."
        raise invalid_request(message, code="invalid_json") from None
    except RecursionError:  # the decoder's nesting limit: nothing OpenAI defines nests so deep
        message = "We could not parse the JSON body of your request: it nests too deeply."
        raise invalid_request(message, code="invalid_json") from None
    if SURROGATE_ESCAPE.search(text):  # only escapes make lone surrogates; pairs are joined
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            message = (
                "The JSON body is not valid Unicode: it escapes a lone surrogate (\\ud800-\\udfff)."
            )
            raise invalid_request(message, code="invalid_json") from None
    return value


def as_api_error(err: BaseException) -> APIError:
    """Any failure of a call to a model, as the error the client should see."""
    err = unwrap(err)
    if isinstance(err, APIError):
        return err
    if isinstance(err, BackPressureError):
        return overloaded(str(err), err.status_code, err.retry_after_s)
    if isinstance(err, DeploymentUnavailableError):
        return overloaded(f"model deployment unavailable: {err}", 503)
    if isinstance(err, RayActorError):  # the replica died (or became unreachable) under it
        return overloaded("The model replica serving this request was lost; retry.", 503)
    return internal_error(f"{type(err).__name__}: {err}")


def _too_large(size: int, limit: int) -> APIError:
    message = f"Request body of {size} bytes exceeds the limit of {limit} bytes."
    return APIError(413, message, code="request_too_large")


def _parse(schema: type[R], body: Any) -> R:
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_json")
    try:
        return schema.model_validate(body)
    except ValidationError as err:
        raise from_validation_error(err) from None
    except RecursionError:
        raise invalid_request("The request body nests too deeply.", code="invalid_json") from None


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


async def _stream(chunks: ChunkStream) -> StreamingResponse:
    """SSE response; the first chunk is awaited first so request errors keep their status."""
    iterator = aiter(chunks)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        first = SSE_DONE
    except Exception as err:  # noqa: BLE001
        await chunks.close()
        raise as_api_error(err) from None
    if isinstance(first, APIError):
        await chunks.close()
        raise first
    return StreamingResponse(
        _relay(first, iterator, chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _relay(first: str, iterator: AsyncIterator[Any], chunks: ChunkStream) -> Any:
    done = first == SSE_DONE
    try:
        yield first
        async for chunk in iterator:
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
            await chunks.close()


def _json_body(schema: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a route that reads and validates its body itself (so that size,
    encoding and nesting are checked first); the schema's models go to components."""
    name = schema.__name__
    return {"requestBody": {"required": True, "content": _json_content(name)}, "x-fmray": name}


def _json_content(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _openapi_document(api: FastAPI) -> dict[str, Any]:
    if api.openapi_schema is None:
        document = get_openapi(title=api.title, version="1", summary=api.summary, routes=api.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionRequest, ChatCompletionRequest, ImageGenerationRequest):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(definition.pop("$defs", {}))
            schemas[model.__name__] = definition
        for path in document["paths"].values():
            for operation in path.values():
                operation.pop("x-fmray", None)
        api.openapi_schema = document
    return api.openapi_schema


# ---- on Ray Serve ----


class ServeModel:
    """A model deployment reached through its DeploymentHandle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)

    def stream(self, method: str, *args: Any) -> ChunkStream:
        return _HandleStream(getattr(self.handle.options(stream=True), method).remote(*args))


class _HandleStream:
    def __init__(self, chunks: Any) -> None:
        self.chunks = chunks

    def __aiter__(self) -> AsyncIterator[Any]:
        return self.chunks.__aiter__()

    async def close(self) -> None:
        self.chunks.cancel()


class InProcessModel:
    """A model object in this process (an LLMDeployment instance without Serve): what the tests
    and the reliability bench drive the API with, no Ray in between."""

    def __init__(self, target: Any) -> None:
        self.target = target

    async def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.target, method)(*args)
        return await result if asyncio.iscoroutine(result) else result

    def stream(self, method: str, *args: Any) -> ChunkStream:
        return _GeneratorStream(getattr(self.target, method)(*args))


class _GeneratorStream:
    def __init__(self, chunks: Any) -> None:
        self.chunks = chunks

    def __aiter__(self) -> AsyncIterator[Any]:
        return self.chunks

    async def close(self) -> None:
        await self.chunks.aclose()


@serve.deployment
@serve.ingress()
class OpenAIIngress:
    """The API on Serve: one FastAPI app per ingress replica, built when the replica starts."""

    def __init__(
        self,
        models: dict[str, Any],
        api_key: str | None,
        max_body_bytes: int,
        image_models: dict[str, Any] | None = None,
    ) -> None:
        clients = {name: ServeModel(handle) for name, handle in models.items()}
        images = {name: ServeModel(handle) for name, handle in (image_models or {}).items()}
        self.asgi = build_api(clients, api_key, max_body_bytes, images)

    def __serve_build_asgi_app__(self) -> Any:
        return self.asgi
