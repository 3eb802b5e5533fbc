"""Brown corpus sentences with their part-of-speech tags, split as moelab splits the corpus.

The rules mirror core/io/data.h (parse_brown_tagged, brown_base_tag, brown_is_validation):
  - files are data/brown/c[a-r]NN, sorted by name and numbered i = 0, 1, ...; file i is held out
    (moelab's validation text) iff floor((i+1) f) > floor(i f), f = 0.1 (every 10th file), so a
    held-out sentence is never part of moelab's training text, whatever data.genres selects;
  - a token is split at its LAST '/'; the corpus's `` and '' become '"';
  - a sentence is one non-blank line of a file;
  - a tag's base (what the task asks for): lower-cased, "fw-" dropped, the first part of a
    compound ("pps+bez" -> "pps"), modifiers after '-' dropped ("nn-tl" -> "nn"), a tag
    starting with "--" is "--".
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Tuple

FILE_RE = re.compile(r"^c[a-z][0-9][0-9]$")


def base_tag(tag: str) -> str:
    t = tag.lower()
    if t.startswith("fw-"):
        t = t[3:]
    if t.startswith("--"):
        return "--"
    plus = t.find("+")
    if plus > 0:
        t = t[:plus]
    dash = t.find("-")
    if dash > 0:
        t = t[:dash]
    return t


def is_validation(index: int, fraction: float = 0.1) -> bool:
    f = round(fraction * 1e6)
    return (index + 1) * f // 1000000 > index * f // 1000000


@dataclass
class Sentence:
    file: str        # e.g. "ca01"
    genre: str       # e.g. "a"
    held_out: bool   # in a file moelab holds out (never trained on)
    words: List[str]
    tags: List[str]  # base tags

    @property
    def text(self) -> str:
        return " ".join(self.words)


def read_corpus(path: str) -> List[Sentence]:
    names = sorted(n for n in os.listdir(path) if FILE_RE.match(n))
    if not names:
        raise SystemExit(f"no Brown corpus in {path}: run `make data`")
    out: List[Sentence] = []
    for i, name in enumerate(names):
        held = is_validation(i)
        with open(os.path.join(path, name), encoding="ascii", errors="replace") as f:
            for line in f:
                toks = line.split()
                if not toks:
                    continue
                words, tags = [], []
                for tok in toks:
                    slash = tok.rfind("/")
                    w, t = tok[:slash], tok[slash + 1:]
                    if w in ("``", "''"):
                        w = '"'
                    words.append(w)
                    tags.append(base_tag(t))
                out.append(Sentence(name, name[1], held, words, tags))
    return out


def split(sentences: List[Sentence]) -> Tuple[List[Sentence], List[Sentence], List[Sentence]]:
    """(train, dev, test): train = sentences of the files moelab trains on; the held-out files
    alternate between dev (curves during fine-tuning) and test (the reported scores)."""
    held_files = sorted({s.file for s in sentences if s.held_out})
    test_files = set(held_files[1::2])
    train = [s for s in sentences if not s.held_out]
    dev = [s for s in sentences if s.held_out and s.file not in test_files]
    test = [s for s in sentences if s.held_out and s.file in test_files]
    return train, dev, test
