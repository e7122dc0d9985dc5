"""POST /v1/completions (OpenAI)."""
from __future__ import annotations

from fastapi import APIRouter

from loraplex.api.deps import GenerationContextDep
from loraplex.api.schemas.openai import CompletionRequest, CompletionResponse
from loraplex.api.serving import completions
from loraplex.api.serving.sse import STREAM_RESPONSES, SSEResponse

router = APIRouter(tags=["openai"])


@router.post("/v1/completions", response_model=CompletionResponse, responses=STREAM_RESPONSES)
async def create_completion(body: CompletionRequest, ctx: GenerationContextDep) -> CompletionResponse | SSEResponse:
    return await completions.create_completion(body, ctx)
