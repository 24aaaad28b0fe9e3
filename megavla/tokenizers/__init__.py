"""megavla.tokenizers: the text tokenizer (sentencepiece) and the FAST action tokenizer.

The data pipeline tokenizes in its workers with these; the trainer trains or loads them:

    from megavla.tokenizers import load_tokenizers, train_tokenizers
    text_tok, fast_tok = train_tokenizers(shard_dirs, out_dir)   # or load_tokenizers(out_dir)
    text_tok.encode("pick up the cube")          -> list[int]  (bos first)
    fast_tok.encode(chunk)                       -> list[int]  in [0, fast_tok.vocab_size)
    fast_tok.decode(ids, horizon, dim)           -> float32 [horizon, dim]
"""
from .pair import load_tokenizers, train_tokenizers
from .fast import FastTokenizer, train_fast_tokenizer
from .text import TextTokenizer, train_text_tokenizer

__all__ = ["FastTokenizer", "TextTokenizer", "load_tokenizers", "train_fast_tokenizer",
           "train_text_tokenizer", "train_tokenizers"]
