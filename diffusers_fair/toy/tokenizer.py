"""An offline CLIP tokenizer for the toy world.

The toy text encoder does not need CLIP's 49k-token vocabulary. This module learns a byte-pair
encoding on the toy world's words (every word of its prompts becomes a single token), on top of
the 256 byte symbols CLIP's tokenizer uses, so any text still tokenizes (unknown words fall back to
sub-word pieces). The result is a stock ``transformers.CLIPTokenizer``, saved with the model.
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTokenizer


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    # The printable stand-ins of the 256 bytes, as GPT-2 and CLIP's byte-level BPE define them.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol (ties broken alphabetically)."""
    corpus = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words))}
    merges = []
    while True:
        pairs = Counter()
        for symbols in corpus.values():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += 1
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        for word, symbols in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            corpus[word] = tuple(out)


def build_tokenizer(words: list[str], model_max_length: int = 32) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary holds the byte symbols and ``words`` as whole tokens."""
    words = [w.lower() for w in words]
    base = _byte_symbols()
    vocab: dict[str, int] = {}
    for symbol in base + [s + "</w>" for s in base]:
        vocab.setdefault(symbol, len(vocab))
    merges = learn_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
