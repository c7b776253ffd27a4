"""Synthetic spoken digits and commands for the speech-LM quickstart, made offline with eSpeak NG.

Training a speech-LM from scratch needs many short clips with exact transcripts, and a
quickstart must not download a corpus. eSpeak NG (bundled by the `espeakng-loader` wheel)
is a formant synthesiser: robotic, but fast (hundreds of clips a second on one core), small,
and able to vary speaker (voice variants such as ``en-us+f2``), accent, speed and pitch. So
the task is "Transcribe the audio." over strings of 2-5 digits ("three one four") or 1-3
command words ("stop left"), spoken by `TRAIN_VOICES`; `HELD_OUT_VOICES` use timbres that
training never hears, for an "unseen voices" report.

Reproducible: the same (num_records, seed, voices, exclude) give the same records and
byte-identical WAV files. That takes care, because eSpeak keeps synthesis state (the phase
of its pitch flutter, a gain control, filter memories) in C static variables that no API
call resets, so a clip's samples depend on everything the library said before it in the
process. `spoken_digits` therefore loads a fresh private copy of the library for each call
and seeds eSpeak's noise generators per clip; a lone `synthesize` call is deterministic
only up to that history.
"""

from __future__ import annotations

import _ctypes
import ctypes
import hashlib
import io
import json
import random
import shutil
import tempfile
import threading
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import espeakng_loader
import numpy as np
import soundfile
import soxr

from shipyard.fsutil import publish, write_text_atomic

SAMPLE_RATE = 16_000
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("stop", "go", "left", "right", "up", "down", "yes", "no", "on", "off", "open", "close")
# "base voice+variant": the base sets the accent (en = British, en-us, en-029 = Caribbean, ...),
# the variant the speaker (pitch range, formants, breathiness). Training hears variants m1-m5 and
# f1-f4; the held-out voices use m6, m7 and f5, which it never hears, on accents it does.
TRAIN_VOICES: tuple[str, ...] = (
    "en-us+m1",
    "en-us+m3",
    "en-us+f1",
    "en-us+f3",
    "en+m2",
    "en+f2",
    "en-gb-x-rp+m4",
    "en-gb-x-rp+f4",
    "en-gb-scotland+m5",
    "en-029+f2",
    "en-us-nyc+m3",
)
HELD_OUT_VOICES: tuple[str, ...] = ("en-us+m7", "en+f5", "en-gb-x-rp+m6")

PROMPT = "Transcribe the audio."
P_COMMANDS = 0.3
DIGIT_WORDS, COMMAND_WORDS = (2, 5), (1, 3)  # inclusive ranges of words per utterance
RATES, PITCHES, PITCH_RANGES = (140, 190), (30, 70), (30, 70)  # words/min and eSpeak's 0-100 scales
SNR_DB = 30.0
MAX_DRAWS = 1000  # transcript draws per record before `exclude` is taken to cover everything

# From espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it, missing data files make espeak_Initialize call exit()
_RATE, _PITCH, _RANGE = 1, 3, 4
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0
# int cb(short *wav, int numsamples, espeak_EVENT *events); wav is NULL when synthesis ends.
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)


class _Espeak:
    """A private, freshly initialised copy of libespeak-ng.

    A copy rather than the wheel's file: dlopen of a path already loaded returns the loaded
    instance, whose static state may be dirty (ours, or another package's, e.g. a phonemizer).
    """

    def __init__(self) -> None:
        original = Path(espeakng_loader.get_library_path())
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            copy = Path(tmp) / original.name
            shutil.copyfile(original, copy)
            lib = ctypes.CDLL(str(copy), mode=ctypes.RTLD_LOCAL)  # stays mapped once the file is deleted
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,  # text
            ctypes.c_size_t,  # size
            ctypes.c_uint,  # position
            ctypes.c_int,  # position_type
            ctypes.c_uint,  # end_position
            ctypes.c_uint,  # flags
            ctypes.c_void_p,  # unique_identifier
            ctypes.c_void_p,  # user_data
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.argtypes = []
        lib.espeak_Terminate.restype = ctypes.c_int
        self.set_rand_seed = getattr(lib, "espeak_ng_SetRandSeed", None)  # espeak-ng >= 1.52
        if self.set_rand_seed is not None:
            self.set_rand_seed.argtypes = [ctypes.c_long]
            self.set_rand_seed.restype = ctypes.c_int
        self.lib = lib
        self.srand = _libc_srand()
        self.chunks: list[bytes] = []
        self.callback = _SynthCallback(self._collect)  # referenced here: eSpeak keeps only the raw pointer
        self.native_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), _INITIALIZE_DONT_EXIT
        )
        if self.native_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (data path {espeakng_loader.get_data_path()})")
        lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav: int | None, numsamples: int, events: int | None) -> int:
        if wav and numsamples > 0:
            self.chunks.append(ctypes.string_at(wav, 2 * numsamples))
        return 0  # 0 = continue

    def speak(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int) -> np.ndarray:
        """int16 samples at `native_rate`."""
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise ValueError(f"eSpeak has no voice {voice!r}")
        for parameter, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
            if lib.espeak_SetParameter(parameter, value, 0) != _EE_OK:
                raise ValueError(f"eSpeak rejected parameter {parameter} = {value}")
        # eSpeak's noise (breath, frication) draws on its own generator and on libc's rand().
        if self.set_rand_seed is not None:
            self.set_rand_seed(seed)
        if self.srand is not None:
            self.srand(seed)
        self.chunks.clear()
        data = text.encode() + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != _EE_OK or lib.espeak_Synchronize() != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed ({status}) for {text!r} in voice {voice!r}")
        samples = np.frombuffer(b"".join(self.chunks), dtype=np.int16)
        self.chunks.clear()
        if samples.size == 0:
            raise RuntimeError(f"eSpeak produced no audio for {text!r} in voice {voice!r}")
        return samples

    def close(self) -> None:
        self.lib.espeak_Terminate()
        dlclose = getattr(_ctypes, "dlclose", None)  # POSIX only
        if dlclose is not None:
            dlclose(self.lib._handle)


def _libc_srand() -> ctypes._CFuncPtr | None:
    try:
        srand = ctypes.CDLL(None).srand
    except (OSError, AttributeError):  # no process-wide symbol table (Windows): rand() stays unseeded
        return None
    srand.argtypes, srand.restype = [ctypes.c_uint], None
    return srand


# eSpeak is one global state machine, not thread-safe: every use goes through this lock.
_LOCK = threading.RLock()
_engine: _Espeak | None = None


def _fresh_engine() -> _Espeak:
    global _engine
    with _LOCK:
        if _engine is not None:
            _engine.close()
            _engine = None
        _engine = _Espeak()
        return _engine


def _current_engine() -> _Espeak:
    with _LOCK:
        return _engine if _engine is not None else _fresh_engine()


def _speak(engine: _Espeak, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int) -> np.ndarray:
    pcm = engine.speak(text, voice, rate, pitch, pitch_range, seed)
    audio = soxr.resample(pcm.astype(np.float32) / 32768.0, engine.native_rate, SAMPLE_RATE)
    return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)


def synthesize(text: str, voice: str, rate: int, pitch: int, pitch_range: int = 50, seed: int = 0) -> np.ndarray:
    """`text` spoken by eSpeak voice `voice` at `rate` words/min and `pitch` (0-100): float32 mono at SAMPLE_RATE.

    The samples also depend on what this process synthesised before (see the module docstring);
    `spoken_digits` is the byte-reproducible entry point.
    """
    with _LOCK:
        return _speak(_current_engine(), text, voice, rate, pitch, pitch_range, seed)


def _transcript(rng: random.Random) -> str:
    if rng.random() < P_COMMANDS:
        words, count = COMMANDS, rng.randint(*COMMAND_WORDS)
    else:
        words, count = DIGITS, rng.randint(*DIGIT_WORDS)
    return " ".join(rng.choice(words) for _ in range(count))


def _record_rng(seed: int, index: int) -> random.Random:
    # One generator per record, so record k is drawn the same whatever num_records is.
    return random.Random(seed * 1_000_003 + index)


def _generate(
    num_records: int, seed: int, clip_dir: Path, voices: Sequence[str], exclude: set[str] | None
) -> list[dict]:
    """Write clip_dir/NNNNN.wav for each record; records name them as clips/NNNNN.wav."""
    if not voices:
        raise ValueError("no voices given")
    exclude = exclude or set()
    records = []
    with _LOCK:
        engine = _fresh_engine()
        for k in range(num_records):
            rng = _record_rng(seed, k)
            for _ in range(MAX_DRAWS):
                text = _transcript(rng)
                if text not in exclude:
                    break
            else:
                raise ValueError(f"record {k}: {MAX_DRAWS} transcripts drawn, all in `exclude`")
            voice = rng.choice(voices)
            rate, pitch, pitch_range = rng.randint(*RATES), rng.randint(*PITCHES), rng.randint(*PITCH_RANGES)
            audio = _speak(engine, text, voice, rate, pitch, pitch_range, seed=rng.getrandbits(31))
            # Light white noise: no two clips are identical, even for the same words, voice and settings.
            noise = np.random.default_rng(rng.getrandbits(64)).standard_normal(audio.size, dtype=np.float32)
            rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
            audio = np.clip(audio + noise * (rms * 10 ** (-SNR_DB / 20)), -1.0, 1.0)
            name = f"{k:05d}.wav"
            # Through memory: soundfile's close() fsyncs a real file, which costs more than synthesis.
            wav = io.BytesIO()
            soundfile.write(wav, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
            (clip_dir / name).write_bytes(wav.getvalue())
            records.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "audio", "audio": f"clips/{name}"},
                                {"type": "text", "text": PROMPT},
                            ],
                        },
                        {"role": "assistant", "content": text},
                    ],
                    "voice": voice,
                }
            )
    return records


def spoken_digits(
    num_records: int,
    seed: int,
    out_dir: Path,
    voices: Sequence[str] = TRAIN_VOICES,
    exclude: set[str] | None = None,
) -> list[dict]:
    """Synthesize `num_records` utterances into out_dir/clips/ and return their chat records.

    Audio paths in the records are relative to `out_dir`; transcripts in `exclude` are never produced
    (pass the training transcripts when making validation data, so it holds new sequences).
    """
    clip_dir = Path(out_dir) / "clips"
    clip_dir.mkdir(parents=True, exist_ok=True)
    return _generate(num_records, seed, clip_dir, voices, exclude)


def write_dataset(
    out_dir: Path,
    num_records: int,
    seed: int,
    voices: Sequence[str] = TRAIN_VOICES,
    exclude: set[str] | None = None,
) -> Path:
    """`spoken_digits` written as out_dir/clips/ + out_dir/records.jsonl; returns the JSONL path.

    A DONE marker holding the parameters is written last and removed before any rewrite, so a
    folder left by an interrupted run is regenerated rather than reused; one with the same
    parameters is reused as is. Clips are written to a partial folder and renamed into place.
    """
    out_dir = Path(out_dir)
    jsonl, marker = out_dir / "records.jsonl", out_dir / "DONE"
    excluded = "\n".join(sorted(exclude or ()))
    params = {
        "num_records": num_records,
        "seed": seed,
        "voices": list(voices),
        "exclude_sha256": hashlib.sha256(excluded.encode()).hexdigest(),
        "espeakng_loader": version("espeakng-loader"),  # another eSpeak build speaks differently
    }
    if jsonl.is_file() and marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return jsonl
        except json.JSONDecodeError:
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    partial = out_dir / ".clips.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    records = _generate(num_records, seed, partial, voices, exclude)
    publish(partial, out_dir / "clips")
    write_text_atomic(jsonl, "".join(json.dumps(record) + "\n" for record in records))
    write_text_atomic(marker, json.dumps(params, indent=1) + "\n")
    return jsonl


# ------------------------------------------------------------------ the recipe-level tasks

HELD_OUT_BUCKETS = 8  # one transcript in 8 (by a stable hash) is held out: training never speaks it


def is_held_out(transcript: str) -> bool:
    return int(hashlib.sha256(transcript.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


def _all_transcripts() -> list[str]:
    from itertools import product

    out = []
    for words, (low, high) in ((DIGITS, DIGIT_WORDS), (COMMANDS, COMMAND_WORDS)):
        for n in range(low, high + 1):
            out.extend(" ".join(p) for p in product(words, repeat=n))
    return out


def cache_dir() -> Path:
    import os

    return Path(os.environ.get("SHIPYARD_CACHE", Path.home() / ".cache" / "shipyard")).expanduser() / "synthetic_speech"


def speech_task(split: str, num_records: int, seed: int) -> list[dict]:
    """Records of a recipe's `synthetic: spoken_digits[_heldout|_unseen_voices]` source, clips cached on disk.

    train: sequences outside the held-out bucket, training voices; heldout: sequences inside it (never
    trained on), training voices; unseen_voices: held-out sequences in voices training never hears."""
    everything = _all_transcripts()
    held = {t for t in everything if is_held_out(t)}
    exclude = held if split == "train" else set(everything) - held
    voices = HELD_OUT_VOICES if split == "unseen_voices" else TRAIN_VOICES
    import fcntl

    out_dir = cache_dir() / f"{split}-n{num_records}-s{seed}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:  # ranks of one run share the folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        jsonl = write_dataset(out_dir, num_records, seed, voices, exclude)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for r in records:  # absolute clip paths: the records are used wherever the recipe runs
        for part in r["messages"][0]["content"]:
            if part["type"] == "audio":
                part["audio"] = str(out_dir / part["audio"])
        r.pop("voice", None)
    return records
