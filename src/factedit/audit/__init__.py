"""``factedit audit``: find, classify and extract the edits in a checkpoint against its base (issue 33).

    from factedit.audit import audit_models, extract_patch
    report = audit_models("base/", "suspect/")
    print(report.verdict, [e.layers for e in report.edits])

:mod:`~factedit.audit.tensors` reads a model one tensor at a time, :mod:`~factedit.audit.spectrum` says what a
difference is (rounding of a format, low-rank update, dense change), :mod:`~factedit.audit.compare` groups the
differences into edits and a verdict, :mod:`~factedit.audit.extract` writes the edits as a revertible patch.
"""

from .compare import MAX_SPAN, VERDICTS, AuditReport, Edit, audit_files, audit_models
from .extract import EXTRACTED, extract_patch, save_extracted
from .spectrum import FORMATS, Finding, classify, rounding_format
from .tensors import AuditError, LoadedTensors, TensorFiles

__all__ = ["audit_models", "audit_files", "AuditReport", "Edit", "MAX_SPAN", "VERDICTS", "extract_patch",
           "save_extracted", "EXTRACTED", "classify", "rounding_format", "Finding", "FORMATS", "AuditError",
           "TensorFiles", "LoadedTensors"]
