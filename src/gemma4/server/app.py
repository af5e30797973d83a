"""The OpenAI-compatible HTTP layer (FastAPI). The engine runs in a background thread (async_engine.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from itertools import accumulate

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..processing.chat import collect_media, openai_to_gemma_messages, validate_tools
from ..processing.image import SUPPORTED_SOFT_TOKENS
from ..processing.parse import parse_response, to_openai_tool_calls
from ..processing.stream_parse import StreamParser
from .. import __version__
from ..engine.structured import StructuredOutputsParams
from ..processing.tool_grammar import tool_call_grammar
from .protocol import (
    COMPLETION_FIELDS, CHAT_FIELDS, DETOKENIZE_FIELDS, TOKENIZE_FIELDS, APIError, bad, check_fields, get_bool,
    get_number, get_token_ids, include_usage, parse_json, requested_max_tokens, sampling_params, structured_output,
    text_options, thinking, tool_choice,
)
from .async_engine import EngineDead, RequestFailed
from .generation import Choice, ClientDisconnected, merged
from .media import check_media, decode, load_media
from .state import ServerState


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="gemma4", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    @app.exception_handler(StarletteHTTPException)  # routing's 404 and 405, in the same shape
    async def api_error(request, exc: APIError | StarletteHTTPException):
        if not isinstance(exc, APIError):
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            exc = APIError(exc.status_code, str(exc.detail), kind)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "internal_error").body(), 500)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request, exc):  # nobody reads it: the status (nginx's "client closed request") is for metrics
        return Response(status_code=499)

    @app.get("/health")
    async def health():
        if state.engine.error is not None:  # the process is exiting (server/cli.py): a supervisor restarts it
            return JSONResponse({"status": "error", "message": f"the engine stopped: {state.engine.error!r}"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        for gauge, value in state.engine.stats().items():  # running, waiting, kv_usage: gauges of the same names
            getattr(state.metrics, gauge).set(value)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's: {"prompt": text} or {"messages": [...]} (rendered with the chat template, media refused)."""
        body = await _json_body(request, state, TOKENIZE_FIELDS)
        if (body.get("prompt") is None) == (body.get("messages") is None):
            raise bad("send either 'prompt' (a string) or 'messages' (a chat)", "prompt")
        if body.get("prompt") is not None:
            ids = state.tokenizer.encode(body["prompt"], add_special_tokens=get_bool(body, "add_special_tokens", True))
        else:
            gemma_messages, tools = _messages(body)
            if collect_media(gemma_messages):
                raise bad("/tokenize does not expand images or audio into their tokens; send text only", "messages")
            text = _render(state, gemma_messages, tools, get_bool(body, "add_generation_prompt", True),
                           thinking(body, state.default_enable_thinking))
            ids = state.tokenizer.encode(text, add_special_tokens=get_bool(body, "add_special_tokens", False))
        strings = [state.tokenizer.id_to_token(t) for t in ids] if get_bool(body, "return_token_strs") else None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strings}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json_body(request, state, DETOKENIZE_FIELDS)
        if body.get("tokens") is None:
            raise bad("'tokens' (a list of token ids) is required", "tokens")
        ids = get_token_ids(body["tokens"], "tokens", state.tokenizer.vocab_size)
        return {"prompt": state.tokenizer.decode(ids)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": state.created,
                                            "owned_by": "gemma4", "max_model_len": state.max_model_len}
                                           for name in state.model_names]}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        if not state.has_audio:
            raise APIError(404, "this model has no audio tower: /v1/audio/transcriptions is not available",
                             "not_found_error")
        return await _transcription(state, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _chat(state, await _json_body(request, state, CHAT_FIELDS), request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _completion(state, await _json_body(request, state, COMPLETION_FIELDS), request)

    app.add_middleware(_auth_and_metrics, state=state, endpoints={route.path for route in app.routes})
    # Added last, so outermost: it answers a browser's preflight (an OPTIONS without the API key) before the key is
    # checked, and adds its headers to every response, errors included. vLLM's defaults, origins from --allowed-origins.
    app.add_middleware(CORSMiddleware, allow_origins=state.allowed_origins, allow_credentials=False,
                       allow_methods=["*"], allow_headers=["*"])
    return app


MAX_BODY_BYTES = 64 * 1024 * 1024  # room for a few inline images or clips; more is refused before it is read
MAX_CHOICES = 256  # of one completions request: prompts x n


async def _read_body(request: Request, limit: int, what: str = "the request body", param: str | None = None) -> bytes:
    """The body, read in chunks and refused with a 413 as soon as it passes `limit` bytes."""
    too_large = APIError(413, f"{what} is larger than {limit} bytes", param=param)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _auth_and_metrics(app, state: ServerState, endpoints: set[str]):
    """The API key, one rule as vLLM: with --api-key, every /v1/* request needs it, the other endpoints are open; and
    /metrics' request counter, by endpoint and status. Plain ASGI, not BaseHTTPMiddleware (which runs the handler in
    a task of its own): when uvicorn cancels the handler after the shutdown grace period, `_run_to_end` answers 503."""
    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        status = 500  # unless a response starts

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path, key = scope["path"], state.api_key
        # 'Authorization: Bearer KEY', compared in constant time (no timing oracle on the key's prefix)
        given = Request(scope).headers.get("authorization", "").encode("utf-8", "surrogateescape")
        try:
            if key and path.startswith("/v1") and not hmac.compare_digest(given, f"Bearer {key}".encode()):
                error = APIError(401, "invalid or missing API key", "authentication_error")
                await JSONResponse(error.body(), 401)(scope, receive, send_counted)
            else:
                await app(scope, receive, send_counted)
        finally:
            state.metrics.requests.labels(path if path in endpoints else "other", str(status)).inc()

    return middleware


async def _json_body(request: Request, state: ServerState, fields: dict) -> dict:
    body = parse_json(await _read_body(request, MAX_BODY_BYTES))
    check_fields(body, fields)
    model = body.get("model")
    if model is not None and model not in state.model_names:
        raise _unknown_model(state, model)
    return body


def _unknown_model(state: ServerState, model: str) -> APIError:
    return APIError(404, f"the model {model!r} does not exist; this server serves {state.model_names}",
                    "not_found_error", "model", "model_not_found")


def _truncated(state: ServerState, body: dict, prompt_ids: list[int], chat: bool, media: bool = False) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last n tokens (a BOS before them is dropped too); -1: as many as
    the context holds beside max_tokens (or beside one new token when max_tokens is not given)."""
    keep = get_number(body, "truncate_prompt_tokens", None, -1)
    if keep == -1:
        keep = state.max_model_len - (requested_max_tokens(body, chat) or 1)
    elif keep is not None and keep < 1:
        raise bad(f"'truncate_prompt_tokens' must be -1 or at least 1, got {keep}", "truncate_prompt_tokens")
    if keep is None or keep >= len(prompt_ids):
        return prompt_ids
    if media:  # a cut could split an image's or a clip's soft tokens
        raise bad("'truncate_prompt_tokens' cannot cut a prompt with images or audio", "truncate_prompt_tokens")
    return prompt_ids[-keep:]


def _check_prompt(state: ServerState, prompt_ids: list[int], body: dict, chat: bool):
    room = state.max_model_len - len(prompt_ids)
    if room <= 0:
        raise bad(f"the prompt has {len(prompt_ids)} tokens, more than this server's maximum context length of "
                    f"{state.max_model_len} tokens (--max-model-len)", "messages" if chat else "prompt")
    # logit_bias keys: ids the model can sample (the tokenizer may name a few more, e.g. an image placeholder)
    vocab = min(state.tokenizer.vocab_size, state.engine.engine.runner.model.config.text_config.vocab_size)
    params = sampling_params(body, state.sampling_defaults, room, chat, vocab, state.engine.engine.stop_token_ids,
                             encode=state.tokenizer.encode)
    if len(prompt_ids) + params.max_tokens > state.max_model_len:
        raise bad(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the maximum "
                    f"context length of {state.max_model_len} tokens", "max_tokens")
    return params


async def _start(state: ServerState, n: int, prompts: list[tuple], text: dict, inputs=None,
                 param: str | None = None) -> list[Choice]:
    """n choices of each (prompt ids, sampling params): choice k*n + i is the i-th of prompt k, as vLLM. All start, or
    none (an error aborts those started). `text`: how their text is made (protocol.text_options). `inputs`: the
    media tensors of a single prompt, whose soft tokens the towers make once (off the event loop) for all its
    choices. `param`: the field a structured output's compile error names."""
    try:
        encode = state.engine.engine.encode_media
        media = None if inputs is None else await asyncio.to_thread(encode, prompts[0][0], inputs)
    except ValueError as e:
        raise bad(str(e), "messages") from None
    for spec, param in {id(p.structured_outputs): (p.structured_outputs, param) for _, p in prompts}.values():
        if spec is not None:  # compiled off the event loop (the first one also builds llguidance's token table)
            await _compile(state, spec, param)
    choices = []
    try:
        for k, (prompt_ids, params) in enumerate(prompts):
            for i in range(n):
                seed = None if params.seed is None else (params.seed + i) % 2**63  # choice i samples with seed + i
                choices.append(Choice(k * n + i, state.engine, state.tokenizer, prompt_ids,
                                      dataclasses.replace(params, seed=seed), media, **text))
            state.metrics.prompt_tokens.inc(len(prompt_ids) * n)
    except (EngineDead, ValueError) as e:
        for c in choices:
            c.abort()
        raise (_engine_error(e) if isinstance(e, EngineDead) else bad(str(e))) from None
    return choices


async def _compile(state: ServerState, spec: StructuredOutputsParams, param: str | None) -> None:
    """A 400 naming `param` when the structured output cannot be compiled."""
    grammars = state.engine.engine.grammars
    if grammars is None:
        raise bad("this server's engine has no tokenizer for structured outputs", param)
    try:
        await asyncio.to_thread(grammars.compile, spec)
    except ValueError as e:
        raise bad(str(e), param) from None


# ----------------------------------------------------------------------------------------------------- chat
def _messages(body: dict) -> tuple[list, list | None]:
    """The request's messages in Gemma's form, and its tools (checked)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    try:
        return openai_to_gemma_messages(messages), validate_tools(body.get("tools"))
    except (ValueError, TypeError) as e:
        raise bad(str(e), "messages") from None


def _render(state: ServerState, gemma_messages, tools, add_generation_prompt: bool, enable_thinking: bool) -> str:
    try:
        return state.tokenizer.apply_chat_template(gemma_messages, tools=tools, enable_thinking=enable_thinking,
                                                   add_generation_prompt=add_generation_prompt)
    except (ValueError, TypeError) as e:
        raise bad(f"cannot render these messages with the chat template: {e}", "messages") from None


def _chat_prompt(state: ServerState, body: dict, gemma_messages, tools, enable_thinking: bool) -> str:
    """The rendered chat: a new model turn opened (add_generation_prompt, default true), or, with
    continue_final_message, the last message (the assistant's) left open for the model to go on with, as vLLM."""
    if not get_bool(body, "continue_final_message"):
        return _render(state, gemma_messages, tools, get_bool(body, "add_generation_prompt", True), enable_thinking)
    if body.get("add_generation_prompt"):  # vLLM's rule: not both given true
        raise bad("'continue_final_message' and 'add_generation_prompt' cannot both be true", "continue_final_message")
    if body["messages"][-1].get("role") != "assistant":
        raise bad("'continue_final_message' needs the last message to be the assistant's", "continue_final_message")
    prompt = _render(state, gemma_messages, tools, False, enable_thinking)
    end = f"{state.tokenizer.id_to_token(state.tokenizer.turn_end_id)}\n"
    if not prompt.endswith(end):
        raise bad("the chat template does not end the last message with its end of turn: it cannot be continued",
                  "continue_final_message")
    return prompt[:-len(end)]


def _chat_constraint(state: ServerState, body: dict, tools, choice, parallel: bool, enable_thinking: bool
                     ) -> tuple[StructuredOutputsParams | None, str | None]:
    """The chat request's structured output and the field its errors name: response_format / structured_outputs,
    or, for tool_choice required or named, Gemma's tool-call syntax over the declared tools (one call unless
    parallel_tool_calls). With thinking on, it starts once the thought channel closes (`<channel|>`)."""
    spec = structured_output(body)
    param = "structured_outputs" if body.get("structured_outputs") is not None else "response_format"
    if choice not in ("none", "auto"):
        if spec is not None:
            raise bad(f"{param} cannot be combined with tool_choice {choice!r}: both constrain the answer",
                      "tool_choice")
        tok = state.tokenizer
        try:
            grammar = tool_call_grammar(tools, tok.tool_call_start_id, tok.tool_call_end_id, tok.string_delimiter_id,
                                        name=None if choice == "required" else choice, parallel=parallel)
        except ValueError as e:
            raise bad(str(e), "tools") from None
        spec, param = StructuredOutputsParams(grammar=grammar), "tools"
    if spec is not None and enable_thinking:
        spec.start_after = state.tokenizer.channel_end_id
    return spec, param


async def _chat(state: ServerState, body: dict, request: Request):
    if get_bool(body, "echo"):
        raise bad("'echo' is not supported on chat (vLLM's: the last message again); use /v1/completions' echo or "
                  "'prompt_logprobs'", "echo")
    gemma_messages, tools = _messages(body)
    choice = tool_choice(body, tools)
    parallel = get_bool(body, "parallel_tool_calls", True)
    media = collect_media(gemma_messages)
    check_media(media, state)
    enable_thinking = thinking(body, state.default_enable_thinking)
    stream, usage = get_bool(body, "stream"), include_usage(body)
    n, text = get_number(body, "n", 1, 1, 16), text_options(body, chat=True)
    spec, param = _chat_constraint(state, body, tools, choice, parallel, enable_thinking)
    prompt = _chat_prompt(state, body, gemma_messages, tools if choice != "none" else None, enable_thinking)
    started = time.monotonic()
    if media:
        prompt_ids, inputs = await _process(state, prompt, lambda: load_media(media, state.allowed_media_domains),
                                            max_soft_tokens=_image_budget(body))
    else:
        prompt_ids, inputs = state.tokenizer.encode(prompt, add_special_tokens=False), None
    prompt_ids = _truncated(state, body, prompt_ids, chat=True, media=bool(media))
    params = _check_prompt(state, prompt_ids, body, chat=True)
    if choice == "none" and state.tokenizer.tool_call_start_id is not None:  # no call can start
        params = dataclasses.replace(params, logit_bias={**(params.logit_bias or {}),
                                                         state.tokenizer.tool_call_start_id: float("-inf")})
    params = _constrained(params, spec)
    choices = await _start(state, n, [(prompt_ids, params)], text, inputs, param)
    head = _head(state, body, "chatcmpl", "chat.completion")
    if stream:
        return _sse(_chat_stream(state, choices, prompt, head, usage, started, request, parallel))
    await _run_to_end(state, choices, request, started)
    results = []
    for c in choices:
        # The prompt's end sets where the answer starts (an open thought channel).
        parsed = parse_response(c.text, prefix=prompt, complete=c.finish_reason == "stop")
        calls = parsed.get("tool_calls")
        calls = calls if parallel else calls[:1]  # parallel_tool_calls false: at most one call
        # an empty answer (a stop string at once) is "", as vLLM; null is for calls
        message = {"role": "assistant", "content": parsed.get("content") if calls else parsed.get("content") or ""}
        if parsed.get("reasoning_content") is not None:
            message["reasoning_content"] = message["reasoning"] = parsed["reasoning_content"]
        if calls:
            message["tool_calls"] = to_openai_tool_calls(calls)
        lp = None if params.logprobs is None else {"content": [_chat_logprob(state.tokenizer, x) for x in c.logprobs]}
        finish = "tool_calls" if calls else c.finish_reason
        results.append({"index": c.index, "message": message, "finish_reason": finish, "logprobs": lp})
    scored = {} if params.prompt_logprobs is None else \
        {"prompt_logprobs": _prompt_logprobs(state.tokenizer, choices[0].prompt_logprobs, params.prompt_logprobs)}
    return {**head, "choices": results, "usage": _usage(choices), **scored}


def _constrained(params, spec: StructuredOutputsParams | None):
    if spec is None:
        return params
    try:
        return dataclasses.replace(params, structured_outputs=spec)
    except ValueError as e:  # min_tokens, which a grammar's end overrides; allowed_token_ids, bad_words: constraints
        field = next((f for f in ("allowed_token_ids", "bad_words") if getattr(params, f)), "min_tokens")
        raise bad(str(e), field) from None


def _head(state: ServerState, body: dict, prefix: str, kind: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": body.get("model") or state.model_names[0]}


async def _chat_stream(state, choices, prefix, head, include_usage, started, request, parallel=True):
    def chunk(choices_, usage=None):
        data = {**head, "object": "chat.completion.chunk", "choices": choices_}
        return {**data, "usage": usage} if include_usage else data

    parsers = {c.index: StreamParser(prefix=prefix) for c in choices}
    saw_call = {c.index: False for c in choices}
    # Logprobs sent so far (c.logprobs[:sent]): those of tokens whose text the parser still holds back (a marker in
    # the making) go with the next delta, as in completions' stream.
    sent = {c.index: 0 for c in choices}
    first = True
    for c in choices:
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for c, text in merged(choices, request):
        if first and text:
            state.metrics.ttft.observe(time.monotonic() - started)
            first = False
        events = parsers[c.index].feed(text) if text else []
        if c.done:
            events += parsers[c.index].finish(complete=c.finish_reason == "stop")
        deltas = [event.openai_delta() for event in events]
        if not parallel:  # parallel_tool_calls false: at most one call (index 0)
            deltas = [d for d in deltas if all(call["index"] == 0 for call in d.get("tool_calls", []))]
        for delta in deltas:
            if "reasoning_content" in delta:
                delta["reasoning"] = delta["reasoning_content"]
            saw_call[c.index] |= "tool_calls" in delta
        if c.done and len(c.logprobs) > sent[c.index] and not deltas:
            deltas = [{}]
        for delta in deltas:
            unsent, sent[c.index] = c.logprobs[sent[c.index]:], len(c.logprobs)
            lp = {"content": [_chat_logprob(state.tokenizer, x) for x in unsent]} if unsent else None
            yield chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None}])
        if c.done:
            finish = "tool_calls" if saw_call[c.index] else c.finish_reason
            yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": finish}])
    _observe(state, choices, started)
    if include_usage:
        yield chunk([], _usage(choices))


def _sse(events) -> StreamingResponse:
    """Server-sent events: each of `events`, the engine's error if it fails, then [DONE]; nothing if the client left."""
    async def lines():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except ClientDisconnected:
            return
        except (EngineDead, RequestFailed) as e:
            yield f"data: {json.dumps(_engine_error(e).body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


def _chat_logprob(tokenizer, lp) -> dict:
    def entry(token_id, logprob):
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def _prompt_logprobs(tokenizer, entries: list, k: int) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}} of the
    token and of the k most likely there (ranks 1..k), -inf written as -9999.0."""
    def entry(token_id, logprob, rank):
        return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": tokenizer.decode([token_id])}

    out = []
    for x in entries:
        if x is None:
            out.append(None)
            continue
        ranked = {str(x.token_id): entry(x.token_id, x.logprob, x.rank)}
        for rank, (token_id, logprob) in enumerate(x.top[:k], start=1):
            ranked.setdefault(str(token_id), entry(token_id, logprob, rank))
        out.append(ranked)
    return out


def _usage(choices: list[Choice], n: int | None = None) -> dict:
    """`n` choices per prompt (default: all of them share one prompt), each prompt counted once."""
    prompt = sum(c.num_prompt for c in choices[::n or len(choices) or 1])
    completion = sum(c.num_output for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _run_to_end(state, choices, request, started) -> None:
    """Apply every output of a non-streamed request."""
    try:
        async for _ in merged(choices, request):
            pass
    except (EngineDead, RequestFailed) as e:
        raise _engine_error(e) from None
    except asyncio.CancelledError:  # only uvicorn cancels a request: --shutdown-timeout passed with it in flight
        raise APIError(503, "the server shut down before this request finished", "server_error") from None
    _observe(state, choices, started)


def _engine_error(e: EngineDead | RequestFailed) -> APIError:
    """503 when the engine is gone (for every request), 500 when this request alone failed in it."""
    return APIError(503 if isinstance(e, EngineDead) else 500, str(e), "server_error")


def _observe(state: ServerState, choices: list[Choice], started: float) -> None:
    state.metrics.latency.observe(time.monotonic() - started)
    state.metrics.generation_tokens.inc(sum(c.num_output for c in choices))


# ----------------------------------------------------------------------------------------------- completions
def _prompts(state: ServerState, prompt) -> tuple[list[list[int]], list[str | None]]:
    """`prompt` as vLLM takes it (a string, a list of token ids, or a list of strings or of token-id lists) -> the
    token ids of each prompt, and its text where it was given as one."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):  # one prompt
        prompt = [prompt]
    if not prompt or not all(isinstance(p, (str, list)) for p in prompt):
        raise bad("'prompt' must be a string, a list of token ids, or a non-empty list of strings or of token-id "
                  "lists", "prompt")
    vocab = state.tokenizer.vocab_size
    prompts = [state.tokenizer.encode(p) if isinstance(p, str) else get_token_ids(p, "prompt", vocab) for p in prompt]
    if not all(prompts):
        raise bad("a prompt is empty", "prompt")
    return prompts, [p if isinstance(p, str) else None for p in prompt]


async def _completion(state: ServerState, body: dict, request: Request):
    prompts, given = _prompts(state, body.get("prompt"))
    stream, usage = get_bool(body, "stream"), include_usage(body)
    n = get_number(body, "n", 1, 1, 16)
    if len(prompts) * n > MAX_CHOICES:
        raise bad(f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices in one request", "prompt")
    cut, text = [_truncated(state, body, ids, chat=False) for ids in prompts], text_options(body, chat=False)
    echoes = None  # echo: each choice's text starts with its prompt, as sent if text (and not truncated), else decoded
    if get_bool(body, "echo"):
        echoes = [sent if sent is not None and len(ids) == len(whole) else
                  state.tokenizer.decode(ids, skip_special_tokens=text["skip_special_tokens"])
                  for sent, ids, whole in zip(given, cut, prompts)]
    prompts = cut
    spec = structured_output(body)
    param = "structured_outputs" if body.get("structured_outputs") is not None else "response_format"
    # all checked before any starts
    params = [_constrained(_check_prompt(state, ids, body, chat=False), spec) for ids in prompts]
    started = time.monotonic()
    choices = await _start(state, n, list(zip(prompts, params)), text, param=param)
    head = _head(state, body, "cmpl", "text_completion")

    def echo_of(c: Choice) -> str:
        return echoes[c.index // n] if echoes is not None else ""

    def logprobs_of(c: Choice, start: int = 0, echo: bool = False):
        """The logprobs of c's tokens from the `start`-th on, with `echo` its prompt's first (the first one's null,
        as OpenAI and vLLM); text_offset: where each token's text starts in the choice's text, the prompt's tokens
        by the lengths of the token strings before them (vLLM's rule)."""
        k = params[0].logprobs
        if k is None:
            return None
        decode = state.tokenizer.decode

        def top_of(x):  # the k most likely there (a prompt token's may hold more: prompt_logprobs asked for more)
            return None if x is None else {decode([t]): v for t, v in x.top[:k]}

        items = c.logprobs[start:]
        tokens = [decode([x.token_id]) for x in items]
        token_logprobs = [x.logprob for x in items]
        top = [top_of(x) for x in items]
        offsets = [len(echo_of(c)) + at for at in c.text_offsets[start:]]
        if echo:
            prompt, entries = [decode([t]) for t in prompts[c.index // n]], c.prompt_logprobs
            tokens = prompt + tokens
            token_logprobs = [None if x is None else x.logprob for x in entries] + token_logprobs
            top = [top_of(x) for x in entries] + top
            offsets = list(accumulate((len(t) for t in prompt[:-1]), initial=0)) + offsets
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def prompt_field(c: Choice) -> dict:
        """vLLM's prompt_logprobs field, when asked."""
        k = body.get("prompt_logprobs")
        return {} if k is None else {"prompt_logprobs": _prompt_logprobs(state.tokenizer, c.prompt_logprobs, k)}

    def data(choices_, usage=None):
        return {**head, "choices": choices_, **({"usage": usage} if usage is not None else {})}

    if stream:
        async def events():
            sent = {c.index: 0 for c in choices}  # logprobs sent: those of a token whose text is held back come later
            echoed = set()  # choices whose prompt went out (echo: with their first chunk, as vLLM)
            async for c, text in merged(choices, request):
                if text or c.done:
                    echo = echoes is not None and c.index not in echoed
                    echoed.add(c.index)
                    yield data([{"index": c.index, "text": echo_of(c) + text if echo else text,
                                 "logprobs": logprobs_of(c, sent[c.index], echo), "finish_reason": c.finish_reason}])
                    sent[c.index] = len(c.logprobs)
            _observe(state, choices, started)
            if usage:
                yield data([], _usage(choices, n))
        return _sse(events())
    await _run_to_end(state, choices, request, started)
    return data([{"index": c.index, "text": echo_of(c) + c.text, "logprobs": logprobs_of(c, echo=echoes is not None),
                  "finish_reason": c.finish_reason, **prompt_field(c)} for c in choices], _usage(choices, n))


# ----------------------------------------------------------------------------------------------------- media
def _image_budget(body: dict) -> int | None:
    """Extension: `mm_processor_kwargs: {"max_soft_tokens": 70|140|280|560|1120}` (image tokens per image)."""
    kwargs = body.get("mm_processor_kwargs") or {}
    if set(kwargs) - {"max_soft_tokens"}:
        raise bad("'mm_processor_kwargs' must be an object with only 'max_soft_tokens'", "mm_processor_kwargs")
    budget = kwargs.get("max_soft_tokens")
    if budget is not None and budget not in SUPPORTED_SOFT_TOKENS:  # True == 1 is none of them
        raise bad(f"'mm_processor_kwargs.max_soft_tokens' must be one of {list(SUPPORTED_SOFT_TOKENS)}",
                    "mm_processor_kwargs")
    return budget


async def _process(state: ServerState, prompt: str, load, param: str = "messages", **kwargs):
    """In a worker thread, a few requests at a time (decoded media can be large): `load()` (fetch, decode) -> (images,
    audio clips), then the processor on the prompt -> (the prompt's token ids, the media tensors the towers take)."""
    def work():
        with state.media_slots:
            images, clips = load()
            try:
                # audio as one list per prompt: a flat list of (samples, rate) tuples would read as nested lists
                out = state.processor(text=prompt, images=images or None, audio=[clips] if clips else None,
                                      add_special_tokens=False, **kwargs)
            except ValueError as e:
                raise bad(f"cannot process the media: {e}", param) from None
        drop = ("input_ids", "attention_mask", "mm_token_type_ids")
        return out["input_ids"][0].tolist(), {key: value for key, value in out.items() if key not in drop}

    return await asyncio.to_thread(work)


# --------------------------------------------------------------------------------------------- transcriptions
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's limit for audio files
TRANSCRIPT_MAX_TOKENS = 448  # default cap of a transcript (Whisper's), unless the form's max_tokens says otherwise


def _parse_form(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data -> {field: (filename or None, bytes)} with the standard library's MIME parser."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise bad("send the audio as multipart/form-data (fields: file, model, prompt, language, "
                    "response_format, temperature)")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1", "replace")
                                                  + b"\r\n\r\n" + raw)
    if not message.is_multipart():
        raise bad("the multipart/form-data body cannot be parsed")
    parts = [(part.get_param("name", header="content-disposition"), part) for part in message.iter_parts()]
    # The first part of a name wins (so in reverse: later ones overwrite); a nested multipart's payload is None.
    return {name: (part.get_filename(), part.get_payload(decode=True) or b"")
            for name, part in reversed(parts) if isinstance(name, str)}


async def _transcription(state: ServerState, request: Request):
    raw = await _read_body(request, MAX_UPLOAD_BYTES, "the upload", param="file")
    fields = _parse_form(request.headers.get("content-type", ""), raw)

    def field(name: str, kind: type = str, what: str = "UTF-8 text"):
        """The form's field `name` as a `kind`, None when absent."""
        try:
            return kind(fields[name][1].decode("utf-8")) if name in fields else None
        except ValueError:  # a UnicodeDecodeError too
            raise bad(f"'{name}' must be {what}", name) from None

    filename, data = fields.get("file", (None, b""))
    if not data:
        raise bad("'file' (the audio) is required", "file")
    model = field("model")
    if model is not None and model not in state.model_names and model != "whisper-1":
        raise _unknown_model(state, model)
    response_format = field("response_format") or "json"
    if response_format not in ("json", "text"):
        raise bad("'response_format' must be json or text", "response_format")
    body = {"temperature": field("temperature", float, "a number") or 0.0,  # greedy by default
            "max_tokens": field("max_tokens", int, "an integer")}  # extension: the transcript's cap in tokens
    instruction = "Transcribe this audio."
    language, prompt = field("language"), field("prompt")
    if language:
        instruction += f" The speech is in {language.strip()[:64]}."
    if prompt:
        instruction += f" Context (earlier speech or spelling hints): {prompt.strip()[:2000]}"

    suffix = filename.rsplit(".", 1)[-1] if filename and "." in filename else ""
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": instruction}]}]
    prompt_text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    prompt_ids, inputs = await _process(state, prompt_text, lambda: ([], [decode("audio", data, suffix, "file")]),
                                        "file")
    if body["max_tokens"] is None:
        body["max_tokens"] = max(1, min(TRANSCRIPT_MAX_TOKENS, state.max_model_len - len(prompt_ids)))
    params = _check_prompt(state, prompt_ids, body, chat=True)  # greedy unless a temperature is given
    started = time.monotonic()
    [choice] = await _start(state, 1, [(prompt_ids, params)], {"stops": []}, inputs)
    await _run_to_end(state, [choice], request, started)
    parsed = parse_response(choice.text, prefix=prompt_text, complete=choice.finish_reason == "stop")
    text = (parsed.get("content") or "").strip()
    if response_format == "text":
        return PlainTextResponse(text)
    tokens = {"input_tokens": choice.num_prompt, "output_tokens": choice.num_output}
    return {"text": text, "usage": {"type": "tokens", **tokens, "total_tokens": sum(tokens.values())}}
