"""Request bodies of the OpenAI-compatible routes (pydantic), and the error shape every failure uses.

The bodies follow OpenAI's API reference field by field. Unknown fields are refused the way OpenAI
refuses them ("Unrecognized request argument supplied: x"), so a typo such as `temprature` is a 400
instead of a silently ignored setting; fields OpenAI defines that change nothing here (`user`,
`metadata`, `store`, `service_tier`) are accepted. Fields Muse cannot honour (tools, logit_bias,
JSON response formats, `suffix`) are refused with a message saying so rather than ignored.

Beyond OpenAI, the engine's other sampling settings are accepted under vLLM's names: top_k, min_p,
repetition_penalty, min_tokens, stop_token_ids, ignore_eos.

`ApiError` carries an HTTP status and the OpenAI error object
`{"error": {"message", "type", "param", "code"}}`; the app turns it (and every validation failure)
into that JSON, so clients' SDKs raise their matching exception classes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

# ---- errors -------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error in OpenAI's shape. `headers` go on the response (Retry-After, rate-limit headers)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def validation_error(e: ValidationError) -> ApiError:
    """pydantic's first complaint as OpenAI words it (400, the client's field name as `param`)."""
    err = e.errors()[0]
    # pydantic names union branches in the location ("str", "list[str]"); the client's field is what matters
    param = ""
    for p in err.get("loc", ()):
        if isinstance(p, int):
            param += f"[{p}]"
        elif not (p.startswith(("function-", "constrained-")) or p[:1].islower() and ("[" in p or p in _TYPES)):
            param += ("." if param else "") + p
    param = param or None
    if err.get("type") == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param)
    if err.get("type") == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param)
    msg = err.get("msg", "invalid value")
    return invalid(f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}.", param)


_TYPES = ("str", "int", "bool", "float", "dict", "list", "none")


# ---- shared fields ------------------------------------------------------------------------------------

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
MAX_STOP_CHARS = 256   # a stop string is matched on every streamed delta: its length bounds that work


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Common(BaseModel):
    """Fields both generation routes share."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: PositiveInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: StrictInt | None = None
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    # the engine's other settings, under vLLM's names
    top_k: StrictInt | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    ignore_eos: StrictBool | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if v is not None and any(len(s) > MAX_STOP_CHARS for s in v):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters long")
        return v

    def unsupported(self) -> None:
        """Raise a 400 for settings Muse cannot honour (instead of quietly ignoring them)."""
        if self.logit_bias:
            raise invalid("logit_bias is not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")


# ---- /v1/completions ----------------------------------------------------------------------------------


class CompletionRequest(_Common):
    prompt: Any = None
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    best_of: PositiveInt | None = None
    suffix: StrictStr | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (each a string or a token-id list)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p, list) and p:
            if all(isinstance(x, str) for x in p):
                return list(p)
            if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
                return [list(p)]
            if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
                   for x in p):
                return [list(x) for x in p]
        if p is None:
            raise invalid("prompt is required", "prompt")
        raise invalid("prompt must be a string, a list of strings, a list of token ids, or a list of "
                      "non-empty lists of token ids", "prompt")

    def unsupported(self) -> None:
        super().unsupported()
        if self.suffix:
            raise invalid("suffix (insertion) is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid("best_of other than n is not supported by this server; drop it or set it to n",
                          "best_of")


# ---- /v1/chat/completions -----------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")   # name, tool_call_id, refusal, ... are checked below
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[StrictStr] | None = None
    reasoning_effort: StrictStr | None = None

    def unsupported(self) -> None:
        super().unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise invalid(f"{name} (function calling) is not supported by this server", name)
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise invalid("tool_choice / function_call are not supported by this server", "tool_choice")
        if self.response_format is not None and self.response_format.type != "text":
            raise invalid(f"response_format {self.response_format.type!r} is not supported; only 'text'",
                          "response_format")
        if self.modalities and self.modalities != ["text"]:
            raise invalid("only the text modality is supported", "modalities")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise invalid("max_tokens and max_completion_tokens differ; send one of them", "max_tokens")

    def plain_messages(self) -> list[dict]:
        """[{"role", "content": str}] for the chat renderer; content parts must be text."""
        out = []
        for i, m in enumerate(self.messages):
            if m.role not in ("system", "user", "assistant", "developer"):
                raise invalid(f"messages[{i}].role {m.role!r} is not supported; use system, user or assistant",
                              f"messages[{i}].role")
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise invalid(f"messages[{i}].content[{j}] is of type {part.type!r}; this model reads "
                                      "text parts only", f"messages[{i}].content[{j}].type")
                    texts.append(part.text)
                content = "".join(texts)
            if content is None:
                raise invalid(f"messages[{i}].content is required", f"messages[{i}].content")
            # OpenAI's newer "developer" role is the system role under another name
            out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        if not out:
            raise invalid("messages must hold at least one message", "messages")
        return out


# ---- /tokenize, /detokenize ---------------------------------------------------------------------------


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True       # accepted for vLLM compatibility; Muse adds no BOS to prompts
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]
