"""A model's weights read one tensor at a time (audit never holds two whole models).

    files = TensorFiles.open("path/to/model")        # a folder, a .gguf file, a hub id or None (the default)
    for name in files.names: w = files.get(name)     # the tensor as stored (its own dtype)
    rows = files.lazy(name); rows.rows(0, 128)       # or a block of its rows, read from the file now
    bare = TensorFiles.of_file("upload.safetensors", config=files.config)   # one weights file, another's config

The folder's ``config.json`` gives the architecture; the weights are every ``*.safetensors`` file in it (a
sharded model's index is not needed: each shard names its tensors). GGUF files are dequantized into a cached
safetensors folder first (:func:`~factedit.core.models.gguf_model_dir`: one model in memory, once per file).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..core.errors import FactEditError
from ..core.models import check_model_files, model_folder, safetensors_offsets

__all__ = ["AuditError", "TensorFiles", "LoadedTensors", "FileRows"]

#: safetensors dtypes read block by block (others are read whole through safetensors)
_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class AuditError(FactEditError):
    """The models cannot be compared (unreadable, or not the same architecture and shapes)."""


class _Source:
    """What :class:`TensorFiles` and :class:`LoadedTensors` share: ``config`` and the tensors' ``names``."""

    config: dict

    @property
    def names(self) -> List[str]:
        return sorted(self._tensor_names())

    @property
    def model_type(self) -> Optional[str]:
        return self.config.get("model_type")

    def _tensor_names(self):
        raise NotImplementedError


class TensorFiles(_Source):
    """The tensors of one model folder: names, shapes and dtypes from the safetensors headers, values on demand."""

    def __init__(self, folder, label: Optional[str] = None, files: Optional[List[Path]] = None,
                 config: Optional[dict] = None):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.label = label or str(folder)
        if config is not None:  # a bare weights file (:meth:`of_file`): checked there
            self.config = dict(config)
        else:
            try:
                self.config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise AuditError(f"{self.label}: no readable config.json in {self.folder} ({e})") from None
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise AuditError(f"{self.label}: no safetensors weights in {self.folder}")
            try:
                check_model_files(self.folder)
            except FactEditError as e:
                raise AuditError(f"{self.label}: {e}") from None
        self._where: Dict[str, Path] = {}
        self._meta: Dict[str, tuple] = {}
        self._offset: Dict[str, int] = {}  # where a tensor's bytes start in its file
        for f in files:
            try:
                self._offset.update(safetensors_offsets(f))
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():
                        sl = h.get_slice(name)
                        self._where[name] = f
                        self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise AuditError(f"{self.label}: {f.name} is not a readable safetensors file ({e})") from None

    @classmethod
    def open(cls, name: Optional[str]) -> "TensorFiles":
        """The weights behind a ``--model`` name (:func:`~factedit.core.models.model_folder`)."""
        return cls(model_folder(name), label=name or "the embedded default model")

    @classmethod
    def of_file(cls, path, config: dict, label: Optional[str] = None) -> "TensorFiles":
        """One ``.safetensors`` file without a folder around it (an upload, a ``model.safetensors`` sent alone),
        read with ``config``: the architecture of the model it is compared with, whose tensor names and
        shapes it must then have (:func:`~factedit.audit.compare.audit_files` checks them)."""
        from ..core.models import check_safetensors_file

        path = Path(path)
        if not path.is_file():
            raise AuditError(f"{path} does not exist")
        try:
            check_safetensors_file(path)
        except FactEditError as e:
            raise AuditError(f"{label or path}: {e}") from None
        return cls(path.parent, label=label or str(path), files=[path], config=config)

    @staticmethod
    def is_bare_file(name) -> bool:
        """Whether a model name is one ``.safetensors`` file (see :meth:`of_file`)."""
        return name is not None and str(name).lower().endswith(".safetensors") and Path(name).is_file()

    def _tensor_names(self):
        return self._where

    def shape(self, name: str) -> tuple:
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors names it (``F32``, ``BF16``, ``F16``...)."""
        return self._meta[name][1]

    def lazy(self, name: str) -> "FileRows":
        """The tensor's rows, read from its file a block at a time when asked (what audit compares)."""
        return FileRows(self, name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (read from its file now; nothing is kept)."""
        from safetensors import safe_open

        path = self._where[name]
        try:
            with safe_open(str(path), framework="pt") as h:
                return h.get_tensor(name)
        except Exception as e:
            raise AuditError(f"{self.label}: tensor {name} of {path.name} cannot be read ({e})") from None


class FileRows:
    """Rows ``start:stop`` of one stored tensor, read with plain file reads (no memory map: a map's touched
    pages would count against the process until it closed, i.e. the whole tensor)."""

    def __init__(self, files: "TensorFiles", name: str):
        self.files, self.name = files, name
        self.shape = files.shape(name)
        self._dtype = _ST_TORCH.get(files.dtype(name))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self._dtype is None:  # an exotic dtype: read whole (rare, and never a weight matrix we compare)
            t = self.files.get(self.name)
            return t[start:stop] if t.ndim else t.reshape(1)
        inner, width = math.prod(self.shape[1:]), self._dtype.itemsize
        count = (stop - start) * inner if self.shape else 1
        out = torch.empty(count, dtype=self._dtype)
        if count:
            path = self.files._where[self.name]
            offset = self.files._offset[self.name] + start * inner * width
            view, done = memoryview(out.view(torch.uint8).numpy()), 0
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    while done < len(view):  # a read may return less than asked (e.g. over 2 GiB)
                        got = os.preadv(fd, [view[done:]], offset + done)
                        if got == 0:
                            raise AuditError(f"{self.files.label}: tensor {self.name} of {path.name} is truncated")
                        done += got
                finally:
                    os.close(fd)
            except OSError as e:
                raise AuditError(f"{self.files.label}: tensor {self.name} of {path.name} cannot be read "
                                 f"({e.strerror or e})") from None
        return out.reshape((stop - start, *self.shape[1:]) if self.shape else (1,))


class LoadedTensors(_Source):
    """The same interface over a model already in memory (its ``state_dict``; nothing is copied): audit the model
    an :class:`~factedit.editor.Editor` holds against the folder it was loaded from."""

    def __init__(self, model, label: Optional[str] = None):
        self.label = label or "the loaded model"
        self.config = model.config.to_dict()
        self._tensors = {k: v for k, v in model.state_dict().items()}
        if self.config.get("tie_word_embeddings"):
            self._tensors.pop("lm_head.weight", None)  # the embedding itself, saved once

    def _tensor_names(self):
        return self._tensors

    def shape(self, name: str) -> tuple:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> str:
        from .spectrum import dtype_name

        return dtype_name(self._tensors[name])

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach().cpu()

    def lazy(self, name: str) -> torch.Tensor:
        """The tensor itself (it is in memory already; :func:`~factedit.audit.spectrum.classify` reads its rows)."""
        return self.get(name)
