"""A request with several prompts (the legacy completions' list `prompt`): each prompt is its own backend request,
with its own prefix-cache reuse and admission, and their outputs read as one request's, choice i of prompt p as
choice p * n + i.

All prompts or none: no output is handed on before every prompt's first one arrived. A prompt refused (400, 429,
503) or failing before that makes the whole request that error: the other prompts are aborted at once (closing a
backend iterator aborts its request), then the refusal is the first output, which the caller turns into the
response's error. Closing the merged iterator (the response ended, the client left) closes every prompt's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncGenerator, AsyncIterator

from cluster.api.backend import GenerationBackend
from cluster.engine.outputs import RequestOutput
from cluster.engine.sampling_params import SamplingParams


def generate_prompts(backend: GenerationBackend, request_id: str, prompts: list[list[int]], params: SamplingParams,
                     stream: bool = True) -> AsyncIterator[RequestOutput]:
    """The outputs of every prompt's `params.n` choices, as `backend.generate` gives one prompt's (a lone prompt's
    are exactly those)."""
    if len(prompts) == 1:
        return backend.generate(request_id, prompts[0], params, stream)
    sources = [backend.generate(f"{request_id}-{p}", prompt, params, stream) for p, prompt in enumerate(prompts)]
    return _merged(sources, params.n)


async def _merged(sources: list[AsyncIterator[RequestOutput]], n: int) -> AsyncGenerator[RequestOutput, None]:
    reading: dict[asyncio.Future[RequestOutput | None], int] = {}  # each prompt's next output being read -> prompt

    def read(p: int) -> None:
        reading[asyncio.ensure_future(anext(sources[p], None))] = p  # None: prompt p has ended

    def as_choice(out: RequestOutput, p: int) -> RequestOutput:
        return dataclasses.replace(out, index=p * n + out.index)

    try:
        for p in range(len(sources)):
            read(p)
        firsts: dict[int, RequestOutput] = {}
        while reading:
            done, _ = await asyncio.wait(reading, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=reading.__getitem__):
                p, out = reading.pop(task), task.result()
                if out is None:  # a prompt that ended without any output: so does the request (the caller says so)
                    return
                if out.failed:
                    yield as_choice(out, p)
                    return
                firsts[p] = out
        for p in sorted(firsts):
            read(p)
            yield as_choice(firsts[p], p)
        while reading:
            done, _ = await asyncio.wait(reading, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=reading.__getitem__):
                p, out = reading.pop(task), task.result()
                if out is not None:
                    read(p)
                    yield as_choice(out, p)
    finally:
        for task in reading:
            task.cancel()
        await asyncio.gather(*reading, return_exceptions=True)
        for source in sources:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()
