"""TGI / LoRAX generation: /generate, /generate_stream, and `/` (what `text_generation.Client` posts to).

Errors keep the one OpenAI envelope rather than TGI's `{"error": str, "error_type": str}`. The HF client
still raises the right class: `parse_error` reads `payload["error"]` (our envelope object, which becomes
the exception message) and, without `error_type`, picks the class from the status: 400 BadRequestError,
404 NotFoundError, 429 RateLimitExceededError, anything else UnknownError.
"""
from __future__ import annotations

from fastapi import APIRouter

from loraplex.api.deps import GenerationContextDep
from loraplex.api.schemas.tgi import GenerateRequest, GenerateResponse
from loraplex.api.serving import tgi
from loraplex.api.serving.sse import STREAM_ONLY_RESPONSES, STREAM_RESPONSES, SSEResponse

router = APIRouter(tags=["tgi"])


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True)
async def generate(body: GenerateRequest, ctx: GenerationContextDep) -> GenerateResponse:
    return await tgi.generate(body, ctx)


@router.post("/generate_stream", response_class=SSEResponse, responses=STREAM_ONLY_RESPONSES)
async def generate_stream(body: GenerateRequest, ctx: GenerationContextDep) -> SSEResponse:
    return await tgi.generate_stream(body, ctx)


@router.post("/", response_model=list[GenerateResponse], response_model_exclude_none=True, responses=STREAM_RESPONSES)
async def compat_generate(body: GenerateRequest, ctx: GenerationContextDep) -> list[GenerateResponse] | SSEResponse:
    """TGI's compat route: `stream` in the body picks SSE or a one-element list."""
    if body.stream:
        return await tgi.generate_stream(body, ctx)
    return [await tgi.generate(body, ctx)]
