"""A fake of the Anthropic Messages API for tests and benchmarks: the REAL anthropic SDK talks to
it over HTTP on 127.0.0.1 (``AsyncAnthropic(base_url=fake.url, api_key=...)`` or
ANTHROPIC_BASE_URL), so our request building, the SDK's retries and our error handling are all
exercised for real; only the provider itself is fake, because it cannot exist here.

What it checks on every ``POST /v1/messages`` (a violation is answered 400
``invalid_request_error`` naming the problem, and recorded in ``fake.problems`` so a test can
assert ``fake.problems == []``):

* headers: an API key, as ``x-api-key`` or ``Authorization: Bearer``, and
  ``anthropic-version``; a key other than ``api_key`` (when given) is answered 401
  ``authentication_error``, as the real API does;
* ``model`` a non-empty string (equal to ``model`` when given), ``max_tokens`` a positive int;
* ``system`` a list of text blocks, one of them with ``cache_control: {"type": "ephemeral"}``
  (the system prompt is what we cache);
* ``tools``: exactly the tools offered, each with ``name``, ``description`` and an
  ``input_schema`` of type object whose ``properties`` and ``required`` hold every field in
  ``required_fields`` (label, confidence, summary, action, gate_correct by default);
* ``tool_choice`` forcing one offered tool: ``{"type": "tool", "name": <tool>}``;
* ``messages``: one ``user`` turn whose content has at least one text block and whose image
  blocks are ``{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
  "data": ...}}`` with data that decodes to a JPEG (FF D8), or ``image/png`` with PNG data;
  ``images_required=True`` demands at least one.

How it answers: a ``Reply`` pushed with ``fake.push(...)`` (consumed in order, one per request),
else ``fake.responder(request)`` when set, else ``fake.default`` (200 with a tool_use block).
Kinds: ``Reply.ok(tool_input=None, usage=None)``, ``Reply.rate_limited(retry_after=1)`` (429 +
``retry-after``), ``Reply.overloaded()`` (529), ``Reply.server_error()`` (500),
``Reply.malformed(tool_input)`` (200 whose tool input breaks the schema), ``Reply.text_only()``
(200 with no tool_use at all); any of them ``.slow(seconds)``; ``fake.latency_s`` delays every
answer (the benchmarks' "provider answering in 1 s").

A 200's ``usage`` is computed unless given: ``cache_creation_input_tokens`` the first time a
system prompt is seen and ``cache_read_input_tokens`` afterwards (as prompt caching bills),
``input_tokens`` the rest (about 4 characters a token, ``image_tokens`` per image),
``output_tokens`` from the tool input's JSON length.

Every request is kept in ``fake.requests`` (``RecordedRequest``: headers, the JSON body, its
text, images, status answered). Run standalone for a benchmark in another process:
``python tests/fake_anthropic.py --latency 1.0`` prints ``url=http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import itertools
import json
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

# Image types the Messages API takes that we send (frames, spectrograms) and their magic bytes.
IMAGE_MAGIC = {"image/jpeg": b"\xff\xd8", "image/png": b"\x89PNG\r\n\x1a\n"}
DEFAULT_REQUIRED_FIELDS = ("label", "confidence", "summary", "action", "gate_correct")


@dataclasses.dataclass(frozen=True)
class Reply:
    """One scripted answer."""

    status: int = 200
    # 200: the tool input to return (None: a valid default built from the request's schema).
    tool_input: dict[str, Any] | None = None
    usage: dict[str, int] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    error_type: str = ""
    latency_s: float | None = None  # None: the fake's latency_s
    no_tool: bool = False  # answer prose instead of the forced tool call

    @classmethod
    def ok(cls, tool_input: dict[str, Any] | None = None,
           usage: dict[str, int] | None = None) -> Reply:
        return cls(200, tool_input=tool_input, usage=usage)

    @classmethod
    def malformed(cls, tool_input: dict[str, Any]) -> Reply:
        """A 200 whose tool input breaks the schema (the model misbehaving)."""
        return cls(200, tool_input=tool_input)

    @classmethod
    def text_only(cls) -> Reply:
        """A 200 with prose and no tool_use block (tool choice ignored)."""
        return cls(200, no_tool=True)

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0) -> Reply:
        return cls(429, headers=(("retry-after", f"{retry_after:g}"),),
                   error_type="rate_limit_error")

    @classmethod
    def overloaded(cls) -> Reply:
        return cls(529, error_type="overloaded_error")

    @classmethod
    def server_error(cls, status: int = 500) -> Reply:
        return cls(status, error_type="api_error")

    def slow(self, seconds: float) -> Reply:
        return dataclasses.replace(self, latency_s=seconds)


@dataclasses.dataclass
class RecordedRequest:
    index: int
    received_at: float
    headers: dict[str, str]
    body: dict[str, Any]
    problems: list[str]
    status: int = 0  # what was answered (0: the client went away before the answer)

    @property
    def text(self) -> str:
        """All text blocks of the user turn, joined (where the event's metadata is)."""
        out: list[str] = []
        for msg in self.body.get("messages") or []:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                out.append(content)
            elif isinstance(content, list):
                out.extend(b.get("text", "") for b in content
                           if isinstance(b, dict) and b.get("type") == "text")
        return "\n".join(out)

    @property
    def images(self) -> list[bytes]:
        """Decoded image bytes of the user turn, in order."""
        out: list[bytes] = []
        for msg in self.body.get("messages") or []:
            content = msg.get("content") if isinstance(msg, dict) else None
            for b in content if isinstance(content, list) else []:
                if isinstance(b, dict) and b.get("type") == "image":
                    with contextlib.suppress(Exception):
                        out.append(base64.b64decode(b["source"]["data"], validate=True))
        return out


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


class FakeAnthropic:
    """The fake Messages API. ``async with FakeAnthropic() as fake:`` then ``fake.url``."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        model: str | None = None,
        latency_s: float = 0.0,
        required_fields: Sequence[str] = DEFAULT_REQUIRED_FIELDS,
        images_required: bool = False,
        image_tokens: int = 1600,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.model = model
        self.latency_s = latency_s
        self.required_fields = tuple(required_fields)
        self.images_required = images_required
        self.image_tokens = image_tokens
        self.host = host
        self.port = port
        self.default: Reply = Reply.ok()
        self.responder: Callable[[RecordedRequest], Reply | None] | None = None
        self.requests: list[RecordedRequest] = []
        self._pushed: deque[Reply] = deque()
        self._cached_systems: set[str] = set()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # scripting ------------------------------------------------------------------------------
    def push(self, *replies: Reply) -> None:
        """Answer the next requests with these, in order, then fall back to the default."""
        self._pushed.extend(replies)

    @property
    def problems(self) -> list[str]:
        return [f"request {r.index}: {p}" for r in self.requests for p in r.problems]

    def answered(self, status: int = 200) -> list[RecordedRequest]:
        return [r for r in self.requests if r.status == status]

    # lifecycle ------------------------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[union-attr]
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeAnthropic:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # the endpoint ---------------------------------------------------------------------------
    async def _messages(self, request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        problems: list[str] = []
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            body = {}
            problems.append(f"body is not JSON: {err}")
        if not isinstance(body, dict):
            body, problems = {}, [*problems, "body is not a JSON object"]
        rec = RecordedRequest(len(self.requests), time.time(), headers, body, problems)
        self.requests.append(rec)
        key = self.request_key(headers)
        if key and self.api_key is not None and key != self.api_key:
            # A wrong key is the provider's 401, not a malformed request.
            rec.status = 401
            return web.json_response(
                _error_body("authentication_error", "invalid x-api-key"), status=401)
        if not problems:
            problems.extend(self._check(headers, body))
        if problems:
            rec.status = 400
            return web.json_response(
                _error_body("invalid_request_error", "; ".join(problems)), status=400
            )
        reply = self._pushed.popleft() if self._pushed else None
        if reply is None and self.responder is not None:
            reply = self.responder(rec)
        reply = reply or self.default
        latency = self.latency_s if reply.latency_s is None else reply.latency_s
        if latency > 0:
            await asyncio.sleep(latency)
        rec.status = reply.status
        hdrs = {"request-id": f"req_fake_{rec.index}", **dict(reply.headers)}
        if reply.status != 200:
            message = {429: "Rate limited", 529: "Overloaded"}.get(reply.status, "Internal error")
            return web.json_response(_error_body(reply.error_type or "api_error", message),
                                     status=reply.status, headers=hdrs)
        return web.json_response(self._message(body, reply), headers=hdrs)

    def _message(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        tool = body["tools"][0] if body.get("tools") else {"name": "tool", "input_schema": {}}
        if reply.no_tool:
            content: list[dict[str, Any]] = [{"type": "text", "text": "I think it is a cat."}]
            tool_input: Any = {}
            stop_reason = "end_turn"
        else:
            tool_input = (reply.tool_input if reply.tool_input is not None
                          else self.default_input(tool.get("input_schema") or {}))
            content = [{"type": "tool_use", "id": f"toolu_fake_{next(self._ids)}",
                        "name": tool.get("name"), "input": tool_input}]
            stop_reason = "tool_use"
        usage = dict(reply.usage) if reply.usage is not None else self._usage(body, tool_input)
        return {
            "id": f"msg_fake_{next(self._ids)}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }

    @staticmethod
    def default_input(schema: dict[str, Any]) -> dict[str, Any]:
        """A valid answer for ``schema``: the first enum value, mid-range numbers, true."""
        props = schema.get("properties") or {}
        out: dict[str, Any] = {}
        for name, prop in props.items():
            prop = prop if isinstance(prop, dict) else {}
            kind = prop.get("type")
            kinds = kind if isinstance(kind, list) else [kind]
            if prop.get("enum"):
                out[name] = prop["enum"][0]
            elif "number" in kinds or "integer" in kinds:
                lo = prop.get("minimum", 0)
                hi = prop.get("maximum", 1)
                out[name] = 0.9 * hi + 0.1 * lo if "number" in kinds else int(lo)
            elif "boolean" in kinds:
                out[name] = True
            elif "string" in kinds:
                out[name] = "fake: a person walking past" if name == "summary" else "person"
            elif "array" in kinds:
                out[name] = []
            else:
                out[name] = None
        return out

    def _usage(self, body: dict[str, Any], tool_input: Any) -> dict[str, int]:
        system = json.dumps(body.get("system"), sort_keys=True)
        system_tokens = max(1, len(system) // 4)
        tools_tokens = len(json.dumps(body.get("tools"), sort_keys=True)) // 4
        rec = RecordedRequest(0, 0.0, {}, body, [])
        images = len(rec.images)
        # Prompt caching caches the prefix (tools + system) up to the breakpoint.
        prefix = tools_tokens + system_tokens
        first = system not in self._cached_systems
        self._cached_systems.add(system)
        return {
            "input_tokens": max(1, len(rec.text) // 4) + images * self.image_tokens,
            "output_tokens": max(1, len(json.dumps(tool_input)) // 4),
            "cache_creation_input_tokens": prefix if first else 0,
            "cache_read_input_tokens": 0 if first else prefix,
        }

    # request shape --------------------------------------------------------------------------
    @staticmethod
    def request_key(headers: dict[str, str]) -> str:
        """The API key a request carried: older SDKs send ``x-api-key``, 2.x sends it as
        ``Authorization: Bearer``; the real API takes both."""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return headers.get("x-api-key", "")

    def _check(self, headers: dict[str, str], body: dict[str, Any]) -> list[str]:
        p: list[str] = []
        if not self.request_key(headers):
            p.append("no API key (x-api-key or Authorization: Bearer)")
        if not headers.get("anthropic-version"):
            p.append("no anthropic-version header")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            p.append("model must be a non-empty string")
        elif self.model is not None and model != self.model:
            p.append(f"model is {model!r}, expected {self.model!r}")
        mt = body.get("max_tokens")
        if isinstance(mt, bool) or not isinstance(mt, int) or mt <= 0:
            p.append(f"max_tokens must be a positive integer, got {mt!r}")
        p.extend(self._check_system(body.get("system")))
        p.extend(self._check_tools(body.get("tools"), body.get("tool_choice")))
        p.extend(self._check_messages(body.get("messages")))
        return p

    @staticmethod
    def _check_system(system: Any) -> list[str]:
        if not isinstance(system, list) or not system:
            return ["system must be a list of text blocks (so it can carry cache_control)"]
        p: list[str] = []
        cached = False
        for i, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                p.append(f"system[{i}] is not a text block")
                continue
            if not isinstance(block.get("text"), str) or not block["text"].strip():
                p.append(f"system[{i}].text is empty")
            cc = block.get("cache_control")
            if cc is not None:
                if cc.get("type") != "ephemeral":
                    p.append(f"system[{i}].cache_control.type must be 'ephemeral'")
                else:
                    cached = True
        if not cached:
            p.append("no system block carries cache_control {'type': 'ephemeral'}")
        return p

    def _check_tools(self, tools: Any, choice: Any) -> list[str]:
        if not isinstance(tools, list) or not tools:
            return ["tools must be a non-empty list"]
        p: list[str] = []
        names: list[str] = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                p.append(f"tools[{i}] is not an object")
                continue
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                p.append(f"tools[{i}].name is missing")
            else:
                names.append(name)
            if not isinstance(tool.get("description"), str) or not tool["description"]:
                p.append(f"tools[{i}].description is missing")
            schema = tool.get("input_schema")
            if not isinstance(schema, dict) or schema.get("type") != "object":
                p.append(f"tools[{i}].input_schema must be a JSON schema of type object")
                continue
            props = schema.get("properties") or {}
            required = schema.get("required") or []
            for field in self.required_fields:
                if field not in props:
                    p.append(f"tools[{i}].input_schema.properties lacks {field!r}")
                if field not in required:
                    p.append(f"tools[{i}].input_schema.required lacks {field!r}")
        if not isinstance(choice, dict) or choice.get("type") != "tool":
            p.append("tool_choice must force a tool: {'type': 'tool', 'name': ...}")
        elif choice.get("name") not in names:
            p.append(f"tool_choice names {choice.get('name')!r}, which is not an offered tool")
        return p

    def _check_messages(self, messages: Any) -> list[str]:
        if not isinstance(messages, list) or len(messages) != 1:
            return ["messages must hold exactly one user turn"]
        msg = messages[0]
        if not isinstance(msg, dict) or msg.get("role") != "user":
            return ["messages[0] must be a user turn"]
        content = msg.get("content")
        if not isinstance(content, list) or not content:
            return ["messages[0].content must be a list of blocks"]
        p: list[str] = []
        texts = images = 0
        for i, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                if isinstance(block.get("text"), str) and block["text"].strip():
                    texts += 1
                else:
                    p.append(f"content[{i}] is an empty text block")
            elif kind == "image":
                src = block.get("source") or {}
                media = src.get("media_type")
                if src.get("type") != "base64" or media not in IMAGE_MAGIC:
                    p.append(f"content[{i}] must be a base64 image/jpeg or image/png source")
                    continue
                try:
                    raw = base64.b64decode(src.get("data") or "", validate=True)
                except (binascii.Error, ValueError):
                    p.append(f"content[{i}] data is not valid base64")
                    continue
                if not raw.startswith(IMAGE_MAGIC[media]):
                    p.append(f"content[{i}] data is not a {media}")
                    continue
                images += 1
            else:
                p.append(f"content[{i}] has unexpected type {kind!r}")
        if not texts:
            p.append("the user turn has no text block (the event's metadata)")
        if self.images_required and not images:
            p.append("the user turn has no image block")
        return p


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeAnthropic(latency_s=args.latency, port=args.port)
    if args.overloaded:
        fake.default = Reply.overloaded()
    url = await fake.start()
    print(f"url={url}", flush=True)
    await until_signalled(fake)


async def until_signalled(fake: FakeAnthropic) -> None:
    """Serve (already started) until SIGINT or SIGTERM, then stop: a fake run as a process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fake Anthropic Messages API on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--overloaded", action="store_true", help="answer 529 to everything")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
