"""Exception types of mmvae.

Every error caused by user input is an :class:`MmvaeError`; the CLI turns it into
a one-line message and a non-zero exit code instead of a traceback.
"""
from __future__ import annotations


class MmvaeError(Exception):
    """Base class of all errors mmvae raises on purpose."""


class ConfigError(MmvaeError, ValueError):
    """A configuration field is missing, unknown or has a wrong value."""


class InputError(MmvaeError):
    """A case, modality or file cannot be used.

    The message always names what is known of ``case_id``, ``modality`` and ``path``,
    e.g. ``case 'c007', modality 't2', file 'a/b.nii.gz': NaN voxels (12 of 32768)``.
    """

    def __init__(self, reason: str, *, case_id: str | None = None,
                 modality: str | None = None, path: str | None = None):
        self.reason = reason
        self.case_id = case_id
        self.modality = modality
        self.path = None if path is None else str(path)
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.case_id is not None:
            where.append(f"case {self.case_id!r}")
        if self.modality is not None:
            where.append(f"modality {self.modality!r}")
        if self.path is not None:
            where.append(f"file {self.path!r}")
        return (", ".join(where) + ": " if where else "") + self.reason

    def with_context(self, *, case_id=None, modality=None, path=None) -> "InputError":
        """Return a copy that fills in context fields that are still unknown."""
        return InputError(
            self.reason,
            case_id=self.case_id if self.case_id is not None else case_id,
            modality=self.modality if self.modality is not None else modality,
            path=self.path if self.path is not None else path,
        )


class CheckpointError(MmvaeError):
    """A checkpoint is missing, corrupt or does not match the config."""


class IndexError_(MmvaeError):
    """A retrieval index is corrupt, or does not match the model."""
