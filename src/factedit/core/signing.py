"""Signatures of what factedit ships — patch files, PEFT adapters, GGUF files, saved models — in the OpenSSF
model signing format (OMS: a sigstore bundle over the hashes of every file, made by the ``model-signing``
package). Key-based signing and verification work offline; sigstore works where a user has it (their own
``model_signing`` calls on the same files).

    private, public = generate_key("me.key")                     # an EC P-256 key pair (PEM)
    sign("eiffel.safetensors", private)                          # -> eiffel.safetensors.sig
    check("eiffel.safetensors", [public]).state == "verified"

A file's signature is the file beside it with ``.sig`` appended; a folder's is ``factedit.sig`` inside it
(left out of what it signs). The SHA-256 values inside a patch are a damage check only: whoever changes a
patch can recompute them. Authenticity is a signature by a key the user trusts (``--trust``, or
``$FACTEDIT_TRUST``: key files separated by ``os.pathsep``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .errors import FactEditError
from .paths import atomic_path

__all__ = ["SignatureError", "SignatureStatus", "FOLDER_SIGNATURE", "signature_path", "generate_key", "sign",
           "check", "trust_anchors", "require"]

#: a signed folder's signature file (inside it, not part of what it signs)
FOLDER_SIGNATURE = "factedit.sig"
#: the environment variable naming trusted public keys
TRUST_ENV = "FACTEDIT_TRUST"


class SignatureError(FactEditError):
    """A signature is missing where one is required, does not verify, or cannot be made."""


@dataclass(frozen=True)
class SignatureStatus:
    """What is known about a file's signature.

    Attributes:
        state: ``"unsigned"`` (no signature file), ``"unchecked"`` (signed; no trusted key was given),
            ``"verified"`` (by one of the trusted keys) or ``"invalid"`` (no trusted key verifies it: the
            content changed since it was signed, or another key signed it).
        key: the trusted key that verified it.
        detail: why it is invalid.
        signature: the signature file.
    """

    state: str
    signature: str
    key: Optional[str] = None
    detail: str = ""

    @property
    def verified(self) -> bool:
        return self.state == "verified"

    def describe(self) -> str:
        """One line for ``inspect`` and the page."""
        if self.state == "verified":
            return f"signed, verified with {self.key}"
        if self.state == "unchecked":
            return f"signed ({self.signature}); not verified: no trusted key given (--trust or ${TRUST_ENV})"
        if self.state == "invalid":
            return f"signature INVALID ({self.signature}): {self.detail}"
        return "unsigned"

    def to_dict(self) -> dict:
        return {"state": self.state, "signature": self.signature, "key": self.key, "detail": self.detail}


def _library():
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as e:
        raise SignatureError(f"signing needs the model-signing package: pip install 'factedit[sign]' ({e})") from None
    return hashing, signing, verifying


def signature_path(path) -> Path:
    """Where the signature of ``path`` is: ``FILE.sig`` beside a file, ``DIR/factedit.sig`` in a folder."""
    p = Path(path)
    return p / FOLDER_SIGNATURE if p.is_dir() else p.with_name(p.name + ".sig")


def _hashing(path: Path, *leave_out: Path):
    """The hashing of ``path``: a folder's files but ``leave_out`` (its signature, paths relative to it)."""
    hashing, _, _ = _library()
    cfg = hashing.Config()
    return cfg.set_ignored_paths(paths=[Path(p.name) for p in leave_out]) if path.is_dir() else cfg


def generate_key(private_path) -> Tuple[Path, Path]:
    """A new EC P-256 key pair: the private key (PKCS#8 PEM, written with permissions 0600) at ``private_path``
    and the public key beside it as ``<private_path>.pub``. Refuses to overwrite a key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = Path(private_path)
    public = private.with_name(private.name + ".pub")
    for p in (private, public):
        if p.exists():
            raise SignatureError(f"{p} already exists; choose another name (keys are never overwritten)")
    key = ec.generate_private_key(ec.SECP256R1())
    private.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign(path, key, password: Optional[str] = None) -> Path:
    """Sign the file or folder ``path`` with the private key file ``key`` (EC, PEM); returns the signature
    file (written atomically; an existing one is replaced)."""
    p = Path(path)
    if not p.exists():
        raise SignatureError(f"nothing to sign: {p} does not exist")
    if not Path(key).is_file():
        raise SignatureError(f"signing key not found: {key}")
    _, signing, _ = _library()
    sig = signature_path(p)
    with atomic_path(sig, suffix=".sig") as tmp:
        try:
            cfg = signing.Config().use_elliptic_key_signer(private_key=str(key), password=password)
            cfg.set_hashing_config(_hashing(p, sig, tmp)).sign(p, tmp)
        except (ValueError, TypeError, OSError) as e:
            raise SignatureError(f"cannot sign {p} with {key}: {e}") from None
    return sig


def trust_anchors(given: Sequence[str] = ()) -> List[str]:
    """The trusted public keys: ``given``, else those named in ``$FACTEDIT_TRUST``."""
    keys = [str(k) for k in given if k] or [k for k in os.environ.get(TRUST_ENV, "").split(os.pathsep) if k]
    for k in keys:
        if not Path(k).is_file():
            raise SignatureError(f"trusted key not found: {k}")
    return keys


def check(path, trust: Sequence[str] = ()) -> SignatureStatus:
    """The signature status of ``path`` against the trusted public keys ``trust`` (none: not checked)."""
    p = Path(path)
    sig = signature_path(p)
    if not sig.is_file():
        return SignatureStatus("unsigned", str(sig))
    if not trust:
        return SignatureStatus("unchecked", str(sig))
    _, _, verifying = _library()
    reasons = []
    for key in trust:
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=str(key)).set_hashing_config(
                _hashing(p, sig)).verify(p, sig)
            return SignatureStatus("verified", str(sig), key=str(key))
        except Exception as e:  # the library raises ValueError and others for every kind of mismatch
            reasons.append(f"{Path(key).name}: {_reason(str(e))}")
    return SignatureStatus("invalid", str(sig), detail="; ".join(reasons))


def _reason(message: str) -> str:
    """The library's message, readable: which files changed, were added or are missing."""
    import re

    if "Key mismatch" in message:
        return "signed with another key"
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]*)\\?'", message)
    parts = []
    if changed:
        names = ", ".join("the file" if n == "." else n for n in changed)
        parts.append(f"content changed since it was signed ({names})")
    parts += re.findall(r"(Extra files found in model [^\"\]]*|Missing files in model [^\"\]]*)", message)
    return "; ".join(parts) if parts else message.splitlines()[0][:200]


def require(path, trust: Sequence[str] = (), required: bool = False) -> SignatureStatus:
    """:func:`check`, refusing (:class:`SignatureError`) an invalid signature, and with ``required`` anything
    that is not verified by a trusted key."""
    status = check(path, trust)
    if status.state == "invalid":
        raise SignatureError(f"{path}: {status.describe()}; nothing was applied")
    if required and not status.verified:
        why = "no trusted key given (--trust or $FACTEDIT_TRUST)" if status.state == "unchecked" else \
            f"it is unsigned (no {Path(status.signature).name})"
        raise SignatureError(f"{path}: a signature verified by a trusted key is required (--require-signature), but "
                             f"{why}; nothing was applied")
    return status
