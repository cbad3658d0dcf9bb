"""A fake LDC tree in the real directory layouts of the Switchboard recipe's corpora.

Builds, under ``root``::

    LDC97S62/swb1_d1/data/sw0NNNN.sph        Switchboard-1 R2: 2-channel 8 kHz NIST SPHERE
    swb_ms98_transcriptions/NN/NNNN/swNNNN{A,B}-ms98-a-trans.text, sw-ms98-dict.text
    eval2000/LDC2002S09/hub5e_00/english/{sw_NNNN,en_NNNN}.sph
    eval2000/LDC2002T43/reference/english/{sw_NNNN,en_NNNN}.txt
    eval2000/LDC2002T43/reference/hub5e00.english.000405.stm, en20000405_hub5.glm
    LDC2004T19/fe_03_p1_tran/data/trans/000/fe_03_0000N.txt   Fisher part 1 transcripts
    LDC2005T19/fe_03_p2_tran/data/trans/058/fe_03_0585N.txt   Fisher part 2 transcripts

The SPHERE files are 16-bit PCM (LDC's are shorten-compressed mu-law, which only sph2pipe
decodes; libsndfile reads these). Each utterance is a sequence of word-dependent tones, so a
model can learn something, but the content is synthetic: the tree checks formats, layouts and
plumbing, not accuracy.
"""
from pathlib import Path
from typing import Dict, List

import numpy as np

SR = 8000
#: word -> MS-98 phones (lower case, as sw-ms98-dict.text)
WORDS = {
    "yeah": "y ae", "right": "r ay t", "i": "ay", "know": "n ow", "uh-huh": "ah hh ah",
    "well": "w eh l", "so": "s ow", "we": "w iy", "were": "w er", "it's": "ih t s",
    "okay": "ow k ey", "what": "w ah t", "do": "d uw", "you": "y uw", "mean": "m iy n",
    "think": "th ih ng k", "that": "dh ae t", "good": "g uh d", "really": "r ih l iy",
    "starting": "s t aa r t ih ng",
}
_VOCAB = sorted(WORDS)


def _tone_word(word: str, seconds: float, rng) -> np.ndarray:
    n = int(SR * seconds)
    f = 300 + 150 * (_VOCAB.index(word) % 20)
    t = np.arange(n) / SR
    return 3000 * np.sin(2 * np.pi * f * t) + 300 * rng.standard_normal(n)


def _utterances(rng, n: int, per_utt=(2, 4)) -> List[List[str]]:
    return [[_VOCAB[rng.integers(len(_VOCAB))] for _ in range(rng.integers(*per_utt))]
            for _ in range(n)]


def _write_sph(path: Path, channels: List[np.ndarray]):
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(c) for c in channels)
    x = np.zeros((n, len(channels)), dtype=np.float64)
    for i, c in enumerate(channels):
        x[: len(c), i] = c
    sf.write(str(path), np.clip(x, -32000, 32000).astype(np.int16), SR, format="NIST",
             subtype="PCM_16")


def _conversation(rng, num_utts: int, utt_seconds: float = 1.2):
    """Two sides, alternating turns: [(side, start, end, words)] and the two channels."""
    turns, pieces = [], []
    t = 0.2
    for k in range(num_utts * 2):
        side = k % 2
        words = _utterances(rng, 1)[0]
        audio = np.concatenate([_tone_word(w, utt_seconds / len(words), rng) for w in words])
        turns.append(("AB"[side], t, t + utt_seconds, words))
        pieces.append((side, int(t * SR), audio))
        t += utt_seconds + 0.1
    n = int((t + 0.6) * SR)
    chans = [np.zeros(n), np.zeros(n)]
    for side, start, audio in pieces:
        chans[side][start:start + len(audio)] = audio
    return turns, chans


def make_fake_ldc(root: Path, num_convs: int = 6, utts_per_side: int = 6, seed: int = 0
                  ) -> Dict[str, Path]:
    """Build the tree; returns the paths to pass to ``egs/swbd/ASR/run.sh``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    audio, ms98 = root / "LDC97S62", root / "swb_ms98_transcriptions"
    for c in range(num_convs):
        conv = f"{2001 + c}"
        turns, chans = _conversation(rng, utts_per_side)
        _write_sph(audio / "swb1_d1" / "data" / f"sw0{conv}.sph", chans)
        for side in "AB":
            f = ms98 / conv[:2] / conv / f"sw{conv}{side}-ms98-a-trans.text"
            f.parent.mkdir(parents=True, exist_ok=True)
            rows = []
            for i, (s, b, e, words) in enumerate(t for t in turns if t[0] == side):
                if i == 1:  # an MS-98 noise marker and a partial word
                    words = ["[noise]"] + words + ["th[at]-"]
                rows.append(f"sw{conv}{side}-ms98-a-{i + 1:04d} {b:.6f} {e:.6f} {' '.join(words)}\n")
            rows.append(f"sw{conv}{side}-ms98-a-{len(rows) + 1:04d} {e + 0.1:.6f} "
                        f"{e + 0.5:.6f} [silence]\n")
            f.write_text("".join(rows))
    (ms98 / "sw-ms98-dict.text").write_text(
        "#\n# sw-ms98-dict.text (fake)\n#\n[laughter] lau\n[noise] nsn\n[silence] sil\n"
        "[vocalized-noise] spn\n" + "".join(f"{w} {p}\n" for w, p in sorted(WORDS.items())))

    ev = root / "eval2000"
    stm_rows, txt = [], {}
    for name in ("sw_4390", "en_4156"):
        turns, chans = _conversation(rng, 3)
        _write_sph(ev / "LDC2002S09" / "hub5e_00" / "english" / f"{name}.sph", chans)
        lines = [f"#Language: eng\n#File id: {name[3:]}\n#Starting at 0 Ending at 10\n\n"]
        corpus = name[:2]
        for i, (side, b, e, words) in enumerate(turns):
            shown = list(words)
            if i == 0:  # LDC conventions: a hesitation, an uncertain word
                shown = ["%um"] + shown[:-1] + [f"(( {shown[-1]} ))"]
            lines.append(f"{b:.2f} {e:.2f} {side}: {' '.join(shown)}\n")
            ref = ["(%HESITATION)"] + words if i == 0 else words
            sex = "F" if side == "A" else "M"
            stm_rows.append(f"{name} {side} {name}_{side} {b:.2f} {e:.2f} "
                            f"<O,{corpus},{sex},{corpus}-{sex}> {' '.join(ref)}\n")
        txt[name] = "".join(lines)
    ref_dir = ev / "LDC2002T43" / "reference"
    (ref_dir / "english").mkdir(parents=True)
    for name, t in txt.items():
        (ref_dir / "english" / f"{name}.txt").write_text(t)
    (ref_dir / "hub5e00.english.000405.stm").write_text(STM_HEADER + "".join(stm_rows))
    (ref_dir / "en20000405_hub5.glm").write_text(GLM)

    fisher = []
    for ldc, part, sub, first in (("LDC2004T19", "fe_03_p1_tran", "000", 1),
                                  ("LDC2005T19", "fe_03_p2_tran", "058", 5851)):
        d = root / ldc / part / "data" / "trans" / sub
        d.mkdir(parents=True)
        for k in range(3):
            rows = [f"# fe_03_{first + k:05d}.sph\n", "\n"]
            for i, words in enumerate(_utterances(rng, 20, (3, 8))):
                if i == 0:
                    words = ["((", words[0], "))", "[laugh]"] + words[1:] + ["[lipsmack]"]
                rows.append(f"{i * 2:.2f} {i * 2 + 1.5:.2f} {'AB'[i % 2]}: {' '.join(words)}\n\n")
            (d / f"fe_03_{first + k:05d}.txt").write_text("".join(rows))
        fisher.append(root / ldc)
    return {"audio": audio, "trans": root, "eval2000": ev, "fisher1": fisher[0],
            "fisher2": fisher[1]}


STM_HEADER = """;; CATEGORY "0" "" ""
;; LABEL "O" "Overall" "Overall"
;;
;; CATEGORY "1" "Hub5 00" ""
;; LABEL "en" "CallHome" "CallHome (LDC)"
;; LABEL "sw" "Switchboard" "Switchboard (LDC)"
;;
;; CATEGORY "2" "Sex" ""
;; LABEL "F" "Female" "Female Caller"
;; LABEL "M" "Male" "Male Caller"
;;
;; CATEGORY "3" "Corpus/Sex" ""
;; LABEL "en-F" "CH Female" "CallHome Female Caller"
;; LABEL "en-M" "CH Male" "CallHome Male Caller"
;; LABEL "sw-F" "SW Female" "Switchboard Female Caller"
;; LABEL "sw-M" "SW Male" "Switchboard Male Caller"
"""

GLM = """;; global mapping file in the format of LDC2002T43's en20000405_hub5.glm
* name "en20000405_hub5.glm"
* desc "fake"
* format = 'NIST1'
* max_nrules = '1000'
* copy_no_hit = 'T'
* case_sensitive = 'F'

UH => %HESITATION / [ ] __ [ ]
UM => %HESITATION / [ ] __ [ ]
IT'S => {IT'S / IT IS} / [ ] __ [ ]
OKAY => {OKAY / O.K.} / [ ] __ [ ]
"""
