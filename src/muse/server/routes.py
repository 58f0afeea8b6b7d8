"""The partner-facing routes, each a thin wrapper over the shared serving code (serving.py, generation.py).

    /v1/models, /v1/models/{name}     what the key may use
    /v1/completions, /v1/chat/completions
    /tokenize, /detokenize, /tokenizer_info     vLLM's utility routes (lm-eval's RemoteTokenizer reads them)

Bodies are read by the serving code (size cap, depth and Unicode checks, OpenAI's error shape), not by
FastAPI's parameter binding; `openapi_extra` still documents each body's schema for /openapi.json.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from muse.common.errors import MuseError
from muse.server.generation import ChatGeneration, CompletionGeneration
from muse.server.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, invalid
from muse.server.serving import SafeJSONResponse, Serving
from muse.server.state import AppState, ServedModel
from muse.tokenizer import render_chat, render_prompt
from muse.tokenizer.special import EOT, PAD, SPECIAL_IDS
from muse.tokenizer.text import encode_prompt


def body_doc(model: type[BaseModel]) -> dict:
    """OpenAPI for a body the route reads itself: the model's JSON schema, inlined."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


def model_card(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "muse", "max_model_len": m.max_model_len}


def openai_router(state: AppState) -> APIRouter:
    serving = Serving(state)
    completions, chat = CompletionGeneration(state), ChatGeneration(state)
    r = APIRouter()

    @r.get("/v1/models")
    async def list_models(request: Request):
        key = serving.authenticate(request)
        data = [model_card(m) for name, m in state.models.items() if key.allows_model(name)]
        return SafeJSONResponse({"object": "list", "data": data}, headers=serving.headers_for(request))

    @r.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        key = serving.authenticate(request)
        return SafeJSONResponse(model_card(serving.find_model(key, name)), headers=serving.headers_for(request))

    @r.post("/v1/completions", openapi_extra=body_doc(CompletionRequest))
    async def create_completion(request: Request):
        return await completions.handle(request)

    @r.post("/v1/chat/completions", openapi_extra=body_doc(ChatRequest))
    async def create_chat_completion(request: Request):
        return await chat.handle(request)

    @r.post("/tokenize", openapi_extra=body_doc(TokenizeRequest))
    async def tokenize(request: Request):
        key = serving.authenticate(request)
        serving.take_request(request, key).settle(0)
        body: TokenizeRequest = await serving.parse(request, TokenizeRequest)
        served = serving.find_model(key, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise invalid("send exactly one of prompt or messages", "prompt")
        if body.prompt is not None:
            ids = await serving.off_loop(encode_prompt, served.tokenizer, body.prompt)
        else:
            msgs = ChatRequest(model=served.name, messages=body.messages).plain_messages()
            try:
                if body.add_generation_prompt:
                    ids = await serving.off_loop(render_prompt, served.tokenizer, msgs)
                else:
                    ids = (await serving.off_loop(render_chat, served.tokenizer, msgs))[0]
            except MuseError as e:
                raise invalid(str(e), "messages") from None
        return SafeJSONResponse({"tokens": ids, "count": len(ids), "max_model_len": served.max_model_len},
                                headers=serving.headers_for(request))

    @r.post("/detokenize", openapi_extra=body_doc(DetokenizeRequest))
    async def detokenize(request: Request):
        key = serving.authenticate(request)
        serving.take_request(request, key).settle(0)
        body: DetokenizeRequest = await serving.parse(request, DetokenizeRequest)
        served = serving.find_model(key, body.model)
        tok = served.tokenizer
        if len(body.tokens) > state.config.max_tokenize_ids:
            raise invalid(f"tokens holds {len(body.tokens)} ids; this server detokenizes at most "
                          f"{state.config.max_tokenize_ids} per request.", "tokens")
        bad = next((t for t in body.tokens if t >= tok.vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary (0..{tok.vocab_size - 1})", "tokens")
        text = await serving.off_loop(tok.decode, body.tokens)
        return SafeJSONResponse({"prompt": text}, headers=serving.headers_for(request))

    @r.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        key = serving.authenticate(request)
        served = serving.find_model(key, request.query_params.get("model"))
        return SafeJSONResponse({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT,
                                 "pad_token": PAD, "unk_token": None, "chat_template": served.tokenizer.chat_template,
                                 "model_max_length": served.max_model_len, "vocab_size": served.tokenizer.vocab_size,
                                 "special_tokens": SPECIAL_IDS}, headers=serving.headers_for(request))

    return r
