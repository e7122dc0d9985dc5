"""Engine logprobs (token id, logprob pairs) -> the wire shapes: chat's `logprobs.content` and the legacy
completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`.

A token's text is its own decode. `text_offset` indexes the choice's text (with echo, the prompt's tokens
come first, starting at 0); the first prompt token has no logprob (nothing predicts it): null, as OpenAI.
"""
from __future__ import annotations

from functools import lru_cache

from loraplex.api.schemas.openai import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from loraplex.engine.types import TopLogprobs


MAX_CACHED_TOKEN_TEXTS = 1 << 17


@lru_cache(maxsize=4)
def token_texts(tokenizer) -> TokenTexts:
    """The one TokenTexts of this tokenizer."""
    return TokenTexts(tokenizer)


class TokenTexts:
    """Decodes single tokens, each once per tokenizer (shared by every response: decoding is most of what
    logprobs cost). `width` is what the token adds to the choice's text, which (like the detokenizer)
    leaves special tokens out."""

    def __init__(self, tokenizer):
        self._decode = lru_cache(maxsize=MAX_CACHED_TOKEN_TEXTS)(lambda token_id: tokenizer.decode([token_id]))
        self._width = lru_cache(maxsize=MAX_CACHED_TOKEN_TEXTS)(
            lambda token_id: len(tokenizer.decode([token_id], skip_special_tokens=True)))

    def __call__(self, token_id: int) -> str:
        return self._decode(token_id)

    def width(self, token_id: int) -> int:
        return self._width(token_id)


def chat_logprobs(texts: TokenTexts, token_ids: list[int], logprobs: list[float],
                  top: list[TopLogprobs]) -> ChatLogprobs:
    content = []
    for token_id, logprob, alternatives in zip(token_ids, logprobs, top):
        text = texts(token_id)
        content.append(TokenLogprob(
            token=text, logprob=logprob, bytes=list(text.encode()),
            top_logprobs=[TopLogprob(token=texts(t), logprob=lp, bytes=list(texts(t).encode())) for t, lp in alternatives],
        ))
    return ChatLogprobs(content=content)


def completion_logprobs(texts: TokenTexts, token_ids: list[int], logprobs: list[float | None],
                        top: list[TopLogprobs | None], text_offset: int = 0) -> CompletionLogprobs:
    """Per token: its text, logprob, {text: logprob} of the alternatives (the chosen token included, as
    OpenAI does) and where it starts in the choice's text."""
    result = CompletionLogprobs()
    for token_id, logprob, alternatives in zip(token_ids, logprobs, top):
        text = texts(token_id)
        result.tokens.append(text)
        result.token_logprobs.append(logprob)
        result.text_offset.append(text_offset)
        text_offset += texts.width(token_id)
        if alternatives is None:
            result.top_logprobs.append(None)
            continue
        by_text = {texts(t): lp for t, lp in alternatives}
        by_text.setdefault(text, logprob)
        result.top_logprobs.append(by_text)
    return result


def echoed_prompt(prompt_ids: list[int], prompt_logprobs: list[tuple[float, TopLogprobs]] | None
                  ) -> tuple[list[float | None], list[TopLogprobs | None]]:
    """The prompt's logprobs in completion order: none for the first token, then each token's."""
    pairs = prompt_logprobs or []
    return [None] + [lp for lp, _ in pairs], [None] + [top for _, top in pairs]


def merge(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens, token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs, text_offset=first.text_offset + second.text_offset,
    )
