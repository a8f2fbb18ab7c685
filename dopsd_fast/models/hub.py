"""Weights by Hugging Face id: ``owner/name`` or ``owner/name@revision`` -> a snapshot folder of the local Hub cache.

The config keys that name weights (``model.pretrained``, ``model.text_encoder|tokenizer|vae``,
``context.teacher_model``) take a local path or a Hub id. A path that exists is used as it is. A string shaped like
``owner/name`` (optionally ``@revision``: a branch, tag or commit hash) goes through
``huggingface_hub.snapshot_download`` with ``allow_patterns`` naming only the repo folders the run reads, into
huggingface_hub's own cache: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (shared with
diffusers and transformers). A warm cache costs one metadata request; ``HF_HUB_OFFLINE=1`` reads the cache only.
Every failure is a WeightsError naming the id and the fix.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from .loading import WeightsError

# owner/name as the Hub spells repo ids (letters, digits, - _ .), then an optional @revision
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@]+))?")
# the top-level files of a transformers repo (a Qwen3-VL teacher): configs, weights, tokenizer, chat template
ROOT_FILES = ("*.json", "*.safetensors", "*.txt", "*.jinja")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when ``spec`` is a Hub id; None when it is a local path: one that exists, or
    one not shaped like ``owner/name[@revision]`` (absolute, ``./``, ``~/``, more than one ``/``)."""
    if Path(spec).expanduser().exists():
        return None
    m = HUB_ID.fullmatch(spec)
    if m is None or m["repo"].split("/")[1] in (".", ".."):
        return None
    return m["repo"], m["revision"]


def allow_patterns(folders: Sequence[str]) -> list[str]:
    """The files of ``folders`` inside a repo ("" = the repo's top-level files)."""
    return [p for f in folders for p in ((f"{f}/*",) if f else ROOT_FILES)]


def snapshot(spec: str, folders: Sequence[str], required: Sequence[str] = (), download: bool = True) -> Path | None:
    """The local snapshot folder of Hub id ``spec`` with ``folders`` in it (downloaded if missing; "" = top-level
    files); each of ``required`` must be there. ``download=False``: the cache only, None on a miss (a dry run
    plans before the download)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, revision = parse_hub_id(spec) or (spec, None)
    at = f" at revision {revision!r}" if revision else ""
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        root = Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=allow_patterns(folders),
                                                      local_files_only=not download))
    except HFValidationError as err:
        raise WeightsError(f"{spec}: no local path of that name, and not a valid Hugging Face id ({err})") from None
    except RevisionNotFoundError:
        raise WeightsError(f"{spec}: the Hugging Face repo {repo} has no revision {revision!r} (a branch, tag or "
                           "commit hash after the @)") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"{spec}: no local path of that name, and no Hugging Face repo {repo} (or it is private "
                           "or gated: `hf auth login` or HF_TOKEN)") from None
    except LocalEntryNotFoundError as err:
        if not download:
            return None
        why = ("HF_HUB_OFFLINE=1 is set: run once online to download it" if offline else
               f"the Hub could not be reached ({' '.join(str(err).split())[:200]})")
        raise WeightsError(f"{spec}: no local path of that name, and {repo}{at} is not (completely) in the Hugging "
                           f"Face cache {constants.HF_HUB_CACHE}; {why}, or set the key to a local folder") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise WeightsError(f"{spec}: downloading {repo}{at} failed ({' '.join(str(err).split())[:300]}); "
                           "try again, or set the key to a local folder") from None
    missing = [f for f in required if not (root / f).is_dir()]
    if missing:
        fix = ("run once online (without HF_HUB_OFFLINE=1) to download them" if offline else
               "point the key at a repo in the diffusers layout, or at a local folder")
        raise WeightsError(f"{spec}: the snapshot of {repo}{at} (commit {root.name}, {root}) has no "
                           f"{', '.join(f + '/' for f in missing)} folder{'s' if len(missing) > 1 else ''}; {fix}")
    return root
