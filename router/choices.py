"""Several choices per request (``n``), their usage, and logprobs in OpenAI's two wire formats.

Each choice is its own ``Generation`` on the workers (vLLM does the same: ``n`` child requests,
the child ``i`` of a seeded request seeded with ``seed + i``), so the prompt's KV is computed once
and found in the prefix cache by the others. Usage counts the prompt once and sums the
completions, as OpenAI and vLLM report it.

Logprobs come from the workers per sampled token (``pb.TokenLogprob``); this module only names
the tokens: chat answers use ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``,
completions the legacy ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tusk.router.dispatch import Generation
from tusk.router.tokenizer import ModelTokenizer

from tusk.protocol import pb

Event = tuple[int, str, str | None]  # (choice index, text delta, finish reason)


def usage(gens: list[Generation]) -> dict[str, Any]:
    prompt = len(gens[0].req.prompt_ids)
    completion = sum(g.completion_tokens for g in gens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": gens[0].cached_tokens},
    }


async def merge(sources: list[AsyncIterator[tuple[str, str | None]]]) -> AsyncIterator[Event]:
    """The choices' (text, finish) events, each tagged with its index, in arrival order.

    One choice passes straight through. Several are pumped by one task each into a queue, so a
    slow choice never holds back the others; closing the merged stream closes every source
    (which cancels their worker requests)."""
    if len(sources) == 1:
        async with contextlib.aclosing(sources[0]) as only:
            async for text, finish in only:
                yield 0, text, finish
        return
    queue: asyncio.Queue[tuple[int, tuple[str, str | None] | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, source: AsyncIterator[tuple[str, str | None]]) -> None:
        try:
            async with contextlib.aclosing(source):  # type: ignore[type-var]
                async for event in source:
                    await queue.put((index, event, None))
            await queue.put((index, None, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(sources)]
    try:
        running = len(tasks)
        while running:
            index, event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                running -= 1
                continue
            yield index, event[0], event[1]
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


class LogprobCursor:
    """Hands out each choice's logprobs once: the entries that arrived since the last call."""

    def __init__(self, gens: list[Generation]) -> None:
        self._gens = gens
        self._seen = [0] * len(gens)

    def take(self, index: int) -> list[tuple[int, pb.TokenLogprob]]:
        entries = self._gens[index].logprobs
        new = entries[self._seen[index] :]
        self._seen[index] = len(entries)
        return new


def _token_text(tok: ModelTokenizer, token_id: int) -> str:
    return tok.tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok: ModelTokenizer, entries: list[tuple[int, pb.TokenLogprob]]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for token_id, entry in entries:
        top = [item(t, lp) for t, lp in zip(entry.top_token_ids, entry.top_logprobs, strict=True)]
        content.append({**item(token_id, entry.logprob), "top_logprobs": top})
    return {"content": content}


def completion_logprobs(
    tok: ModelTokenizer, entries: list[tuple[int, pb.TokenLogprob]], offset: int = 0
) -> dict[str, Any]:
    """Legacy completions logprobs; ``offset`` is where the first token's text starts."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, entry in entries:
        text = _token_text(tok, token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        top_logprobs.append(
            {_token_text(tok, t): lp for t, lp in zip(entry.top_token_ids, entry.top_logprobs, strict=True)}
        )
        text_offset.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
