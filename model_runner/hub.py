"""Hugging Face Hub model ids (`--model HuggingFaceTB/SmolLM2-135M-Instruct`) -> a local file or directory.

An `org/name` that is not an existing path is looked up on the hub (HF_ENDPOINT, default huggingface.co) and
downloaded once into Hugging Face's own cache (HF_HUB_CACHE or HF_HOME/hub, default ~/.cache/huggingface/hub),
the cache transformers, vLLM and `hf download` share: a model any of them fetched before loads here offline, and
one fetched here serves them too. Only what loading reads is fetched: config, tokenizer and safetensors files,
or, for a repository of GGUF files alone, its one .gguf (never code: .py files are not in the patterns). The
result goes through loader.py's checks like any local directory (no trust_remote_code anywhere).

Without the hub (HF_HUB_OFFLINE=1, no network, a connection error) a cached snapshot is used as it is; with none,
the error says the id was recognised, the hub could not be reached, and how to pass a local directory instead.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import ModelLoadError

# What loading reads (loader.py): config.json, the tokenizer's files, the weights. generation_config.json is not
# read by jitney but is tiny, and keeps the snapshot a complete transformers model directory for a reference.
HF_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
               "vocab.json", "merges.txt", "added_tokens.json", "*.safetensors", "*.safetensors.index.json"]
GGUF_PATTERN = "*.gguf"
_resolved: dict[str, Path] = {}  # one download (or look-up) per id per process: gguf_source asks again


def is_hub_id(name: str) -> bool:
    """An `org/name` the hub could hold, and not a path on this machine (a path always wins)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith(("~", ".")) or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_cache() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def local_dir_hint(repo_id: str) -> str:
    return (f"or download it elsewhere (hf download {repo_id}) and pass the directory: "
            f"--model /path/to/{repo_id.split('/')[1]}")


def resolve(repo_id: str, progress: bool = True) -> Path:
    """The snapshot's directory (safetensors) or its .gguf file, downloading what is missing when the hub answers."""
    if repo_id not in _resolved:
        _resolved[repo_id] = _model_file(repo_id, _snapshot(repo_id, progress))
    return _resolved[repo_id]


def _snapshot(repo_id: str, progress: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (DryRunError, GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if reason is None:
        try:  # what the repository holds (one listing, a HEAD per matching file; nothing downloaded)
            listing = snapshot_download(repo_id, allow_patterns=HF_PATTERNS + [GGUF_PATTERN], dry_run=True)
        except (DryRunError, RevisionNotFoundError) as e:
            cause = e.__cause__ or e
            if isinstance(cause, GatedRepoError):
                raise ModelLoadError(f"{repo_id} on {constants.ENDPOINT} is gated: accept its terms on the hub, "
                                     f"set HF_TOKEN to a token of that account, {local_dir_hint(repo_id)}") from None
            if isinstance(cause, RepositoryNotFoundError) or (
                    isinstance(cause, HfHubHTTPError) and cause.response is not None
                    and cause.response.status_code in (401, 404)):
                raise ModelLoadError(f"{repo_id!r} is neither a local path nor a model on {constants.ENDPOINT} "
                                     f"(a private one needs HF_TOKEN): check the name, or give a .gguf file or a "
                                     f"model directory") from None
            reason = f"{type(cause).__name__}: {_one_line(cause)}"
        else:
            return _download(repo_id, listing, progress)
    try:  # no hub: a snapshot some earlier download left in the cache
        return Path(snapshot_download(repo_id, allow_patterns=HF_PATTERNS, local_files_only=True))
    except IncompleteSnapshotError as e:
        raise ModelLoadError(f"the cached copy of {repo_id} in {hub_cache()} is incomplete and the hub could not "
                             f"be reached ({reason}): connect once to finish the download, "
                             f"{local_dir_hint(repo_id)}") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"{repo_id} reads as a Hugging Face Hub model id, but the hub could not be reached "
                             f"({reason}) and {hub_cache()} holds no copy of it: connect once to download it, "
                             f"{local_dir_hint(repo_id)}") from None


def _download(repo_id: str, listing, progress: bool) -> Path:
    """Safetensors when the repository has them (a GGUF beside them is a quantized copy: not fetched), else its one
    GGUF file; several GGUF files are several quantizations, and which one to serve is the operator's choice."""
    from huggingface_hub import constants, snapshot_download
    names = [f.filename for f in listing]
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if any(n.endswith(".safetensors") for n in names):
        patterns = HF_PATTERNS
    elif len(ggufs) == 1:
        patterns = HF_PATTERNS + ggufs
    elif ggufs:
        shown = ", ".join(ggufs[:6]) + (f", ... ({len(ggufs)} in all)" if len(ggufs) > 6 else "")
        raise ModelLoadError(f"{repo_id} holds several GGUF files ({shown}): download the one to serve "
                             f"(hf download {repo_id} FILE.gguf) and pass its path: --model /path/to/FILE.gguf")
    else:
        raise ModelLoadError(f"{repo_id} holds neither *.safetensors nor a .gguf file: jitney loads those only "
                             f"(a repository of .bin or .pth weights: convert it to safetensors first)")
    size = sum(f.file_size or 0 for f in listing if f.will_download and f.filename in _matching(names, patterns))
    if progress and size:
        print(f"downloading {repo_id} from {constants.ENDPOINT} into {hub_cache()} ({size / 2**20:,.1f} MiB, "
              f"once; later starts use the cached copy)", file=sys.stderr, flush=True)
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def _matching(names: list[str], patterns: list[str]) -> set[str]:
    from huggingface_hub.utils import filter_repo_objects
    return set(filter_repo_objects(names, allow_patterns=patterns))


def _model_file(repo_id: str, snapshot: Path) -> Path:
    """The directory when it holds safetensors, else its one .gguf file."""
    if any(snapshot.glob("*.safetensors")):
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    what = f"{len(ggufs)} GGUF files" if ggufs else "no *.safetensors and no .gguf file"
    raise ModelLoadError(f"the cached snapshot of {repo_id} ({snapshot}) has {what}: pass the file or directory "
                         f"to serve: --model /path/to/it")


def _one_line(e: BaseException) -> str:
    line = " ".join(s.strip() for s in str(e).splitlines() if s.strip()) or type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."

