"""The embedded default corpus: an AN4-style corpus synthesised offline with eSpeak NG.

Source: generated on the fly, nothing is downloaded. Prompts imitate the AN4 census database
(spelled letters, digit strings, numbers such as "TWENTY FIVE", dates, and the commands GO, STOP,
START, ENTER, ERASE, RUBOUT, REPEAT, HELP, YES, NO); audio is rendered by the eSpeak NG library
(``libespeak-ng.so`` and ``espeak-ng-data`` of the ``espeakng-loader`` wheel, driven through
ctypes), resampled from 22.05 kHz to 16 kHz and augmented per utterance (speaking rate, pitch,
pitch range, word gap, leading/trailing silence, gain, additive white/pink/brown noise at
15-30 dB SNR).

Licence: eSpeak NG is GPL-3.0-or-later; the audio it produces is not a derivative work and the
generated corpus carries no restriction. The handwritten lexicon uses CMUdict-style ARPAbet
(AN4 phone set).

Speakers are eSpeak voices ``<language>+<variant>`` (e.g. ``en-us+f3``). Train and test are
speaker-disjoint and even variant-disjoint: train uses variants :data:`TRAIN_VARIANTS` with
languages :data:`TRAIN_LANGUAGES`; test uses variants :data:`TEST_VARIANTS` (never heard in
training) with :data:`TEST_LANGUAGES`.

Output of :func:`prepare_mini` (``output_dir``)::

    wav/{train,test}/mini-{split}-NNNNN.wav        16 kHz, 16-bit PCM, mono
    mini_recordings_{train,test}.jsonl.gz          lhotse RecordingSet
    mini_supervisions_{train,test}.jsonl.gz        lhotse SupervisionSet (text, speaker=voice)
    mini_lexicon.txt                               Kaldi lexicon (AN4 phones + <sil>, <UNK>)
    .mini.done                                     marker with the configuration

Determinism: utterance ``i`` of a split draws its prompt, voice, eSpeak parameters and noise
from generators seeded with ``(seed, split, i)``, and eSpeak NG is reloaded for every utterance
(see :class:`Espeak`), so the corpus is a function of ``(num_train, num_test, seed)`` and the
eSpeak NG build, and the first ``n`` utterances do not depend on how many follow.

Cost (measured on 2 shared CPU cores): the default 600 + 150 utterances (0.48 h of audio) take
about 13 s of CPU (23-27 s wall on a loaded machine); ``--small`` takes about 1 s.
"""

import _ctypes
import contextlib
import ctypes
import logging
import random
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from k2quant.data.lexicon import SIL_PHONE, SIL_WORD, UNK_PHONE, UNK_WORD, Lexicon, write_lexicon
from k2quant.data.manifests import (
    lexicon_path,
    read_done,
    recordings_path,
    save_manifest,
    supervisions_path,
    write_done,
)
from k2quant.utils.deps import optional_import
from k2quant.utils.io import PathLike, atomic_open

log = logging.getLogger(__name__)

SAMPLING_RATE = 16000
DEFAULT_NUM_TRAIN = 600
DEFAULT_NUM_TEST = 150
#: ``prepare_mini(..., small=True)`` / ``--small``: the smoke corpus of the test suite.
SMALL_NUM_TRAIN = 48
SMALL_NUM_TEST = 12
_VERSION = 1  # bump when the generator changes, so that old corpora are regenerated

TRAIN_LANGUAGES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3")
TEST_LANGUAGES = ("en-us", "en")
TEST_VARIANTS = ("m6", "m7", "f4", "f5")

# ---------------------------------------------------------------------------------------------
# Vocabulary and lexicon (CMUdict-style ARPAbet, AN4 phone set)
# ---------------------------------------------------------------------------------------------
_LEXICON_TEXT = """
A EY
B B IY
C S IY
D D IY
E IY
F EH F
G JH IY
H EY CH
I AY
J JH EY
K K EY
L EH L
M EH M
N EH N
O OW
P P IY
Q K Y UW
R AA R
S EH S
T T IY
U Y UW
V V IY
W D AH B AH L Y UW
X EH K S
Y W AY
Z Z IY
ZERO Z IH R OW
ZERO Z IY R OW
OH OW
ONE W AH N
TWO T UW
THREE TH R IY
FOUR F AO R
FIVE F AY V
SIX S IH K S
SEVEN S EH V AH N
EIGHT EY T
NINE N AY N
TEN T EH N
ELEVEN IH L EH V AH N
ELEVEN IY L EH V AH N
TWELVE T W EH L V
THIRTEEN TH ER T IY N
FOURTEEN F AO R T IY N
FIFTEEN F IH F T IY N
SIXTEEN S IH K S T IY N
SEVENTEEN S EH V AH N T IY N
EIGHTEEN EY T IY N
NINETEEN N AY N T IY N
TWENTY T W EH N T IY
TWENTY T W EH N IY
THIRTY TH ER T IY
THIRTY TH ER D IY
FORTY F AO R T IY
FIFTY F IH F T IY
SIXTY S IH K S T IY
SEVENTY S EH V AH N T IY
EIGHTY EY T IY
NINETY N AY N T IY
HUNDRED HH AH N D R AH D
HUNDRED HH AH N D ER D
THOUSAND TH AW Z AH N D
AND AH N D
AND AE N D
FIRST F ER S T
SECOND S EH K AH N D
THIRD TH ER D
FOURTH F AO R TH
FIFTH F IH F TH
SIXTH S IH K S TH
SEVENTH S EH V AH N TH
EIGHTH EY T TH
EIGHTH EY TH
NINTH N AY N TH
TENTH T EH N TH
ELEVENTH IH L EH V AH N TH
TWELFTH T W EH L F TH
THIRTEENTH TH ER T IY N TH
FOURTEENTH F AO R T IY N TH
FIFTEENTH F IH F T IY N TH
SIXTEENTH S IH K S T IY N TH
SEVENTEENTH S EH V AH N T IY N TH
EIGHTEENTH EY T IY N TH
NINETEENTH N AY N T IY N TH
TWENTIETH T W EH N T IY AH TH
TWENTIETH T W EH N IY AH TH
THIRTIETH TH ER T IY AH TH
JANUARY JH AE N Y UW EH R IY
FEBRUARY F EH B R UW EH R IY
FEBRUARY F EH B Y UW EH R IY
MARCH M AA R CH
APRIL EY P R AH L
MAY M EY
JUNE JH UW N
JULY JH UW L AY
JULY JH AH L AY
AUGUST AA G AH S T
AUGUST AO G AH S T
SEPTEMBER S EH P T EH M B ER
OCTOBER AA K T OW B ER
NOVEMBER N OW V EH M B ER
DECEMBER D IH S EH M B ER
GO G OW
STOP S T AA P
START S T AA R T
ENTER EH N T ER
ENTER EH N ER
ERASE IH R EY S
ERASE IY R EY S
RUBOUT R AH B AW T
REPEAT R IH P IY T
REPEAT R IY P IY T
NO N OW
YES Y EH S
HELP HH EH L P
"""


def mini_lexicon() -> Lexicon:
    """The lexicon of the mini corpus (every word its prompts can use, plus <sil> and <UNK>)."""
    lex: Lexicon = [(f[0], f[1:]) for f in map(str.split, _LEXICON_TEXT.strip().splitlines())]
    return lex + [(SIL_WORD, [SIL_PHONE]), (UNK_WORD, [UNK_PHONE])]


LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_ONES = (
    "ZERO ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE THIRTEEN FOURTEEN "
    "FIFTEEN SIXTEEN SEVENTEEN EIGHTEEN NINETEEN"
).split()
_TENS = "_ _ TWENTY THIRTY FORTY FIFTY SIXTY SEVENTY EIGHTY NINETY".split()
_ORDINALS = (
    "_ FIRST SECOND THIRD FOURTH FIFTH SIXTH SEVENTH EIGHTH NINTH TENTH ELEVENTH TWELFTH "
    "THIRTEENTH FOURTEENTH FIFTEENTH SIXTEENTH SEVENTEENTH EIGHTEENTH NINETEENTH TWENTIETH"
).split()
_MONTHS = (
    "JANUARY FEBRUARY MARCH APRIL MAY JUNE JULY AUGUST SEPTEMBER OCTOBER NOVEMBER DECEMBER"
).split()
# Spelled words in the style of AN4's census prompts (first names, surnames, street names).
_NAMES = (
    "SHARON MATTHEW JONATHAN JULIE WARREN DAVID MARIA LINDA KEVIN ROBERT SUSAN PETER ALICE "
    "BRIAN CAROL DIANE EDWARD FRANK GRACE HELEN JAMES KAREN LAURA MICHAEL NANCY OSCAR PAUL "
    "RACHEL SAMUEL THOMAS VICTOR WENDY FORBES MURRAY WALNUT FIFTH CRAIG HOWARD NEVILLE BEACON "
    "SMITH JONES BAKER MILLER WILSON TAYLOR CLARK HARRIS LEWIS WALKER YOUNG KING WRIGHT HILL "
    "GREEN ADAMS NELSON CARTER MITCHELL ROBERTS TURNER PHILLIPS CAMPBELL PARKER EVANS COLLINS "
    "AVENUE DRIVE STREET ROAD LANE MAPLE OAK PINE ELM CEDAR QUINN ZACHARY XAVIER"
).split()
_COMMANDS = "GO STOP START REPEAT HELP YES NO ERASE RUBOUT ENTER".split()

# How eSpeak is asked to say a word: letters are spoken as letter names; "A" alone in a letter
# sequence is read as the article by eSpeak, so it gets a respelling.
_SPOKEN = {"A": "eigh", "RUBOUT": "rub out"}


def _below_100(n: int) -> List[str]:
    if n < 20:
        return [_ONES[n]]
    return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])


def cardinal(n: int) -> List[str]:
    """0 <= n < 10000 in words, AN4 style: 2552 -> TWO THOUSAND FIVE HUNDRED AND FIFTY TWO."""
    if not 0 <= n < 10000:
        raise ValueError(f"cardinal: expected 0 <= n < 10000, got {n}")
    if n < 100:
        return _below_100(n)
    words: List[str] = []
    if n >= 1000:
        words += [_ONES[n // 1000], "THOUSAND"]
    if (n // 100) % 10:
        words += [_ONES[(n // 100) % 10], "HUNDRED"]
    if n % 100:
        words += ["AND"] + _below_100(n % 100)
    return words


def paired(n: int, rng: random.Random) -> List[str]:
    """Digits read in pairs, as in addresses and years: 5632 -> FIFTY SIX THIRTY TWO."""
    hi, lo = divmod(n, 100)
    if hi == 0:
        return _below_100(lo)
    head = _below_100(hi)
    if lo == 0:
        return head + ["HUNDRED"]
    if lo < 10:
        return head + [rng.choice(["OH", "ZERO"]), _ONES[lo]]
    return head + _below_100(lo)


def ordinal(n: int) -> List[str]:
    """1 <= n <= 31 as an ordinal: 23 -> TWENTY THIRD."""
    if not 1 <= n <= 31:
        raise ValueError(f"ordinal: expected 1 <= n <= 31, got {n}")
    if n <= 20:
        return [_ORDINALS[n]]
    if n == 30:
        return ["THIRTIETH"]
    return [_TENS[n // 10], _ORDINALS[n % 10]]


def _digits(k: int, rng: random.Random) -> List[str]:
    zero = rng.choice(["OH", "ZERO"])
    return [zero if d == 0 else _ONES[d] for d in (rng.randrange(10) for _ in range(k))]


def _letters(rng: random.Random, lo: int = 1, hi: int = 6) -> List[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(lo, hi))]


def _number(rng: random.Random) -> List[str]:
    style = rng.random()
    if style < 0.4:
        return cardinal(rng.choice([rng.randrange(100), rng.randrange(10000)]))
    if style < 0.7:
        return paired(rng.randrange(100, 10000), rng)
    return _digits(rng.randint(1, 4), rng)


def generate_prompt(rng: random.Random) -> str:
    """One AN4-style prompt (upper-case words of the mini lexicon)."""
    r = rng.random()
    if r < 0.30:  # an-style: [command] letters [number]
        words = []
        if rng.random() < 0.4:
            words.append(rng.choice(["ERASE", "RUBOUT", "ENTER", "REPEAT"]))
        words += _letters(rng)
        if rng.random() < 0.7:
            words += _number(rng)
    elif r < 0.42:  # short commands
        c = rng.choice(_COMMANDS)
        if c == "ENTER":
            words = [c] + _number(rng)
        elif c in ("ERASE", "RUBOUT") and rng.random() < 0.5:
            words = [c] + _letters(rng, 1, 3)
        else:
            words = [c]
    elif r < 0.62:  # spelled names, sometimes with a house number
        words = list(rng.choice(_NAMES))
        if rng.random() < 0.2:
            words = _number(rng) + words
    elif r < 0.78:  # phone numbers and zip codes
        words = _digits(rng.choice([5, 7, 10]), rng)
    elif r < 0.90:  # dates
        words = [rng.choice(_MONTHS)] + ordinal(rng.randint(1, 31))
        if rng.random() < 0.7:
            year = rng.randrange(1900, 2010)
            words += paired(year, rng) if year < 2000 else cardinal(year)
    else:  # numbers on their own
        words = _number(rng)
    return " ".join(words)


def espeak_text(words: Sequence[str]) -> str:
    """The text handed to eSpeak for a transcript (letters stay capitals, words lower-case)."""
    return " ".join(_SPOKEN.get(w, w if len(w) == 1 else w.lower()) for w in words)


# ---------------------------------------------------------------------------------------------
# eSpeak NG through ctypes
# ---------------------------------------------------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "wordgap": 7}
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class Espeak:
    """Minimal synchronous eSpeak NG synthesiser over ctypes.

    ``synth(text, voice, ...)`` returns a 1-D int16 numpy array at :attr:`sampling_rate`
    (22050 Hz for eSpeak NG).

    Caution:
      eSpeak NG keeps synthesis state in C globals that ``espeak_Terminate``/``espeak_Initialize``
      do not reset (the same text twice in a row gives slightly different audio), and it draws on
      libc's ``rand()``. To make every utterance a function of its own parameters only, each
      ``synth`` call loads the library afresh (``dlopen``), seeds ``srand(seed)``, synthesises
      and unloads it (``dlclose``), about 10 ms per call. This holds only while nothing else in
      the process keeps ``libespeak-ng.so`` loaded.
    """

    _instance: Optional["Espeak"] = None

    @classmethod
    def get(cls) -> "Espeak":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        loader = optional_import("espeakng_loader")
        self.data_path = Path(loader.get_data_path())
        self.library_path = loader.get_library_path()
        self._libc = ctypes.CDLL(None)
        self._chunks: List[np.ndarray] = []
        self._callback = _CALLBACK(self._on_audio)  # keep a reference: eSpeak calls it
        self.sampling_rate = 0
        with self._library():
            self.sampling_rate = self._sr

    @contextlib.contextmanager
    def _library(self):
        lib = ctypes.CDLL(self.library_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        try:
            sr = lib.espeak_Initialize(
                _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0
            )
            if sr <= 0:
                raise RuntimeError(
                    f"espeak_Initialize failed (returned {sr}) with data path {self.data_path}; "
                    "reinstall espeakng-loader"
                )
            self._sr = sr
            lib.espeak_SetSynthCallback(self._callback)
            yield lib
        finally:
            lib.espeak_Terminate()
            handle = lib._handle
            del lib
            if hasattr(_ctypes, "dlclose"):
                _ctypes.dlclose(handle)

    def _on_audio(self, wav, num_samples, events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        return 0

    def check_voice(self, voice: str) -> None:
        """Raise ValueError unless ``voice`` (``lang`` or ``lang+variant``) exists in the data.

        (eSpeak silently falls back to a default for unknown names.)
        """
        lang, _, variant = voice.partition("+")
        langs = {p.name.lower() for p in (self.data_path / "lang").rglob("*") if p.is_file()}
        if lang.lower() not in langs:
            raise ValueError(f"eSpeak NG has no language {lang!r} in {self.data_path / 'lang'}")
        if variant and not (self.data_path / "voices" / "!v" / variant).is_file():
            raise ValueError(
                f"eSpeak NG has no voice variant {variant!r} in {self.data_path / 'voices/!v'}"
            )

    def synth(
        self,
        text: str,
        voice: str,
        *,
        rate: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
        word_gap: int = 0,
        seed: int = 0,
    ) -> np.ndarray:
        self._chunks = []
        with self._library() as lib:
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"eSpeak NG rejected voice {voice!r}")
            params = (
                ("rate", rate),
                ("pitch", pitch),
                ("range", pitch_range),
                ("wordgap", word_gap),
            )
            for name, value in params:
                lib.espeak_SetParameter(_PARAM[name], int(value), 0)
            self._libc.srand(ctypes.c_uint(seed))
            data = text.encode("utf-8")
            err = lib.espeak_Synth(
                data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err} for text {text!r}")
        if not self._chunks:
            raise RuntimeError(f"eSpeak NG produced no audio for {text!r} with voice {voice!r}")
        return np.concatenate(self._chunks)


# ---------------------------------------------------------------------------------------------
# Rendering and augmentation
# ---------------------------------------------------------------------------------------------
def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if kind == "white":
        return white
    spec = np.fft.rfft(white)
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    spec /= np.sqrt(f) if kind == "pink" else f  # 1/f or 1/f^2 power
    return np.fft.irfft(spec, n)


def render_utterance(
    espeak: Espeak, words: Sequence[str], voice: str, rng: np.random.Generator
) -> Tuple[np.ndarray, Dict[str, object]]:
    """Synthesise and augment one utterance; returns (int16 samples at 16 kHz, parameters)."""
    from scipy.signal import resample_poly

    params = {
        "rate": int(rng.integers(135, 206)),
        "pitch": int(rng.integers(30, 71)),
        "pitch_range": int(rng.integers(25, 81)),
        "word_gap": int(rng.integers(0, 4)),
        "lead": float(rng.uniform(0.1, 0.4)),
        "trail": float(rng.uniform(0.1, 0.4)),
        "peak_db": float(rng.uniform(-14.0, -3.0)),
        "noise": str(rng.choice(["white", "pink", "brown"])),
        "snr_db": float(rng.uniform(15.0, 30.0)),
        "seed": int(rng.integers(0, 2**31)),
    }
    raw = espeak.synth(
        espeak_text(words),
        voice,
        rate=params["rate"],
        pitch=params["pitch"],
        pitch_range=params["pitch_range"],
        word_gap=params["word_gap"],
        seed=params["seed"],
    )
    x = raw.astype(np.float64) / 32768.0
    g = np.gcd(SAMPLING_RATE, espeak.sampling_rate)
    x = resample_poly(x, SAMPLING_RATE // g, espeak.sampling_rate // g)
    x *= 10 ** (params["peak_db"] / 20) / max(np.abs(x).max(), 1e-6)
    speech_power = np.mean(x[np.abs(x) > 0.01 * np.abs(x).max()] ** 2)
    lead, trail = int(params["lead"] * SAMPLING_RATE), int(params["trail"] * SAMPLING_RATE)
    y = np.concatenate([np.zeros(lead), x, np.zeros(trail)])
    noise = _noise(params["noise"], len(y), rng)
    noise *= np.sqrt(speech_power / 10 ** (params["snr_db"] / 10) / np.mean(noise**2))
    y = np.clip(y + noise, -1.0, 32767 / 32768)
    return np.round(y * 32768).astype(np.int16), params


def _voices(languages: Sequence[str], variants: Sequence[str]) -> List[str]:
    return [f"{lang}+{var}" for var in variants for lang in languages]


def speaker_id(voice: str) -> str:
    """``en-us+f3`` -> ``en-us_f3`` (speaker ids avoid '+')."""
    return voice.replace("+", "_")


def prepare_mini(
    output_dir: PathLike,
    *,
    num_train: Optional[int] = None,
    num_test: Optional[int] = None,
    seed: int = 0,
    small: bool = False,
) -> Dict[str, Dict[str, object]]:
    """Synthesise the mini corpus into ``output_dir`` (see the module docstring).

    Args:
      output_dir: destination; created if missing.
      num_train, num_test: utterances per split; default 600/150, or 48/12 with ``small=True``.
      seed: the corpus is a deterministic function of (num_train, num_test, seed).
      small: the smoke-test sizes (when num_train/num_test are not given).

    Returns:
      ``{"train"|"test": {"recordings": RecordingSet, "supervisions": SupervisionSet}}``.

    A call with the configuration of the existing ``.mini.done`` marker only loads the manifests.
    """
    lhotse = optional_import("lhotse")
    sf = optional_import("soundfile")
    output_dir = Path(output_dir)
    if num_train is None:
        num_train = SMALL_NUM_TRAIN if small else DEFAULT_NUM_TRAIN
    if num_test is None:
        num_test = SMALL_NUM_TEST if small else DEFAULT_NUM_TEST
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}")
    config = {"num_train": num_train, "num_test": num_test, "seed": seed, "version": _VERSION}
    sizes = {"train": num_train, "test": num_test}
    done = output_dir / ".mini.done"
    marker = read_done(done)
    paths = [recordings_path(output_dir, "mini", s) for s in sizes]
    paths += [supervisions_path(output_dir, "mini", s) for s in sizes]
    paths.append(lexicon_path(output_dir, "mini"))
    if marker is not None and marker.get("config") == config and all(p.is_file() for p in paths):
        log.info("mini corpus in %s is up to date (%s); skipping", output_dir, done)
        return {
            s: {
                "recordings": lhotse.load_manifest(recordings_path(output_dir, "mini", s)),
                "supervisions": lhotse.load_manifest(supervisions_path(output_dir, "mini", s)),
            }
            for s in sizes
        }
    if marker is not None:
        log.info(
            "mini corpus in %s was made with %s; regenerating with %s",
            output_dir,
            marker.get("config"),
            config,
        )

    espeak = Espeak.get()
    voices = {
        "train": _voices(TRAIN_LANGUAGES, TRAIN_VARIANTS),
        "test": _voices(TEST_LANGUAGES, TEST_VARIANTS),
    }
    for vs in voices.values():
        for v in vs:
            espeak.check_voice(v)
    words = {w for w, _ in mini_lexicon()}
    t0 = time.time()
    manifests: Dict[str, Dict[str, object]] = {}
    for split_index, (split, n) in enumerate(sizes.items()):
        wav_dir = output_dir / "wav" / split
        wav_dir.mkdir(parents=True, exist_ok=True)
        recordings, supervisions = [], []
        for i in range(n):
            prompt_rng = random.Random(f"{seed}-{split}-{i}")
            audio_rng = np.random.default_rng([seed, split_index, i])
            text = generate_prompt(prompt_rng)
            oov = [w for w in text.split() if w not in words]
            assert not oov, f"prompt generator produced words outside the lexicon: {oov}"
            voice = voices[split][i % len(voices[split])]
            samples, _ = render_utterance(espeak, text.split(), voice, audio_rng)
            utt_id = f"mini-{split}-{i:05d}"
            path = (wav_dir / f"{utt_id}.wav").resolve()
            with atomic_open(path, "wb") as f:
                sf.write(f, samples, SAMPLING_RATE, format="WAV", subtype="PCM_16")
            duration = len(samples) / SAMPLING_RATE
            recordings.append(
                lhotse.Recording(
                    id=utt_id,
                    sources=[lhotse.AudioSource(type="file", channels=[0], source=str(path))],
                    sampling_rate=SAMPLING_RATE,
                    num_samples=len(samples),
                    duration=duration,
                )
            )
            supervisions.append(
                lhotse.SupervisionSegment(
                    id=utt_id,
                    recording_id=utt_id,
                    start=0.0,
                    duration=duration,
                    channel=0,
                    text=text,
                    language="English",
                    speaker=speaker_id(voice),
                    gender="F" if "+f" in voice else "M",
                )
            )
        keep = {f"{r.id}.wav" for r in recordings}
        for stale in wav_dir.glob(f"mini-{split}-*.wav"):
            if stale.name not in keep:
                stale.unlink()
        rec_set = lhotse.RecordingSet.from_recordings(recordings)
        sup_set = lhotse.SupervisionSet.from_segments(supervisions)
        save_manifest(rec_set, recordings_path(output_dir, "mini", split))
        save_manifest(sup_set, supervisions_path(output_dir, "mini", split))
        manifests[split] = {"recordings": rec_set, "supervisions": sup_set}
        log.info(
            "mini %s: %d utterances, %d voices, %.3f h",
            split,
            n,
            len({s.speaker for s in supervisions}),
            sum(r.duration for r in recordings) / 3600,
        )
    write_lexicon(lexicon_path(output_dir, "mini"), mini_lexicon())
    write_done(done, {"config": config, "seconds": round(time.time() - t0, 2)})
    log.info("mini corpus written to %s in %.1f s", output_dir, time.time() - t0)
    return manifests
