"""Named errors. Every error a user can trigger says what was expected and what was found."""

from __future__ import annotations


class SaekitError(Exception):
    """Base class of every error saekit raises on purpose."""


class ConfigError(SaekitError, ValueError):
    """A run or architecture config has an unknown key, a missing key, a wrong type or a bad value."""


class CorruptArtifactError(SaekitError):
    """A file on disk is truncated, altered or unreadable (checksum or format mismatch)."""


class ShapeMismatchError(SaekitError, ValueError):
    """A tensor's shape disagrees with the config or the other tensors it is used with."""


class DtypeMismatchError(SaekitError, ValueError):
    """A tensor's dtype disagrees with the config; saekit never casts silently."""


class NonFiniteError(SaekitError, FloatingPointError):
    """A NaN or infinity appeared in activations, a loss or a gradient."""


class ResumeMismatchError(SaekitError):
    """A checkpoint or partial store was made with a config incompatible with the current one."""


class MissingCheckpointError(SaekitError, FileNotFoundError):
    """Resume was asked for but there is no complete checkpoint to resume from."""


class HookNotFoundError(SaekitError, KeyError):
    """A hook point (HF module path or TransformerLens hook name) does not exist in the model."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownNameError(SaekitError, KeyError):
    """A name (a store column, a field) that is not among the valid ones; the message lists them."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class StoreExistsError(SaekitError, FileExistsError):
    """An activation store already exists with different contents; saekit never overwrites it silently."""


class ModelNotAvailableError(SaekitError):
    """A model could not be found locally and the hub is not reachable."""


class MissingArtifactError(SaekitError, FileNotFoundError):
    """Something a step needs (an SAE, an eval report, a bundle) was never made; the message names the
    command that makes it (`fix`). Not `CorruptArtifactError`: nothing is damaged, a step was skipped."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.message, self.fix = message, fix

    def __str__(self) -> str:
        return f"{self.message}; create it with `{self.fix}`" if self.fix else self.message

    def with_fix(self, fix: str) -> "MissingArtifactError":
        """The same error naming a concrete command (the CLI knows the config path the library does not)."""
        return type(self)(self.message, fix)


class StoreMissingError(MissingArtifactError):
    """No activation store where one is expected: caching has not run (`saekit cache CONFIG`)."""


class UsageError(ConfigError):
    """The command line does not parse (unknown option, missing argument, a value of the wrong type)."""


class UnsafeNameError(ConfigError):
    """A run or SAE name that cannot be a folder name inside its run (empty, absolute, `..`, a path separator)."""


class IncompleteStoreError(SaekitError):
    """An activation store's caching job has not finished (interrupted); training on it would use partial data."""


class EmptyDataError(SaekitError, ValueError):
    """A corpus, store or row selection holds nothing to work on (0 documents or 0 rows)."""


def nearest(name: str, candidates, n: int = 3) -> list[str]:
    """The candidates closest to `name`, for 'did you mean' messages."""
    import difflib

    cands = list(candidates)
    close = difflib.get_close_matches(name, cands, n=n, cutoff=0.4)
    if not close:  # fall back to shared-prefix matches so something useful is always listed
        close = sorted(cands, key=lambda c: -len(_common_prefix(name, c)))[:n]
    return close


def _common_prefix(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


class PreflightError(SaekitError, ValueError):
    """An SAE met activations it was not made for: its d_in, hook or model disagrees with the store's or
    the model's, or it reconstructs the store's first rows worse than their mean does (FVU > 1)."""


class ModelMismatchError(PreflightError):
    """The SAE's model name and the store's (or the loaded model's) name different models."""


class HookMismatchError(PreflightError):
    """The SAE's hook point and the store's hook point are different activations."""


class InputMismatchError(PreflightError):
    """The SAE reconstructs the store's rows worse than their mean (FVU > 1): it probably expects other
    inputs (another hook or model, or an input normalisation the store does not apply)."""


class DInMismatchError(PreflightError, ShapeMismatchError):
    """The SAE's d_in and the store's (or the model's hook's) width differ; never overridable."""


class ChatBackendError(SaekitError):
    """A chat endpoint (OpenAI-compatible or local) gave no usable answer: refused, kept failing after
    the retries, timed out, or answered in a shape other than chat completions."""
