#!/usr/bin/env python3
"""The instruction set of the Brown recipe: part-of-speech questions built from the corpus's own
tags, and the most-frequent-tag baseline.

One record asks for the tag of one word in its context (a window of words around it, the word
repeated at the end as in the corpus's "word/tag" notation):

    {"prompt": "the jury [said] it did\\nsaid/", "response": "vbd\\n", ...}

The answer is the word's base tag (brown.base_tag: 104 tags on the training files) followed by a
newline, so an exact match (moelab eval) is "the right tag, and then stop". Extra keys (word,
tag, file, sentence, position) are ignored by moelab and used by the analysis.

Sentences come from moelab's own split of the corpus (brown.split): the training records from
the files moelab trains on (every genre), the dev records (curves during fine-tuning) and the
test records (the reported scores) from the held-out files, which neither pretraining,
continued pretraining nor fine-tuning ever reads. Test = every word of `--test-sentences`
held-out sentences drawn with the seed (all of a sentence's words, so the score is per word of
running text, as a tagger's accuracy is).

Baselines, written to baseline.json and computed on the same test words:
  mft_sft    the most frequent tag of each word among the fine-tuning records (the same
             annotated words the model is fine-tuned on); unseen words get the most frequent tag
             of those records ("nn");
  mft_corpus the same from every tagged word of the training files (1.05M words, 175 times the
             6000 annotations the model gets): a stronger reference, not the baseline of the claim.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import brown  # noqa: E402


def window(words, i, left, right):
    lo, hi = max(0, i - left), min(len(words), i + right + 1)
    ctx = words[lo:i] + ["[" + words[i] + "]"] + words[i + 1:hi]
    return " ".join(ctx)


def record(s: brown.Sentence, i: int, left: int, right: int, sid: int) -> dict:
    return {
        "prompt": window(s.words, i, left, right) + "\n" + s.words[i] + "/",
        "response": s.tags[i] + "\n",
        "word": s.words[i], "tag": s.tags[i], "file": s.file, "sentence": sid, "position": i,
    }


def mft_table(pairs):
    counts = collections.defaultdict(collections.Counter)
    overall = collections.Counter()
    for w, t in pairs:
        counts[w][t] += 1
        overall[t] += 1
    # Ties: the tag seen first in sorted order, so the table does not depend on dict order.
    table = {w: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for w, c in counts.items()}
    return table, overall.most_common(1)[0][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brown", default="data/brown")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--train-records", type=int, default=6000)
    ap.add_argument("--dev-records", type=int, default=1000)
    ap.add_argument("--test-sentences", type=int, default=150)
    ap.add_argument("--left", type=int, default=3, help="context words before the asked word")
    ap.add_argument("--right", type=int, default=2, help="context words after it")
    ap.add_argument("--max-bytes", type=int, default=120, help="longest record (prompt + response)")
    ap.add_argument("--seed", type=int, default=12)
    a = ap.parse_args()

    sents = brown.read_corpus(a.brown)
    train, dev, test = brown.split(sents)
    # One generator per split: the dev and test words do not depend on --train-records.
    rngs = {name: random.Random(f"{a.seed}/{name}") for name in ("train", "dev", "test")}

    def sample(pool, n, sid_base, rng):
        # word occurrences drawn uniformly (a sentence's words are as likely as any other's)
        occ = [(k, i) for k, s in enumerate(pool) for i in range(len(s.words))]
        rng.shuffle(occ)
        out = []
        for k, i in occ:
            r = record(pool[k], i, a.left, a.right, sid_base + k)
            if len(r["prompt"]) + len(r["response"]) <= a.max_bytes:
                out.append(r)
            if len(out) == n:
                break
        return out

    train_recs = sample(train, a.train_records, 0, rngs["train"])
    dev_recs = sample(dev, a.dev_records, 10**6, rngs["dev"])
    test_ids = sorted(rngs["test"].sample(range(len(test)), a.test_sentences))
    test_recs = []
    too_long = 0
    for k in test_ids:
        for i in range(len(test[k].words)):
            r = record(test[k], i, a.left, a.right, 2 * 10**6 + k)
            if len(r["prompt"]) + len(r["response"]) <= a.max_bytes:
                test_recs.append(r)
            else:
                too_long += 1

    os.makedirs(a.out, exist_ok=True)
    for name, recs in (("sft_train", train_recs), ("sft_dev", dev_recs), ("test", test_recs)):
        with open(os.path.join(a.out, name + ".jsonl"), "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")

    mft_sft, top_sft = mft_table((r["word"], r["tag"]) for r in train_recs)
    mft_all, top_all = mft_table((w, t) for s in train for w, t in zip(s.words, s.tags))

    def score(table, default):
        hits = [table.get(r["word"], default) == r["tag"] for r in test_recs]
        seen = [r["word"] in table for r in test_recs]
        known = [h for h, s in zip(hits, seen) if s]
        unknown = [h for h, s in zip(hits, seen) if not s]
        return {"accuracy": sum(hits) / len(hits), "words": len(hits),
                "unseen_share": 1 - sum(seen) / len(seen),
                "accuracy_seen": sum(known) / max(1, len(known)),
                "accuracy_unseen": sum(unknown) / max(1, len(unknown)), "default_tag": default,
                "per_record": [int(h) for h in hits]}

    base = {"mft_sft": score(mft_sft, top_sft), "mft_corpus": score(mft_all, top_all),
            "train_records": len(train_recs), "dev_records": len(dev_recs), "test_records": len(test_recs),
            "test_sentences": len(test_ids), "test_words_too_long": too_long,
            "train_words": sum(len(s.words) for s in train),
            # per test record: its word occurs in a fine-tuning record
            "seen_in_sft": [int(r["word"] in mft_sft) for r in test_recs],
            "tags": sorted({r["tag"] for r in train_recs}),
            "sentences": {"train": len(train), "dev": len(dev), "test": len(test)}}
    with open(os.path.join(a.out, "baseline.json"), "w") as f:
        json.dump(base, f, indent=1)
    print(f"make_tasks: {len(train_recs)} training, {len(dev_recs)} dev, {len(test_recs)} test records "
          f"({len(test_ids)} held-out sentences, {too_long} words left out as too long) -> {a.out}")
    for k in ("mft_sft", "mft_corpus"):
        b = base[k]
        print(f"make_tasks: baseline {k}: accuracy {100 * b['accuracy']:.2f}% "
              f"(unseen words {100 * b['unseen_share']:.1f}%, accuracy on them {100 * b['accuracy_unseen']:.1f}%)")


if __name__ == "__main__":
    main()
