"""Text tokenizer: a thin wrapper around a sentencepiece model.

Two ways to get one: ``TextTokenizer.load(path)`` on any sentencepiece ``.model`` file (e.g. the
Gemma / PaliGemma tokenizer for pretrained backbones), or ``train_text_tokenizer(texts, out_path)``
on the instructions and subtask texts of a shard set (``megavla tokenizer train``).

Trained models use Gemma's special-id layout (pad 0, eos 1, bos 2, unk 3) so that code written
against one works with the other, and byte fallback so no character ever becomes ``<unk>``.

Vocabulary size on tiny corpora: sentencepiece refuses a ``vocab_size`` larger than the corpus
supports ("Vocabulary size too high"). We train with ``hard_vocab_limit=False`` instead, so the
requested size is an *upper bound*: a small corpus yields a smaller vocabulary, logged as a warning.
Consumers must size embeddings from ``tokenizer.vocab_size`` (the real count), never from the
request. The lower bound is hard: byte fallback needs 256 byte pieces + 4 specials + the corpus's
characters, and a request below that raises ``ValueError`` naming the minimum.

Model type: BPE by default. Measured on a 4-template corpus (vocab 1024 requested): unigram with
``hard_vocab_limit=False`` prunes to 292 pieces and splits "pick" into p/i/c/k; BPE keeps 394 pieces
and whole words ("▁pick", "▁the"). Template-generated instruction sets are exactly that small.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from megavla.fileio import atomic_write_bytes

import sentencepiece as spm

log = logging.getLogger(__name__)

# Gemma's layout of special ids.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
NUM_BYTE_PIECES = 256


class TextTokenizer:
    """Encode/decode text with a sentencepiece model held in memory (serializable, fork-safe)."""

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        self._proto = bytes(model_proto)
        self.source = source
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        # A model without a pad piece (many public models) pads with eos, never with a real word.
        pad = self._sp.pad_id()
        self._pad_id = pad if pad >= 0 else self._sp.eos_id()
        if self._pad_id < 0:
            raise ValueError(f"{source}: sentencepiece model has neither a pad nor an eos id; "
                             "retrain it with pad_id/eos_id set")

    # --- ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self._pad_id)

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    # --- encode / decode -------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = list(self._sp.encode(text, out_type=int))
        if add_bos:
            if self.bos_id < 0:
                raise ValueError(f"{self.source}: model has no bos piece; call encode(add_bos=False)")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id < 0:
                raise ValueError(f"{self.source}: model has no eos piece; call encode(add_eos=False)")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids; control ids (pad/bos/eos) are dropped, ids outside the vocabulary too
        (a model's sampled output must never crash the decoder)."""
        size = self.vocab_size
        specials = {self.pad_id, self.bos_id, self.eos_id}
        kept = [int(i) for i in ids if 0 <= int(i) < size and int(i) not in specials]
        return self._sp.decode(kept)

    # --- files -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self._proto)  # a reader never sees half a model
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer {path}: no such file; train one with "
                                    "`megavla tokenizer train --shards DIR --out OUT`")
        try:
            return cls(path.read_bytes(), source=str(path))
        except RuntimeError as e:  # sentencepiece's parse failure
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None

    # DataLoader workers started with "spawn" pickle the dataset: carry the proto bytes, which
    # rebuild the exact same processor (this is process plumbing, never a file format).
    def __getstate__(self) -> dict:
        return {"proto": self._proto, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["source"])

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def train_text_tokenizer(
    texts: Iterable[str],
    out_path: str | os.PathLike | None = None,
    vocab_size: int = 1024,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentences: int = 2_000_000,
) -> TextTokenizer:
    """Train a sentencepiece model in-process from an iterator of texts; save it if ``out_path``.

    ``vocab_size`` is an upper bound (see the module docstring); empty texts are skipped (counted).
    """
    min_size = 4 + (NUM_BYTE_PIECES if byte_fallback else 0) + 1
    if vocab_size < min_size:
        raise ValueError(f"text vocab_size={vocab_size} is too small: byte_fallback={byte_fallback} "
                         f"needs at least {min_size} (4 specials"
                         f"{' + 256 byte pieces' if byte_fallback else ''} + characters); "
                         "raise --text-vocab")
    counts = {"texts": 0, "empty": 0}

    def sentences() -> Iterable[str]:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"train_text_tokenizer: expected str texts, got {type(text).__name__}")
            if not text.strip():
                counts["empty"] += 1
                continue
            counts["texts"] += 1
            yield text

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences()),
            model_writer=buf,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # requested size is an upper bound on tiny corpora
            character_coverage=1.0,
            byte_fallback=byte_fallback,
            pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=1,
            minloglevel=2,  # sentencepiece's own chatter off; we log the summary
        )
    except RuntimeError as e:
        if counts["texts"] == 0:
            raise ValueError(f"train_text_tokenizer: no non-empty texts to train on "
                             f"({counts['empty']} empty skipped)") from None
        raise ValueError(f"sentencepiece training failed on {counts['texts']} texts: {e}") from None
    tok = TextTokenizer(buf.getvalue(), source=str(out_path) if out_path else "<trained>")
    log.info("text tokenizer: trained on %d texts (%d empty skipped), vocab %d (requested %d)",
             counts["texts"], counts["empty"], tok.vocab_size, vocab_size)
    if tok.vocab_size < vocab_size:
        log.warning("text tokenizer: corpus supports only %d pieces < requested %d; size embeddings "
                    "from tokenizer.vocab_size", tok.vocab_size, vocab_size)
    if out_path is not None:
        tok.save(out_path)
    return tok
