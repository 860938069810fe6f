"""What diffbatch does with each key of an AUTOMATIC1111 infotext that is no spec field's own (the fields' keys
are spec.EDGES'): read (the size, the sampler, the model, an init image's fingerprint, LoRA hashes), record-keeping
that changes no pixel, A1111's own noise (no diffusers-based engine makes it: said once, in one line), or refused by
name. A key this table does not name is refused too: a setting diffbatch does not know may change the image, and
``--ignore KEY`` is the user's word that the image may differ."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from PIL import Image

# Read by io/infotext.py (or checked by the CLI) into what it makes
READ = frozenset({"Size", "Sampler", "Schedule type", "Model", "Model hash", "Init image", "Init image hash",
                  "Lora hashes", "TI hashes", "Numerics", "Version"})
# Record-keeping: no pixel depends on them
NO_PIXELS = frozenset({"User", "Hashes", "Template", "Negative Template"})
# A1111's noise: its GPU (or NV, or CPU) random numbers and the seed delta of its ancestral samplers; diffbatch's
# noise is diffusers' (a CPU generator), so an A1111 image differs anyway: said once, not refused
A1111_NOISE = frozenset({"ENSD", "RNG"})

# Why a key is refused, where there is more to say than "diffbatch does not honour it"
REASONS = {
    "Hires resize": "diffbatch's hires fix takes a scale (Hires upscale), not a target size",
    "Hires schedule type": "diffbatch's hires fix runs the first pass's schedule",
    "Hires CFG Scale": "diffbatch's hires fix runs the first pass's CFG scale",
    "Hires checkpoint": "diffbatch's hires fix runs the first pass's model",
    "Hires upscaler": "diffbatch has no such upscaler (it has Latent and its variants, Lanczos, Nearest)",
    "Denoising strength": "without an init image or Hires upscale it means nothing diffbatch knows",
    "Tiling": "diffbatch makes no tiling images",
    "Face restoration": "diffbatch restores no faces",
    "Refiner": "diffbatch switches no models mid-image",
    "Refiner switch at": "diffbatch switches no models mid-image",
    "Seed resize from": "diffbatch resizes no seeds",
    "Token merging ratio": "diffbatch merges no tokens",
    "Token merging ratio hr": "diffbatch merges no tokens",
    "Eta": "diffbatch's ancestral samplers run at eta 1",
    "Eta DDIM": "diffbatch's DDIM runs at eta 0",
    "NGMS": "diffbatch skips no negative guidance",
    "Pad conds": "diffbatch does not pad a prompt and its negative prompt to one length",
    "Conditional mask weight": "diffbatch has no inpainting model conditioning yet",
    "Mask blur": "diffbatch has no inpainting yet",
    "Inpaint area": "diffbatch has no inpainting yet",
    "Masked content": "diffbatch has no inpainting yet",
    "VAE": "diffbatch uses the model's own VAE",
    "VAE hash": "diffbatch uses the model's own VAE",
    "Schedule type": "diffbatch has no such schedule for this sampler",
}


def unhonoured(settings: dict[str, str], read_keys: set[str]) -> dict[str, str]:
    """The keys of ``settings`` diffbatch neither reads (``read_keys``: the fields' keys, and READ) nor may
    leave aside (record-keeping, A1111's noise): each with why, in one phrase."""
    refused = {}
    for key in settings:
        if key in read_keys or key in READ or key in NO_PIXELS or key in A1111_NOISE:
            continue
        refused[key] = REASONS.get(key, "diffbatch does not know this setting, which may change the image")
    return refused


def refusal(where: str, refused: dict[str, str], settings: dict[str, str], http: bool = False) -> str:
    """One line naming every refused key, its value, why, and how to go on anyway (the CLI's ``--ignore KEY``, or
    the HTTP form's ``ignore`` field)."""
    named = "; ".join(f"{key}: {settings.get(key, '')} ({why})" for key, why in refused.items())
    ignore = ("the form field ignore=" + ",".join(refused)) if http else " ".join(
        f"--ignore {_quoted(key)}" for key in refused)
    return (f"{where}: not honoured: {named}; give {ignore} to make it without, or the flag that sets it to choose "
            "another (the image will differ from the PNG's)")


def differs_note(where: str, version: str) -> str:
    """The one line an A1111 PNG gets: its noise and samplers are A1111's (k-diffusion), not diffusers'."""
    return (f"diffbatch: {where}: made by AUTOMATIC1111 {version}: its samplers (k-diffusion) and noise (GPU random "
            "numbers unless RNG says otherwise, ENSD) are not diffusers', so this image will differ from A1111's; "
            "the settings are its own")


def lora_hashes(text: str) -> list[tuple[str, str]]:
    """A1111's ``Lora hashes`` value, ``NAME: HASH, NAME: HASH``, as (name, hash) pairs."""
    pairs = []
    for item in text.split(","):
        name, _, digest = item.rpartition(":")
        if name.strip() and digest.strip():
            pairs.append((name.strip(), digest.strip()))
    return pairs


def _quoted(key: str) -> str:
    return f"'{key}'" if " " in key else key


# A1111's "Init image hash": the MD5 of the init picture's pixel bytes (PIL's tobytes(), as it was given)
A1111_IMAGE_HASH = re.compile(r"[0-9a-f]{32}")


def a1111_image_hash(image: Image.Image) -> set[str]:
    """The MD5s A1111 may have written for this picture: of its pixels as decoded, and as RGB."""
    hashes = {hashlib.md5(image.tobytes()).hexdigest()}  # noqa: S324 - A1111's fingerprint, not security
    if image.mode != "RGB":
        hashes.add(hashlib.md5(image.convert("RGB").tobytes()).hexdigest())  # noqa: S324
    return hashes


def exif_parameters(image: Image.Image) -> str | None:
    """The infotext A1111 writes into a JPEG's or WebP's EXIF UserComment (piexif's "UNICODE" form: UTF-16,
    big-endian; "ASCII" too), or None."""
    comment: Any = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD, UserComment
    if not isinstance(comment, bytes) or len(comment) < 8:
        return comment if isinstance(comment, str) and comment else None
    prefix, body = comment[:8], comment[8:]
    if prefix == b"UNICODE\x00":
        try:
            return body.decode("utf-16-be")
        except UnicodeDecodeError:
            return None
    if prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        return body.decode("utf-8", errors="replace")
    return None
