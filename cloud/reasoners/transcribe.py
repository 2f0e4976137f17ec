"""Speech to text for the reasoners: the LLM reads no audio, so a clip reaches it as a transcript.

The recognizer is PocketSphinx (``pip install pocketsphinx``, in the ``cloud`` extra): it runs
offline on the CPU and its wheel bundles a US English acoustic model, language model and
dictionary, so nothing is downloaded at run time. It is a weak recognizer (an 8 kHz phone-line
clip comes out garbled); the transcript is given to the model as "what an offline recognizer
heard", never as fact. A Decoder is not thread-safe and slow to build (~0.5 s), so one lives on
its own thread and clips are transcribed one at a time.
"""

from __future__ import annotations

import asyncio
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

import numpy as np

from edgekeeper.cloud.reasoners.media import read_wav
from edgekeeper.errors import ConfigError
from edgekeeper.log import get_logger

log = get_logger(__name__)

RATE = 16000
MAX_SECONDS = 30.0  # longer clips are cut: an event's clip is a few seconds


class Transcriber(Protocol):
    name: str

    async def transcribe(self, wav: bytes) -> str | None:
        """The words heard ("" for none), or None when the clip cannot be read."""
        ...

    async def close(self) -> None: ...


class PocketSphinxTranscriber:
    name = "pocketsphinx"

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pocketsphinx")
        self._decoder: Any = None

    def _decode(self, wav: bytes) -> str | None:
        import soxr
        from pocketsphinx import Decoder

        try:
            pcm, rate = read_wav(wav)
        except ValueError:
            return None
        pcm = pcm[: int(MAX_SECONDS * rate)]
        if rate != RATE:
            pcm = soxr.resample(pcm, rate, RATE)
        data = (np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        if self._decoder is None:
            self._decoder = Decoder(loglevel="FATAL")
        dec = self._decoder
        dec.start_utt()
        dec.process_raw(data, full_utt=True)
        dec.end_utt()
        hyp = dec.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""

    async def transcribe(self, wav: bytes) -> str | None:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._decode, wav)
        except Exception as err:  # a recognizer failure must not fail the event
            log.warning("transcribe.failed", error=str(err))
            return None

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def pocketsphinx_available() -> bool:
    return importlib.util.find_spec("pocketsphinx") is not None


def make_transcriber(kind: Literal["auto", "pocketsphinx", "none"]) -> Transcriber | None:
    """``reasoner.transcriber``: auto -> pocketsphinx if installed, else none."""
    if kind == "none":
        return None
    if not pocketsphinx_available():
        if kind == "auto":
            return None
        raise ConfigError(
            "reasoner.transcriber = 'pocketsphinx' but pocketsphinx is not installed",
            fix="pip install 'edgekeeper[cloud]' (or pocketsphinx), or set transcriber = 'none'",
        )
    return PocketSphinxTranscriber()
