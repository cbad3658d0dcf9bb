"""Pronunciation lexicons in Kaldi format, as written by the corpus preparation steps.

File format (``lexicon.txt``, UTF-8): one pronunciation per line, ``WORD PH1 PH2 ...``, fields
separated by whitespace; a word with several pronunciations has several lines. Both corpora use
the AN4 phone set (CMUdict ARPAbet without stress marks, 33 phones + ``SIL``) plus ``SPN``
(spoken noise) for the out-of-vocabulary word:

- ``<sil> SIL``: the silence word (AN4's filler dictionary calls it ``<sil>``);
- ``<UNK> SPN``: the word that out-of-vocabulary words are mapped to (see
  :func:`k2quant.data.cuts.map_oov`).
"""

from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Set, Tuple, Union

from k2quant.lang import read_lexicon as _lang_read_lexicon
from k2quant.utils.io import PathLike, atomic_write_text

SIL_WORD = "<sil>"
SIL_PHONE = "SIL"
UNK_WORD = "<UNK>"
UNK_PHONE = "SPN"

#: The AN4 phone set (etc/an4.phone of the CMU distribution): ARPAbet without stress + SIL.
AN4_PHONES = (
    "AA AE AH AO AW AY B CH D EH ER EY F G HH IH IY JH K L M N OW P R S SIL T TH UW V W Y Z"
).split()

Lexicon = List[Tuple[str, List[str]]]


def read_lexicon(path: PathLike) -> Lexicon:
    """Read a Kaldi-format lexicon: a list of ``(word, [phone, ...])`` in file order.

    :func:`k2quant.lang.read_lexicon` (which also reads ``lexiconp.txt`` and Sphinx ``.dic``
    forms) after checking that the file exists.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: on a line with a word but no phones (naming the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lexicon file {path} does not exist")
    return _lang_read_lexicon(path)


def write_lexicon(path: PathLike, lexicon: Iterable[Tuple[str, Sequence[str]]]) -> None:
    """Write ``lexicon`` (``(word, phones)`` pairs) atomically in Kaldi format."""
    lines = []
    for word, phones in lexicon:
        if not phones:
            raise ValueError(f"write_lexicon: word {word!r} has no phones")
        lines.append(f"{word} {' '.join(phones)}\n")
    atomic_write_text(path, "".join(lines))


def lexicon_words(lexicon: Union[Lexicon, Dict[str, object], Set[str], PathLike]) -> Set[str]:
    """The set of words of a lexicon given as a list of pairs, a dict, a set or a file path."""
    if isinstance(lexicon, (str, Path)):
        lexicon = read_lexicon(lexicon)
    if isinstance(lexicon, (set, frozenset, dict)):
        return set(lexicon)
    return {w for w, _ in lexicon}


def min_pron_lengths(lexicon: Lexicon) -> Dict[str, int]:
    """Map each word to the length (in phones) of its shortest pronunciation."""
    out: Dict[str, int] = {}
    for word, phones in lexicon:
        out[word] = min(out.get(word, len(phones)), len(phones))
    return out
