"""CBOR from another party, checked before cbor2 builds anything from it.

cbor2's C decoder evaluates its built-in semantic tags itself, before and instead of any
``tag_hook``: bignums (2, 3), decimal fractions and bigfloats (4, 5), rationals (30, a
``Fraction``: a gcd quadratic in the size of its bignums, seconds for 600 KB and hours for
16 MiB), datetimes (0, 1, 100, 1004), shared values (28, 29), string references (25, 256),
regular expressions (35), MIME messages (36), UUIDs (37), sets (258), IP addresses (260, 261),
complex numbers (43000) and the self-describe mark (55799). Nothing this project exchanges uses
them: the enclave's frames use no tag, and evidence only COSE_Sign1's (18).

:func:`check_plain` walks the items' heads (strings skipped by their length, never read; about
0.1-0.2 µs an item) and refuses a tag outside those allowed, an indefinite length, more than
``max_items`` items, or bytes after the one item, so the decode that follows costs time linear
in the input and allocates a bounded number of objects. It guards the enclave's socket frames
(both ways, :mod:`fides_core.enclave_wire`) and the evidence a client, the gateway or an
incident check decodes (:mod:`fides_core.cose`, :mod:`fides_core.attestation`): a gateway could
otherwise stall a client's evidence check for hours with one answer.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_ITEMS", "UnsafeCbor", "check_plain", "skip_item"]

DEFAULT_MAX_ITEMS = 2**18  # data items in one document: far above any frame or evidence made here

_NO_TAGS: frozenset[int] = frozenset()


class UnsafeCbor(ValueError):
    """The CBOR holds what it must not (a tag, an indefinite length, too many items, trailing
    bytes), or ends inside an item; the message names ``what`` and where."""


def check_plain(
    data: bytes,
    *,
    what: str = "CBOR",
    max_items: int = DEFAULT_MAX_ITEMS,
    allowed_tags: frozenset[int] = _NO_TAGS,
) -> None:
    """Refuse ``data`` unless it is one plain CBOR item (see the module docstring)."""
    pos, _ = skip_item(data, 0, max_items, what=what, allowed_tags=allowed_tags)
    if pos < len(data):
        raise UnsafeCbor(f"{what} has {len(data) - pos} bytes after its first item")


def skip_item(
    data: bytes,
    pos: int,
    max_items: int,
    *,
    what: str = "CBOR",
    allowed_tags: frozenset[int] | None = _NO_TAGS,
) -> tuple[int, int]:
    """Skip the one CBOR item at ``pos`` without building it: (where it ends, items seen).
    A tag outside ``allowed_tags`` (None: any tag) is refused; an indefinite length always."""
    remaining = 1  # items still to read: this one, plus what each array and map announces
    items = 0
    try:
        while remaining:
            remaining -= 1
            items += 1
            if items > max_items:
                raise UnsafeCbor(f"{what} holds more than {max_items} CBOR items")
            start = pos
            head = data[pos]
            pos += 1
            info = head & 0x1F
            if info < 24:
                arg = info
            elif info < 28:
                size = 1 << (info - 24)
                arg = int.from_bytes(data[pos : pos + size], "big")
                pos += size
            else:
                raise UnsafeCbor(
                    f"{what} has an indefinite-length or reserved item at byte {start}"
                )
            major = head >> 5
            if major == 2 or major == 3:  # byte and text strings: skipped, never read
                pos += arg
            elif major == 4:
                remaining += arg
            elif major == 5:
                remaining += 2 * arg
            elif major == 6:
                if allowed_tags is not None and arg not in allowed_tags:
                    allowed = (
                        f"only tag(s) {', '.join(map(str, sorted(allowed_tags)))} are"
                        if allowed_tags
                        else "no tags are"
                    )
                    raise UnsafeCbor(f"{what} holds CBOR tag {arg} at byte {start}; {allowed} used")
                remaining += 1  # the tagged item
    except IndexError:
        pos = len(data) + 1
    if pos > len(data):
        raise UnsafeCbor(f"{what} is not valid CBOR: it ends inside an item")
    return pos, items
