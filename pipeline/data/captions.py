"""Captions as every stage reads them: the normal form preprocess writes and monitoring compares with."""

from __future__ import annotations

import unicodedata


def normalise_caption(caption: str, *, lowercase: bool = False) -> str:
    """Unicode NFC (so "é" typed two ways is one token), whitespace runs collapsed to one space, stripped."""
    text = " ".join(unicodedata.normalize("NFC", caption).split())
    return text.lower() if lowercase else text
