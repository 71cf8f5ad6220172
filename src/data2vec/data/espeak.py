"""A minimal ctypes binding to eSpeak NG (shipped by the ``espeakng-loader`` wheel) for demo speech.

Only the synchronous C API is used: initialise once per process, register a callback that collects
the int16 samples, pick a voice and rate/pitch, synthesise a string. eSpeak keeps global state, so
one process synthesises one utterance at a time; parallelism comes from a process pool.
"""

from __future__ import annotations

import ctypes

import numpy as np

from data2vec.errors import DataError

AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: samples go to the callback, Synth blocks
POS_CHARACTER = 1  # espeak_POSITION_TYPE
CHARS_UTF8 = 1  # espeak_Synth flags
PARAM_RATE = 1  # espeak_PARAMETER: words per minute
PARAM_PITCH = 3  # espeak_PARAMETER: 0..99 base pitch

# int callback(short *wav, int numsamples, espeak_EVENT *events); return 0 to continue.
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class ESpeak:
    """One initialised eSpeak NG engine (one per process); ``synth`` returns int16 samples."""

    def __init__(self) -> None:
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                                ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                           ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                           ctypes.c_void_p, ctypes.c_void_p]
        data_path = espeakng_loader.get_data_path().encode()
        self.sample_rate = self._lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
        if self.sample_rate <= 0:
            raise DataError(f"eSpeak NG failed to initialise with data at {data_path.decode()}")
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes frees the trampoline when the Python object dies.
        self._callback = _CALLBACK(self._collect)
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes.POINTER(ctypes.c_short), num_samples: int,
                 events: int | None) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int,
              rand_seed: int = 0) -> np.ndarray:
        """Speak `text` with `voice` (``en-us+f3``), `rate` wpm, `pitch` 0..99 -> int16 (S,).

        `rand_seed` seeds eSpeak's noise generator (otherwise seeded from the clock).
        """
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise DataError(f"eSpeak NG has no voice {voice!r}")
        self._lib.espeak_SetParameter(PARAM_RATE, rate, 0)
        self._lib.espeak_SetParameter(PARAM_PITCH, pitch, 0)
        self._lib.espeak_ng_SetRandSeed(rand_seed)
        encoded = text.encode()
        self._chunks = []
        err = self._lib.espeak_Synth(encoded, len(encoded) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8,
                                     None, None)
        if err != 0:
            raise DataError(f"eSpeak NG failed (error {err}) on {text!r} with voice {voice!r}")
        if not self._chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self._chunks).astype(np.int16, copy=False)


_ENGINE: ESpeak | None = None


def engine() -> ESpeak:
    """The process's eSpeak engine, initialised on first use."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = ESpeak()
    return _ENGINE
