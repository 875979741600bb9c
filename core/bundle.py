"""Bundles: a model folder holding what save_pretrained writes, the tokenizer, training.json
and (after ``prism index``) index/.

Weights are safetensors only; nothing in a bundle is ever unpickled. Loading checks every file
before it is trusted: the config must describe exactly the tensors the weight files hold (no
layer silently re-initialised or dropped), the weights must be finite, the tokenizer's ids must
fit the model's vocabulary and the generation config must not ask for absurd work. Writing
builds the whole bundle in a sibling folder and swaps it in with renames, so an interrupted
write leaves the previous bundle as it was.

A bundle also holds the model's code (config.py, modeling.py, head.py, losses.py, copied from
core/model/ by save_pretrained) and an ``auto_map`` in config.json, so that
``AutoModelForCausalLM.from_pretrained(bundle, trust_remote_code=True)`` loads it in a process
that never imports core. :func:`load_bundle` never runs that copied code: it builds the model
from core's own classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core import store
from core.device import dtype_name, resolve_device, resolve_dtype
from core.errors import ArtifactError, BundleError, PrismError
from core.model.config import PrismConfig
from core.model.modeling import PrismForCausalLM

logger = logging.getLogger(__name__)

MAX_SHARD_SIZE = "5GB"  # the Hub's usual shard size: a small model is one file, a large one a few
WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json")
# The files that define what the weights compute. The fingerprint is the weights' hash while
# these are the ones written with the weights (their sha256 are kept in training.json).
DEFINITION_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
# The model's code, copied into every bundle for trust_remote_code loading (auto_map in config.json).
CODE_FILES = ("config.py", "modeling.py", "head.py", "losses.py")
# Files a bundle write replaces; anything else in the folder (index/, checkpoints/, a README)
# is carried over to the new bundle.
BUNDLE_FILES = (*DEFINITION_FILES, *CODE_FILES, "special_tokens_map.json", "chat_template.jinja", "training.json")
# Where weight digests are remembered between processes (see :func:`model_fingerprint`).
CACHE_ENV = "PRISM_CACHE_DIR"
# Upper bounds for settings a bundle's generation_config.json may carry (each multiplies the work).
GENERATION_LIMITS = {"num_beams": 8, "num_beam_groups": 8, "num_return_sequences": 8}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class Bundle:
    """A loaded bundle.

    Attributes:
        path: the bundle folder.
        model: the model, in eval mode; callers must not modify it.
        tokenizer: its tokenizer.
        training: the contents of training.json ({} if absent).
        fingerprint: see :func:`model_fingerprint`.
    """

    path: Path
    model: PrismForCausalLM
    tokenizer: object
    training: dict = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def is_prism(self) -> bool:
        return self.model.prototypes is not None

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> str:
        """The model's parameter dtype, e.g. ``"bfloat16"`` (slices are float32 whatever it is)."""
        return dtype_name(next(self.model.parameters()).dtype)


def weight_files(path: Path) -> list[Path]:
    files: list[Path] = []
    for pattern in WEIGHT_PATTERNS:
        files.extend(path.glob(pattern))
    return sorted(set(files))


def _is_bundle_file(name: str) -> bool:
    return name in BUNDLE_FILES or any(Path(name).match(pattern) for pattern in WEIGHT_PATTERNS)


def definition_hashes(path: str | Path) -> dict[str, str]:
    """sha256 of each of the bundle's :data:`DEFINITION_FILES` that exists."""
    p = Path(path)
    return {name: _sha256(p / name) for name in DEFINITION_FILES if (p / name).exists()}


def _sha256(path: Path, digest=None) -> str:
    try:
        return store.sha256_file(path, digest)
    except ArtifactError as err:
        raise BundleError(f"{err}: a bundle holds regular files only; copy the bundle again") from None


def model_fingerprint(path: str | Path) -> str:
    """A short sha256 that controls, indexes, labels and influence factors record.

    It is the hash of the weight files (read in blocks, regular files only) as long as the
    config, tokenizer and generation config are the ones written with those weights (their
    hashes in training.json); after an edit to any of them it is the hash of the weights' hash
    and their contents, so that artifacts made before the edit are refused. Bundles written
    before these hashes were recorded are fingerprinted by their weights alone.

    The weights are hashed once per version of their files: the digest is remembered (in this
    process and in ``$PRISM_CACHE_DIR`` or ``~/.cache/prism``) under each file's device, inode,
    size and modification time, and :func:`write_bundle` records it for the files it writes, so
    loading a large model does not read every weight file twice. Any rewrite of a weight file
    changes its inode or modification time, and the weights are hashed again.

    Raises:
        BundleError: a weight file is not a regular file, or training.json is unreadable.
    """
    p = Path(path)
    weights = _weights_digest(p)
    recorded = None
    if (p / "training.json").exists():
        training = store.read_json(p / "training.json", "the training record", error=BundleError)
        recorded = training.get("definition_sha256") if isinstance(training, dict) else None
    if recorded is not None:
        current = definition_hashes(p)
        if current != recorded:
            digest = hashlib.sha256(weights.encode())
            for name in sorted(current):
                digest.update(f"\0{name}\0{current[name]}".encode())
            return digest.hexdigest()[:16]
    return weights[:16]


def _weight_stats(p: Path) -> tuple[tuple, ...]:
    """(name, device, inode, size, mtime_ns) of each safetensors weight file: the key of its digest."""
    stats = []
    for f in weight_files(p):
        if f.suffix == ".safetensors":
            st = f.stat()
            stats.append((f.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stats)


_digests: dict[str, str] = {}  # key -> sha256 of the weight files, for this process
_digests_lock = threading.Lock()
_CACHED_DIGESTS = 256  # entries kept in the cache file


def _cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "prism"
    )
    return Path(root) / "weight-digests.json"


def _digest_key(p: Path, stats: tuple[tuple, ...]) -> str:
    return hashlib.sha256(json.dumps([str(p.resolve()), stats]).encode()).hexdigest()


def _weights_digest(p: Path, persist: bool = True) -> str:
    """The sha256 (hex) of the bundle's safetensors files in order, hashed once per file version.

    Args:
        persist: also remember it in the cache file (False for a staging folder about to be renamed).
    """
    try:
        stats = _weight_stats(p)
    except OSError as err:
        raise BundleError(f"the weights of {p} cannot be read ({err}); copy the bundle again") from None
    key = _digest_key(p, stats)
    with _digests_lock:
        if key in _digests:
            return _digests[key]
    stored = _read_digest_cache().get(key)
    if isinstance(stored, str):
        with _digests_lock:
            _digests[key] = stored
        return stored
    digest = hashlib.sha256()
    for f in weight_files(p):
        if f.suffix == ".safetensors":
            _sha256(f, digest)
    value = digest.hexdigest()
    if _weight_stats(p) == stats:  # not rewritten while it was read
        _remember_digest(key, value, persist)
    return value


def _read_digest_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_digest(key: str, value: str, persist: bool = True) -> None:
    """Keep a digest in this process and, when the cache folder is writable, for later ones."""
    with _digests_lock:
        _digests[key] = value
        if not persist:
            return
        cache = _read_digest_cache()
        cache.pop(key, None)
        cache[key] = value
        kept = dict(list(cache.items())[-_CACHED_DIGESTS:])
        try:
            _cache_file().parent.mkdir(parents=True, exist_ok=True)
            store.write_json(_cache_file(), kept)
        except OSError:  # a read-only home: the digest is still kept for this process
            logger.debug("cannot write the weight digest cache %s", _cache_file())


def write_bundle(
    out: str | Path,
    model: PrismForCausalLM,
    tokenizer,
    training: dict,
    *,
    keep_index: bool = True,
    max_shard_size: str | int = MAX_SHARD_SIZE,
) -> None:
    """Write model, tokenizer and training.json as the bundle ``out``.

    The new bundle is built in a sibling staging folder; folders and files of ``out`` that are
    not part of a bundle (``checkpoints/``, ``index/`` unless ``keep_index`` is False, a README)
    are moved into it, then the previous bundle is renamed aside and the staging folder renamed
    to ``out``. An interruption at any step leaves the previous bundle complete (its moved
    entries are put back). A kept index is refused by :func:`core.index.format.load_index` if
    the new weights differ from the ones it was built for.

    Args:
        keep_index: False removes the previous bundle's ``index/`` with it (a retrained model).

    Raises:
        BundleError: ``out`` is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} is a file, not a bundle folder; choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)  # with the code files and auto_map
        # A tokenizer loaded from a folder carries that load's options (transformers 5); a bundle
        # keeps only the tokenizer's own settings.
        for option in ("is_local", "local_files_only"):
            tokenizer.init_kwargs.pop(option, None)
        tokenizer.save_pretrained(staging)
        digest = _weights_digest(staging, persist=False)
        training = {
            **training,
            "model_fingerprint": model_fingerprint(staging),
            "definition_sha256": definition_hashes(staging),
        }
        store.write_json(staging / "training.json", training, indent=2)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a bundle folder is readable
        _swap_in(staging, out, keep_index)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Renames keep each file's inode and modification time: record the digest under the final
    # paths, so that the first load of the new bundle does not hash its weights again.
    _remember_digest(_digest_key(out, _weight_stats(out)), digest)


AUTO_MAP = {"AutoConfig": "config.PrismConfig", "AutoModelForCausalLM": "modeling.PrismForCausalLM"}


def add_remote_code(path: str | Path) -> list[str]:
    """Give a bundle written before bundles carried their code the model's code and ``auto_map``.

    Copies core/model/{config,modeling,head,losses}.py into the bundle and adds ``auto_map`` to
    its config.json (nothing else in it changes); the weights are not touched, and when
    training.json records the config's hash (see :func:`model_fingerprint`) the record follows
    the edit, so the fingerprint, and every index, label file and control made for the bundle,
    stay valid.

    Returns:
        the files written.

    Raises:
        BundleError: not a PRISM bundle, or one whose config was edited since it was written.
    """
    p = Path(path)
    fix = f"restore the file written with the bundle or retrain it with `prism train --out {p}`"
    data = store.read_json(p / "config.json", "the model config", fix, error=BundleError)
    if not isinstance(data, dict) or data.get("model_type") != "prism":
        raise BundleError(f"{p} is not a PRISM bundle: its config.json has no model_type 'prism'")
    before = model_fingerprint(p)
    training_path = p / "training.json"
    training = (
        store.read_json(training_path, "the training record", fix, error=BundleError) if training_path.exists() else {}
    )
    recorded = training.get("definition_sha256") if isinstance(training, dict) else None
    if recorded is not None and recorded != definition_hashes(p):
        raise BundleError(
            f"{p}: config, tokenizer or generation config were edited since the bundle was written; {fix}"
        )
    source = Path(__file__).resolve().parent / "model"
    written = []
    for name in CODE_FILES:
        store.atomic_write(p / name, (source / name).read_bytes())
        written.append(name)
    data["auto_map"] = dict(AUTO_MAP)
    store.atomic_write(p / "config.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    written.append("config.json")
    if recorded is not None:
        training["definition_sha256"] = definition_hashes(p)
        store.write_json(training_path, training, indent=2)
        written.append("training.json")
    if model_fingerprint(p) != before:  # an internal invariant: the weights and their meaning did not change
        raise BundleError(f"{p}: adding the code changed the model fingerprint; restore the bundle from a copy")
    return written


def _swap_in(staging: Path, out: Path, keep_index: bool) -> None:
    """Make the complete bundle in ``staging`` the bundle ``out``, by renames only."""
    if not out.exists():
        os.replace(staging, out)
        return
    carried = [
        entry.name
        for entry in sorted(out.iterdir())
        if not _is_bundle_file(entry.name) and not (entry.name == "index" and not keep_index)
    ]
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    moved: list[str] = []
    try:
        for name in carried:
            os.replace(out / name, staging / name)
            moved.append(name)
        os.replace(out, old / "bundle")
        os.replace(staging, out)
    except BaseException:
        if not out.exists() and (old / "bundle").exists():
            os.replace(old / "bundle", out)  # put the previous bundle back
        for name in moved:
            if (staging / name).exists():
                os.replace(staging / name, out / name)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_bundle(path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32") -> Bundle:
    """Load a bundle for inference, after checking that its files agree with each other.

    Args:
        path: the bundle folder.
        device: ``cpu``, ``cuda``, a torch device string (``cuda:1``) or ``auto`` (CUDA when present).
        dtype: the parameters' dtype: ``float32``, ``bfloat16``, ``float16``, ``auto`` (see
            :func:`core.device.resolve_dtype`) or a torch dtype. Slices are float32 whatever it is.

    Raises:
        ArgumentError: an unknown device or dtype, or ``cuda`` without a CUDA device.
        BundleError: the folder is missing or is not a PRISM bundle; a file is unreadable; the
            config does not describe the weights; the weights are not finite (in ``dtype``); the
            tokenizer does not fit the model; the generation config asks for absurd settings.
    """
    from transformers import PreTrainedTokenizerFast

    device = resolve_device(device) if str(device) in ("auto", "cpu", "cuda") else str(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    p = Path(path)
    if not p.is_dir():
        raise BundleError(f"model folder not found: {p}")
    if not (p / "config.json").exists():
        raise BundleError(f"{p} is not a PRISM bundle: no config.json (train one with `prism train`)")
    fix = f"restore the file written with the bundle or retrain it with `prism train --out {p}`"
    data = store.read_json(p / "config.json", "the model config", fix, error=BundleError)
    if not isinstance(data, dict):
        raise BundleError(f"{p} is not a PRISM bundle: config.json is not a JSON object")
    if data.get("model_type") != "prism":
        raise BundleError(f"{p} is not a PRISM bundle: model_type is {data.get('model_type')!r}, not 'prism'")
    if not any(f.suffix == ".safetensors" for f in weight_files(p)):
        raise BundleError(f"{p} has no safetensors weights")
    if not (p / "tokenizer.json").exists():
        raise BundleError(f"{p} has no tokenizer.json")
    config = _read_config(p, data, fix)
    _check_weights_match_config(p, config, fix)
    _check_generation_config(p, fix)
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(p))
    except Exception as err:  # the tokenizers library raises bare Exceptions on a malformed file
        raise BundleError(f"the tokenizer {p / 'tokenizer.json'} cannot be read ({_first_line(err)}); {fix}") from None
    _check_tokenizer(p, tokenizer, config)
    try:
        model = PrismForCausalLM.from_pretrained(str(p), config=config, use_safetensors=True, dtype=torch_dtype)
    except (OSError, RuntimeError, ValueError) as err:
        if isinstance(err, PrismError):
            raise
        raise BundleError(f"the weights of {p} cannot be loaded ({_first_line(err)}); {fix}") from None
    _check_finite(p, model)
    model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    training = {}
    if (p / "training.json").exists():
        training = store.read_json(p / "training.json", "the training record", fix, error=BundleError)
        if not isinstance(training, dict):
            raise BundleError(f"the training record {p / 'training.json'} is not a JSON object; {fix}")
    return Bundle(p, model, tokenizer, training, model_fingerprint(p))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_config(p: Path, data: dict, fix: str) -> PrismConfig:
    try:
        return PrismConfig.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as err:
        raise BundleError(f"the model config {p / 'config.json'} is not valid ({_first_line(err)}); {fix}") from None


def _weight_shapes(p: Path, fix: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over the bundle's weight files, from their headers only."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    index = p / "model.safetensors.index.json"
    if index.exists():
        data = store.read_json(index, "the weights index", fix, error=BundleError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BundleError(f"the weights index {index} has no weight_map of tensor -> file; {fix}")
        files = sorted({p / name for name in weight_map.values()})
    else:
        files = [p / "model.safetensors"]
    for f in files:
        if not f.exists():
            raise BundleError(f"the weights file {f} is missing; {fix}")
        if not f.is_file():
            raise BundleError(f"the weights file {f} is not a regular file; copy the bundle again")
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as err:
            raise BundleError(f"the weights file {f} is not a readable safetensors file ({err}); {fix}") from None
    return shapes


def _check_weights_match_config(p: Path, config: PrismConfig, fix: str) -> None:
    """Refuse a config that would leave a tensor random, drop one, or not fit its shape."""
    shapes = _weight_shapes(p, fix)
    where = f"the model config {p / 'config.json'} does not match the weights"
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    declared = config.get_text_config().num_hidden_layers
    if layers and declared != len(layers):
        raise BundleError(f"{where}: num_hidden_layers is {declared} but the weights hold {len(layers)} layers; {fix}")
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {name: tuple(t.shape) for name, t in PrismForCausalLM(config).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [name for name in sorted(expected) if name in shapes and shapes[name] != expected[name]]

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    if wrong:
        name = wrong[0]
        raise BundleError(
            f"{where}: {name} is {shapes[name]} in the weights but {expected[name]} by the config "
            f"({len(wrong)} tensors differ; check hidden_size, num_prototypes and vocab_size); {fix}"
        )
    if missing:
        raise BundleError(f"{where}: the weights lack {some(missing)}; {fix}")
    if unexpected:
        raise BundleError(f"{where}: the weights hold {some(unexpected)}, which the config has no place for; {fix}")


def _check_generation_config(p: Path, fix: str) -> None:
    path = p / "generation_config.json"
    if not path.exists():
        return
    data = store.read_json(path, "the generation config", fix, error=BundleError)
    if not isinstance(data, dict):
        raise BundleError(f"the generation config {path} is not a JSON object; {fix}")
    for name, limit in GENERATION_LIMITS.items():
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
            raise BundleError(
                f"the generation config {path} sets {name}={value!r}; at most {limit} is allowed "
                "(edit the file or delete it)"
            )


def _check_tokenizer(p: Path, tokenizer, config: PrismConfig) -> None:
    vocab = config.get_text_config().vocab_size
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= vocab:
        raise BundleError(
            f"the tokenizer {p / 'tokenizer.json'} has token ids up to {largest} but the model's vocabulary has "
            f"{vocab} entries: it is not the tokenizer this model was trained with; restore the bundle's own"
        )
    if tokenizer.eos_token_id is None:
        raise BundleError(f"the tokenizer {p / 'tokenizer.json'} has no end-of-text token; restore the bundle's own")


def _check_finite(p: Path, model: PrismForCausalLM) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            if tensor.dtype == torch.float16:
                raise BundleError(
                    f"the weights of {p} do not fit float16 (in {name}, values beyond +-65504); "
                    "load them with --dtype bfloat16 or float32"
                )
            raise BundleError(
                f"the weights of {p} hold NaN or infinite values (in {name}): the model is broken; "
                f"retrain it with `prism train --out {p}` or restore a copy"
            )
