"""Random streams keyed by what they are for, so a run's randomness needs no hidden state.

Every random choice of a PPO step (the sampling noise of a row, the minibatch shuffle of an epoch,
the prompt order of a pass over the data) draws from its own generator, seeded by a tuple of
integers that names it, e.g. ``(seed, step, global_row)``. Such a stream does not depend on which
process draws it, on how many processes there are, or on what was drawn before, so a resumed or
re-sharded run draws the same numbers.

The tuple becomes a 63-bit seed by the xxHash-style mix that CPython (3.8 and later) uses to hash
a tuple of ints, written out here so the seed does not depend on the interpreter: runs made
before this module existed, which called ``hash()`` on the tuple, reproduce bit for bit.
"""

from __future__ import annotations

import torch

_MASK = 2**64 - 1
_MODULUS = 2**61 - 1  # CPython's hash of an int is the int modulo this Mersenne prime
_PRIME_1 = 11400714785074694791
_PRIME_2 = 14029467366897019727
_PRIME_5 = 2870177450012600261


def _int_hash(n: int) -> int:
    """CPython's ``hash(n)`` for an int, as an unsigned 64-bit lane."""
    h = abs(n) % _MODULUS
    h = -h if n < 0 else h
    h = -2 if h == -1 else h
    return h & _MASK


def key_seed(*key: int) -> int:
    """A seed in [0, 2**63) for the tuple ``key`` of ints (equal to ``hash(key) % 2**63`` in CPython)."""
    acc = _PRIME_5
    for part in key:
        if not isinstance(part, int):
            raise TypeError(f"a random stream is keyed by ints, got {part!r}")
        acc = (acc + _int_hash(part) * _PRIME_2) & _MASK
        acc = ((acc << 31) | (acc >> 33)) & _MASK
        acc = (acc * _PRIME_1) & _MASK
    acc = (acc + (len(key) ^ (_PRIME_5 ^ 3527539))) & _MASK
    if acc == _MASK:  # -1 is reserved for errors in CPython
        acc = 1546275796
    signed = acc - 2**64 if acc >= 2**63 else acc
    return signed % 2**63


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator whose stream is a function of ``key`` only, e.g. ``keyed_generator(seed, step, row)``."""
    return torch.Generator().manual_seed(key_seed(*key))
