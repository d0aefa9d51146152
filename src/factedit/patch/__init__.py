"""Edits as files: patch files (safetensors + provenance) that apply, stack and revert
(:mod:`.files`), and stacks of them as an edit history (:mod:`.stack`)."""
