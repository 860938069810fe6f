"""Text files as people save them (prompts files, wildcard files): UTF-8, with or without a byte-order mark, or
UTF-16/32 with one; anything else refused in one line naming the file, never guessed."""

from __future__ import annotations

import codecs

from ..errors import InputError

# Text a prompts file may be in: UTF-8 (with or without a byte-order mark), or UTF-16/32 with one (what
# Windows editors and PowerShell write). UTF-32's marks come first: UTF-32-LE's begins with UTF-16-LE's.
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(data: bytes, name: str) -> str:
    """The text of a prompts file, its byte-order mark dropped; any other encoding refused in one line (a
    wrong guess would change the prompts silently)."""
    for mark, codec in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            try:
                return data.decode(codec).removeprefix("\ufeff")
            except UnicodeDecodeError as exc:
                raise InputError(f"{name}: starts with a {codec.upper().removesuffix('-SIG')} byte-order mark but "
                                 f"is not {codec.removesuffix('-sig').upper()} text (byte {exc.start})") from None
    if b"\x00" in data:
        raise InputError(f"{name}: holds NUL bytes (byte {data.index(0)}): UTF-16 or UTF-32 text without a "
                         "byte-order mark, or not a text file; save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}: not UTF-8 text (byte {exc.start}; another encoding, such as Latin-1 or "
                         "Windows-1252?); save it as UTF-8") from None
