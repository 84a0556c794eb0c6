"""A CLIP tokenizer learned from the training captions, with no download: scratch mode's tokenizer.

Merges build the captions' most frequent words whole ("a red circle" -> `a</w> red</w> circle</w>`); unseen
words fall back to CLIP's byte-level characters. `save_pretrained` writes a folder CLIPTokenizer loads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from transformers import CLIPTokenizerFast

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"  # CLIP's BPE marks a word's last symbol


def _byte_alphabet() -> list[str]:
    """CLIP's printable stand-ins for the 256 byte values (as in its byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_tokenizer(captions: Iterable[str], *, vocab_size: int, max_tokens: int) -> CLIPTokenizerFast:
    """A CLIP tokenizer whose merges build the captions' most frequent words whole; unseen words fall
    back to byte-level characters. Deterministic: the same captions always give the same token ids
    (the Rust BPE trainer breaks ties by hash order, which changes from process to process)."""
    alphabet = _byte_alphabet()
    symbols = alphabet + [s + WORD_END for s in alphabet]
    base = _clip_tokenizer({symbol: index for index, symbol in enumerate(symbols)}, [], max_tokens)
    merges = _whole_word_merges(_word_counts(base, captions), budget=vocab_size - len(symbols) - 2)
    vocab = {symbol: index for index, symbol in enumerate(symbols + ["".join(pair) for pair in merges])}
    return _clip_tokenizer(vocab, merges, max_tokens)


def _clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], max_tokens: int) -> CLIPTokenizerFast:
    tokenizer = CLIPTokenizerFast(
        vocab={**vocab, BOS: len(vocab), EOS: len(vocab) + 1}, merges=merges,
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
    )
    tokenizer.model_max_length = max_tokens
    return tokenizer


def _word_counts(tokenizer: CLIPTokenizerFast, captions: Iterable[str]) -> Counter:
    """Words as CLIP's own normaliser and pre-tokeniser cut them (byte-level characters)."""
    backend = tokenizer.backend_tokenizer
    return Counter(
        word
        for caption in captions
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption))
    )


def _whole_word_merges(counts: Counter, budget: int) -> list[tuple[str, str]]:
    """Left-to-right merge chains that assemble whole words, most frequent words first (ties by the
    word itself), until `budget` new tokens are used."""
    merges: list[tuple[str, str]] = []
    known: set[str] = set()
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        pieces = list(word[:-1]) + [word[-1] + WORD_END]
        chain = []
        for piece in pieces[1:]:
            chain.append((pieces[0] if not chain else "".join(chain[-1]), piece))
        new = [pair for pair in chain if "".join(pair) not in known]
        if len(merges) + len(new) > budget:
            break
        merges.extend(new)
        known.update("".join(pair) for pair in new)
    return merges


def tokenize(tokenizer, captions: list[str]):
    """Token ids padded to the tokenizer's fixed length, as the pipeline pads prompts."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
