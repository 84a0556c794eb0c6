"""Tokenizers learned from the training captions, with no download: scratch mode's tokenizers.

CLIP: merges build the captions' most frequent words whole ("a red circle" -> `a</w> red</w> circle</w>`);
unseen words fall back to CLIP's byte-level characters. `save_pretrained` writes a folder CLIPTokenizer loads.

T5 (sd3, flux): a SentencePiece-style Unigram model whose pieces are the captions' most frequent words
(`▁red`, scored by their log frequency) and single characters (scored far lower, so a known word is always
one piece and an unseen one is spelled out). It is built from the word counts rather than by the `tokenizers`
library's Unigram trainer: on a few thousand short captions the trainer splits common words into characters,
and its vocabulary changes from process to process (hash order), which would change cache keys and break
exact resume. `save_pretrained` writes a folder T5Tokenizer loads.

Qwen2 (zimage, flux2): Qwen's byte-level BPE (GPT-2's byte alphabet, Qwen's pre-tokenizer regex) whose merges
build the captions' most frequent words whole (`Ġred`: a word after a space), with Qwen's chat tokens and a
ChatML chat template, as the Qwen3 text encoders read prompts. `save_pretrained` writes a folder
Qwen2Tokenizer loads.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTokenizerFast, Qwen2Tokenizer, T5TokenizerFast

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


def _word_counts(tokenizer, captions: Iterable[str]) -> Counter:
    """Words as the tokenizer's own normaliser and pre-tokeniser cut them (byte-level characters)."""
    backend = tokenizer.backend_tokenizer
    return Counter(
        word
        for caption in captions
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption))
    )


def _whole_word_merges(counts: Counter, budget: int, word_end: str = WORD_END) -> list[tuple[str, str]]:
    """Left-to-right merge chains that assemble whole words, most frequent words first (ties by the
    word itself), until `budget` new tokens are used. `word_end` marks a word's last symbol (CLIP's)."""
    merges: list[tuple[str, str]] = []
    known: set[str] = set()
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        pieces = list(word[:-1]) + [word[-1] + word_end]
        chain = []
        for piece in pieces[1:]:
            chain.append((pieces[0] if not chain else "".join(chain[-1]), piece))
        new = [pair for pair in chain if "".join(pair) not in known]
        if len(merges) + len(new) > budget:
            break
        merges.extend(new)
        known.update("".join(pair) for pair in new)
    return merges


T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"  # T5's special tokens, ids 0, 1, 2 as in T5's own vocabulary
WORD_START = "▁"  # SentencePiece marks a word's first symbol
CHARACTER_PENALTY = 10.0  # below any word's log frequency: a whole word always beats its spelling


def build_t5_tokenizer(captions: Iterable[str], *, vocab_size: int, max_tokens: int) -> T5TokenizerFast:
    """A T5 tokenizer whose pieces are the captions' most frequent words (ties by the word itself) and the
    characters to spell any other word with; every encoding ends with `</s>`. Deterministic."""
    normalizer = normalizers.NFKC()
    pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always")
    counts = Counter(word for caption in captions
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    characters = sorted({WORD_START, *string.ascii_letters, *string.digits, *string.punctuation,
                         *(character for word in counts for character in word)})
    total = max(1, sum(counts.values()))
    budget = vocab_size - 3 - len(characters)
    words = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(word) > 1][:budget]
    pieces = {T5_PAD: 0.0, T5_EOS: 0.0, T5_UNK: 0.0}
    pieces.update({word: math.log(counts[word] / total) for word in words})
    pieces.update({character: math.log(1 / total) - CHARACTER_PENALTY for character in characters})
    backend = Tokenizer(models.Unigram(list(pieces.items()), unk_id=2))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
    backend.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}",
                                                           special_tokens=[(T5_EOS, 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, pad_token=T5_PAD, eos_token=T5_EOS, unk_token=T5_UNK,
                                extra_ids=0)
    tokenizer.model_max_length = max_tokens
    return tokenizer


QWEN_PAD, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_THINK, QWEN_THINK_END = "<think>", "</think>"  # plain added tokens in Qwen3, as here
QWEN_ROLES = ("user", "assistant")  # words of every templated prompt: learned whole
# Qwen3's template reduced to what a text-to-image prompt uses: ChatML turns, and the generation prompt with an
# empty thinking block when `enable_thinking=False` (Flux.2 klein), none when True or unset (Z-Image)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def build_qwen2_tokenizer(captions: Iterable[str], *, vocab_size: int, max_tokens: int) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer whose merges build the captions' most frequent words (and the chat roles) whole;
    unseen words fall back to byte-level characters. `<|endoftext|>` pads, as in Qwen's own. Deterministic."""
    alphabet = sorted(_byte_alphabet())
    base = Qwen2Tokenizer(vocab={symbol: index for index, symbol in enumerate(alphabet)}, merges=[])
    counts = _word_counts(base, captions) + Counter({role: 1 for role in QWEN_ROLES})
    merges = _whole_word_merges(counts, budget=vocab_size - len(alphabet) - 5, word_end="")
    vocab = {symbol: index for index, symbol in enumerate(alphabet + ["".join(pair) for pair in merges])}
    specials = {token: len(vocab) + offset for offset, token in enumerate((QWEN_PAD, QWEN_IM_START, QWEN_IM_END))}
    tokenizer = Qwen2Tokenizer(vocab={**vocab, **specials}, merges=merges,
                               additional_special_tokens=[QWEN_IM_START, QWEN_IM_END])
    tokenizer.add_tokens([QWEN_THINK, QWEN_THINK_END])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.model_max_length = max_tokens
    return tokenizer


def tokenize(tokenizer, captions: list[str]):
    """Token ids padded to the tokenizer's fixed length, as the pipeline pads prompts."""
    return tokenized(tokenizer, captions).input_ids


def tokenized(tokenizer, captions: list[str]):
    """The ids and attention mask (1: a caption's token, 0: padding), padded as `tokenize` pads."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
