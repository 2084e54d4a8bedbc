"""llama.cpp control vectors: export emotion vectors as GGUF, import repeng-style GGUF files.

Format (what llama.cpp's ``--control-vector`` reads): a GGUF file with architecture
``controlvector``, keys ``controlvector.model_hint`` and ``controlvector.layer_count``, and one
float32 tensor ``direction.{i}`` of size ``hidden`` per steered layer. llama.cpp adds
``direction.{i}`` to the output of decoder block ``i``, which is emoscope's layer ``i``; block 0
cannot be steered this way. The exported vectors are ``strength x residual norm x unit vector``,
so ``--control-vector-scaled FILE 1.0`` reproduces emoscope's steering at that strength (and
``--control-vector-scaled FILE 0.5`` halves it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from emoscope.errors import EmoscopeError
from emoscope.files import atomic_path
from emoscope.steer import Steering, steering_vectors
from emoscope.vectors import EmotionBank

ARCH = "controlvector"


def write_control_vector(
    path: Path | str, vectors: Mapping[int, torch.Tensor], model_hint: str
) -> Path:
    """Write ``{layer: vector}`` as a llama.cpp control-vector GGUF file."""
    from gguf import GGUFWriter

    if not vectors:
        raise EmoscopeError("Nothing to export: no layers selected.")
    if min(vectors) < 1:
        raise EmoscopeError(
            "llama.cpp cannot steer layer 0 (direction.0 is invalid); choose layers >= 1."
        )
    path = Path(path)
    if path.is_dir():
        raise EmoscopeError(
            f"{path} is a folder; give a file name such as {path / 'calm.gguf'} (or use --all)."
        )
    with atomic_path(path) as partial:
        writer = GGUFWriter(str(partial), ARCH)
        try:
            writer.add_string(f"{ARCH}.model_hint", model_hint)
            writer.add_uint32(f"{ARCH}.layer_count", len(vectors))
            for layer in sorted(vectors):
                data = vectors[layer].detach().float().cpu().numpy().astype(np.float32)
                writer.add_tensor(f"direction.{layer}", data)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def export_emotions(
    bank: EmotionBank,
    path: Path | str,
    emotions: Mapping[str, float],
    layers: Sequence[int] | None = None,
) -> Path:
    """Export a steering of one or more emotions (``{"happy": 0.3}``) at the given layers.

    ``layers=None`` uses the bank's steering layer, exactly as :class:`Steering` does.
    """
    vectors = steering_vectors(bank, Steering(dict(emotions), layers=layers, force=True))
    return write_control_vector(path, vectors, str(bank.manifest.get("family", "llama")))


def export_bank(
    bank: EmotionBank,
    folder: Path | str,
    strength: float = 1.0,
    layers: Sequence[int] | None = None,
) -> list[Path]:
    """One control-vector file per emotion (``folder/{emotion}.gguf``)."""
    folder = Path(folder)
    return [
        export_emotions(bank, folder / f"{e.replace(' ', '_')}.gguf", {e: strength}, layers)
        for e in bank.emotions
    ]


def read_control_vector(
    path: Path | str, hidden_size: int | None = None
) -> dict[int, torch.Tensor]:
    """Read ``direction.{i}`` tensors from a llama.cpp / repeng control-vector GGUF file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise EmoscopeError(f"No such control-vector file: {path}")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise EmoscopeError(f"{path} is not a readable GGUF file: {exc}") from None
    out: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if not name.startswith("direction."):
            continue
        try:
            layer = int(name.split(".", 1)[1])
        except ValueError:
            continue
        data = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
        if hidden_size is not None and data.numel() != hidden_size:
            raise EmoscopeError(
                f"{path}: {name} has {data.numel()} values; the model's hidden size is {hidden_size}."
            )
        out[layer] = data
    if not out:
        raise EmoscopeError(f"{path} holds no direction.N tensors; it is not a control vector.")
    return out
