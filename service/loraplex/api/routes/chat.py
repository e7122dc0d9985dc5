"""POST /v1/chat/completions (OpenAI)."""
from __future__ import annotations

from fastapi import APIRouter

from loraplex.api.deps import GenerationContextDep
from loraplex.api.schemas.openai import ChatCompletionRequest, ChatCompletionResponse
from loraplex.api.serving import chat
from loraplex.api.serving.sse import STREAM_RESPONSES, SSEResponse

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAM_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest, ctx: GenerationContextDep
) -> ChatCompletionResponse | SSEResponse:
    return await chat.create_chat_completion(body, ctx)
