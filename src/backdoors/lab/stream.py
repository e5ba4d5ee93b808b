"""The numbered byte stream the lab's sample service sends: byte i is i mod 251.

251 is prime, so the pattern never lines up with buffer or page sizes: a lost, duplicated
or reordered chunk shows as a mismatch at a precise offset.
"""

PERIOD = 251
_BLOCK = bytes(i % PERIOD for i in range(PERIOD)) * 64  # 16064 bytes


def expected(offset: int, n: int) -> bytes:
    """The `n` bytes of the stream that start at `offset`."""
    out = bytearray()
    pos = offset % PERIOD
    while len(out) < n:
        take = min(n - len(out), len(_BLOCK) - pos)
        out += _BLOCK[pos:pos + take]
        pos = 0
    return bytes(out)


def first_mismatch(offset: int, data: bytes) -> int | None:
    """Index in `data` of the first byte that is not the stream's at `offset`, or None."""
    want = expected(offset, len(data))
    if want == data:
        return None
    return next(i for i, (a, b) in enumerate(zip(want, data)) if a != b)
