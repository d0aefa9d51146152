"""``factedit keygen | sign | verify``: signatures of what factedit ships (:mod:`factedit.core.signing`)."""

from __future__ import annotations

import json

from ..core.signing import SignatureError, check, generate_key, sign, trust_anchors

__all__ = ["cmd_keygen", "cmd_sign", "cmd_verify"]


def cmd_keygen(settings) -> int:
    private, public = generate_key(settings["key_path"])
    print(f"wrote the private key {private} (keep it) and the public key {public} (give it to who verifies)")
    return 0


def cmd_sign(settings) -> int:
    sig = sign(settings["target"], settings["key"])
    print(json.dumps({"signed": settings["target"], "signature": str(sig)}) if settings["json"]
          else f"signed {settings['target']}: {sig}")
    return 0


def cmd_verify(settings) -> int:
    status = check(settings["target"], trust_anchors(settings["trust"] or ()))
    if settings["json"]:
        print(json.dumps({"path": settings["target"], **status.to_dict()}))
    else:
        print(f"{settings['target']}: {status.describe()}")
    if not status.verified:
        raise SignatureError(f"{settings['target']} is not verified by a trusted key ({status.state})")
    return 0
