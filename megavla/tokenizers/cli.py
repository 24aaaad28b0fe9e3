"""``megavla tokenizer train``: train the text and FAST tokenizers on one or more shard sets.

    megavla tokenizer train --shards DIR [DIR ...] --out OUT [--text-vocab N] [--fast-vocab N]
                            [--chunk-length H] [--fast-scale S] [--chunk-stride K] [--overwrite]

Reads every episode of the shard sets (the shards listed in each set's ``manifest.json``, with its
``norm_stats.json``; a DIR may also hold several sets, as ``megavla data synth --out DIR`` writes):

* text corpus: each episode's instruction and its subtask texts;
* FAST corpus: the action chunks the pipeline will tokenize, i.e. ``a[t:t+H]`` of the episode's
  *valid* dims (``action_mask``), normalized per embodiment with the shard sets' stats (quantile
  mode maps [q01, q99] to [-1, 1]), for every valid start t (stride K), with steps past the end
  or not ``step_valid`` forward-filled exactly as megavla/data/collate.py does.

Writes ``OUT/text.model``, ``OUT/fast.model``, ``OUT/fast.json`` and ``OUT/tokenizers.json`` (the
corpus counts and settings). An OUT that exists and is not empty is refused unless ``--overwrite``
(the one rule of every writer: megavla/overwrite.py). Bad samples are counted, logged with shard
and key, and skipped (``--on-bad-sample fail`` raises instead).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .pair import FAST_PREFIX, TEXT_FILE, train_tokenizers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavla tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train text + FAST tokenizers on shard sets")
    tr.add_argument("--shards", nargs="+", required=True, metavar="DIR", help="shard set directories")
    tr.add_argument("--out", required=True, help="output directory")
    tr.add_argument("--text-vocab", type=int, default=1024, help="text vocab upper bound (default 1024)")
    tr.add_argument("--fast-vocab", type=int, default=1024, help="FAST vocab upper bound (default 1024)")
    tr.add_argument("--chunk-length", type=int, default=10, help="action chunk length H (default 10)")
    tr.add_argument("--fast-scale", type=float, default=10.0, help="DCT coefficient scale (default 10)")
    tr.add_argument("--chunk-stride", type=int, default=1, help="step between chunk starts (default 1)")
    tr.add_argument("--normalization", choices=("quantile", "zscore", "none"), default="quantile")
    tr.add_argument("--on-bad-sample", choices=("skip", "fail"), default="skip")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace the tokenizers in a non-empty --out (refused otherwise)")
    args = parser.parse_args(argv)
    missing = [d for d in args.shards if not Path(d).is_dir()]
    if missing:
        sys.stderr.write(f"megavla tokenizer train: --shards {' '.join(missing)}: no such directory (a shard "
                         f"set, or a folder of them, written by `megavla data synth` or an importer)\n")
        return 2
    from megavla.overwrite import OutputExists, refuse_existing
    try:   # before reading any episode: a run may be training with the tokenizers in --out
        refuse_existing(args.out, args.overwrite, "files")
    except OutputExists as e:
        sys.stderr.write(f"megavla tokenizer train: --out {e}\n")
        return 2
    text_tok, fast_tok = train_tokenizers(
        args.shards, args.out, text_vocab=args.text_vocab, fast_vocab=args.fast_vocab,
        chunk_length=args.chunk_length, fast_scale=args.fast_scale, chunk_stride=args.chunk_stride,
        normalization=args.normalization, on_bad_sample=args.on_bad_sample)
    print(f"wrote {Path(args.out) / TEXT_FILE} ({text_tok.vocab_size} pieces), "
          f"{Path(args.out) / FAST_PREFIX}.model/.json ({fast_tok.vocab_size} pieces, "
          f"coefficients [{fast_tok.min_coeff}, {fast_tok.max_coeff}])")
    return 0
