"""Portable adapters: ``adapter_config.json`` names its base as another machine finds it, not by this machine's
cache folder.

peft's ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` loads the base that ``base_model_name_or_path`` names.
peft fills that field from the loaded model's ``name_or_path``, which for an alias or a converted checkpoint is a
folder under peftlab's cache that exists nowhere else. The field gets the base's hub id wherever one is known (an
alias's, a hub id as given, or the ``_name_or_path`` a local folder declares), else the name the user gave. The
run record keeps the local folder the run loaded (``model.source``), which `peftlab eval --adapter` reads through
the run's config, so evaluation still finds the base offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def portable_base_name(name: str, source: str) -> str:
    """The name an adapter's config gives its base: the hub id where known, else the name the user gave."""
    from peftlab.model_card import base_model_id

    return base_model_id(name, source) or name


def name_portable_base(adapter_dir: Path, loaded: Any) -> None:
    """Rewrite a saved adapter's ``base_model_name_or_path`` to the base's portable name (atomically; a folder
    without an adapter config, a full fine-tune, is left alone).

    After the save, not before: peft's save looks the named base up to check the vocabulary, which for a hub id
    would be a network request."""
    if loaded.name is None:
        return
    base = portable_base_name(loaded.name, str(loaded.source))
    for path in sorted(Path(adapter_dir).glob("**/adapter_config.json")):
        config = json.loads(path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(partial, path)
