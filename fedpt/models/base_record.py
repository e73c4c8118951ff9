"""Which base model an adapter was trained on, so that it is never applied to another one by mistake.

An adapter of the right shapes loads onto any base of the same architecture and gives noise, silently. Every
model folder fedpt trains (round-K/, final/, a central run) gets `fedpt-base.json`: the base's name and a
fingerprint of its weights (a hash of the first row of every tensor in its safetensors files: cheap, and
different for any retrained or other model) and of its tokenizer's files. Loading checks it; a mismatch is an
error unless forced. Adapters fedpt did not train carry no record and are not checked.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from fedpt.errors import FedptError

RECORD = "fedpt-base.json"


def fingerprint(model: str | Path) -> str | None:
    """A hash of the base model's weights (first row of each tensor), or None if they are not safetensors here."""
    from fedpt.models.store import resolve

    try:
        folder = resolve(model)
    except FedptError:
        return None  # a GGUF file or a URL: nothing of its weights to read here
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    return _hash(tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))


@functools.lru_cache(maxsize=16)
def _hash(files: tuple[tuple[str, int, int], ...]) -> str:
    """The fingerprint of these files as they are (their times and sizes in the key): a run hashes its base once,
    not at every round it saves."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    for file, _, _ in files:
        with safe_open(file, framework="pt") as f:
            for key in sorted(f.keys()):
                piece = f.get_slice(key)
                if not piece.get_shape():
                    continue
                digest.update(key.encode())
                digest.update(piece[:1].float().numpy().tobytes())
    return digest.hexdigest()[:32]


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def tokenizer_fingerprint(model: str | Path) -> str | None:
    """A hash of the files that map text to token ids (not the chat template), or None where there are none."""
    from fedpt.models.store import resolve

    try:
        folder = resolve(model)
    except FedptError:
        return None
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:32]


def record_base(folder: Path, base: str | Path) -> None:
    """Write the record into a model folder fedpt trained from `base`."""
    (folder / RECORD).write_text(json.dumps({"base": str(base), "fingerprint": fingerprint(base),
                                             "tokenizer": tokenizer_fingerprint(base)}))


def check_base(folder: str | Path, base: str | Path, force: bool = False) -> None:
    """Refuse to apply a tuned folder to another base than the one it was trained on (unless `force`)."""
    path = Path(folder).expanduser() / RECORD
    if force or not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        theirs = recorded["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise FedptError(f"{path} is damaged; delete it to load the adapter unchecked") from None
    ours = fingerprint(base)
    if theirs and ours and theirs != ours:
        raise FedptError(f"{Path(folder).name} was trained on {recorded.get('base')}, whose weights differ from "
                         f"{base}'s: it would give noise on it; pass the base it was trained on (or --force)")
    words, our_words = recorded.get("tokenizer"), tokenizer_fingerprint(base)
    if words and our_words and words != our_words:  # records of an older fedpt have none
        raise FedptError(f"{Path(folder).name} was trained on {recorded.get('base')}, whose tokenizer differs from "
                         f"{base}'s: the same ids would mean other words; pass the base it was trained on "
                         "(or --force)")
