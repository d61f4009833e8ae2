"""The one exception hierarchy of tcmu-obd.

Every error the package raises on purpose derives from ObdError.  Errors about
bad bytes in a file (FormatError and its children) name the file, the field and
the value, so a user can tell which blob is broken and how.  This module holds
no logic beyond formatting those messages.
"""


class ObdError(Exception):
    """Base class of every error tcmu-obd raises deliberately."""


class FormatError(ObdError):
    """A file's bytes break the format: wrong magic, bad field, bad record."""

    def __init__(self, path, field, value, why):
        self.path = str(path)
        self.field = field
        self.value = value
        self.why = why
        super().__init__(f"{self.path}: {field} = {_show(value)}: {why}")


class CorruptDataError(FormatError):
    """Stored data fails its own check (CRC mismatch, undecodable block)."""


class ManifestError(ObdError):
    """A registry manifest or index is malformed, or not an overlaybd image."""


class UnsupportedError(ObdError):
    """A valid input asks for something tcmu-obd does not (yet) do."""


class ReadError(ObdError):
    """An I/O error while reading a backing file."""


class UsageError(ObdError):
    """A tool or API was called with arguments that cannot work."""


class ConfigError(ObdError):
    """A configuration file is missing a key, or a key has a wrong type."""


class ConfigWarning(UserWarning):
    """A config value that is accepted but probably not what was meant."""


class UnknownKeyWarning(ConfigWarning):
    """A config key tcmu-obd does not know; it is ignored."""


class ApplyError(ObdError):
    """A layer tar could not be applied to an image; the message says why."""


class LayerTooBig(ApplyError):
    """The image's file system ran out of space (ENOSPC) during an apply."""


class AttachError(ObdError):
    """A device could not be attached to or detached from the kernel (configfs)."""


class RemoteError(ObdError):
    """Registry (HTTP) access failed.  `reason` is overlaybd's resultFile text
    for the failure (docs/operations.md, resultFile failure reasons); the message also names the URL and
    the HTTP status or the transport cause."""

    reason = "Unexpected response"

    def __init__(self, url, status=None, cause=""):
        self.url = url
        self.status = status
        self.cause = cause
        msg = f"{self.reason}: {url}"
        if status is not None:
            msg += f": HTTP {status}"
        if cause:
            msg += f": {cause}"
        super().__init__(msg)


class AuthError(RemoteError):
    """The registry or its token service refused our credentials (401/403)."""

    reason = "Authentication failed"


class BlobNotFound(RemoteError):
    """The registry answered 404 for the blob or manifest."""

    reason = "No such file or directory"


class TooManyRequests(RemoteError):
    """The registry answered 429 (rate limited)."""

    reason = "Too many requests"


class RemoteTimeout(RemoteError):
    """A request, or a read's whole retry budget, ran past its deadline."""

    reason = "Get meta timedout"


class ConnectionFailed(RemoteError):
    """The TCP/TLS connection failed, was dropped, or the body was cut short."""

    reason = "Connection failed"


class UnexpectedResponse(RemoteError):
    """The registry answered something the protocol does not allow here."""

    reason = "Unexpected response"


def _show(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value} (0x{value:x})" if value > 9 else str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:32]).hex() + ("..." if len(value) > 32 else "")
    return repr(value)


class InstallError(ObdError):
    """`tcmu-obd install`/`uninstall` refused or failed: e.g. a foreign
    overlaybd installation is in the way; the message names the path."""
