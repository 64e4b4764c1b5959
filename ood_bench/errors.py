"""The boundary between the user's errors and the suite's bugs.

A ``UserError`` is something the user can fix: a bad setting, a dataset or weight file that is not where the
configuration says, an image that cannot be decoded. Its message says what is wrong, where, and how to fix it;
the entry point prints that message alone (no traceback unless ``HYDRA_FULL_ERROR=1``) and exits non-zero.
Every other exception is treated as a bug and keeps its traceback.

Errors raised while the settings are checked, before any data is read (``config_errors``), are the user's
whatever their type: the checks there raise plain ``ValueError`` / ``KeyError`` / ``TypeError`` that name the key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix; the message names what, where and how."""


class ConfigError(UserError, ValueError):
    """A setting is not valid (raised during the checks before any data is read)."""


class MissingFileError(UserError, FileNotFoundError):
    """A dataset, weight or model file is not where the configuration says it is."""


class WeightsNotFoundError(MissingFileError):
    """Pretrained weights (a distance's backbone, a diffusion checkpoint) can be neither found nor downloaded."""


class DataError(UserError, ValueError):
    """The data's content is unusable as it is (images that differ in size, an undecodable file)."""


class BadImageError(DataError):
    """An image file in a dataset folder cannot be decoded."""


# Exception types the settings checks raise; inside ``config_errors`` they are the user's.
_CHECK_ERRORS = (ValueError, KeyError, TypeError)


@contextmanager
def config_errors() -> Iterator[None]:
    """Turn the plain errors of the settings checks into ``ConfigError`` (same message, original chained)."""
    try:
        yield
    except UserError:
        raise
    except _CHECK_ERRORS as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ConfigError(str(msg)) from err


def is_user_error(err: BaseException) -> bool:
    """True for errors the user can fix (``UserError``, or Hydra's failure to instantiate a configured object)."""
    if isinstance(err, UserError):
        return True
    try:
        from hydra.errors import InstantiationException
    except ImportError:  # pragma: no cover - hydra is a dependency
        return False
    if not isinstance(err, InstantiationException):
        return False
    # a configured object could not be built: a bad _target_ or bad arguments, or its constructor's checks
    cause = err.__cause__
    return cause is None or isinstance(cause, (UserError, ImportError, *_CHECK_ERRORS))
