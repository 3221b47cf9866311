"""Named exceptions for every check the bundle reader, verifier and trust root make.

One exception per check, so callers (the agent, the host CLI, tests) can tell *which* check a
bundle failed without parsing messages. Every message says what is wrong and what to do. The
host CLI prints ``str(exc)`` as one line and exits with ``exit_code``.

Nothing here imports ``edgepack``: these classes run on the board.
"""
from __future__ import annotations


class OtaError(Exception):
    """Base class for everything the OTA reader, verifier, delta applier and trust root raise."""

    exit_code = 5


# --- container / parsing -------------------------------------------------------------------
class NotABundle(OtaError):
    """The file does not start with the bundle magic (wrong file type)."""


class UnsupportedFormat(OtaError):
    """The bundle's format version is newer than this reader understands."""


class MalformedBundle(OtaError):
    """The container or manifest does not follow docs/bundle-format.md."""


class TruncatedBundle(OtaError):
    """The bundle ends before the data its header declares."""


class LengthExceeded(OtaError):
    """More data than declared: a payload decompresses past its signed length, or bytes follow the end."""


class MalformedPatch(OtaError):
    """A delta payload does not follow the patch format."""


# --- signatures and trust ------------------------------------------------------------------
class SignatureError(OtaError):
    """A signature is missing, invalid, or made by a key this trust root does not know."""


class RevokedKey(SignatureError):
    """The bundle is signed by a release key that the root keys have revoked."""


class ThresholdNotMet(SignatureError):
    """Fewer valid root signatures than the root's threshold."""


class RootRotationError(SignatureError):
    """A new root (or release-key list) does not chain correctly from the one the board trusts."""


class KeyFileError(OtaError):
    """A key file cannot be read or is not an Ed25519 key."""


class LoosePermissions(KeyFileError):
    """A private key file is readable or writable by group or others."""


# --- manifest policy -----------------------------------------------------------------------
class RollbackError(OtaError):
    """The bundle's release (or a key list's version) is older than what the board already has."""


class ExpiredError(OtaError):
    """The manifest (or trust metadata) has expired: a freeze attack or a stale bundle."""


class NotYetValid(OtaError):
    """The manifest was created further in the future than the board's clock allows (clock skew)."""


class ReleaseStepTooLarge(OtaError):
    """The release number jumps further past the board's counter than its policy allows.

    Why: a validly signed bundle with release 2**63-1 would otherwise block every later release
    forever. A root-signed counter reset (``edgepack keys reset-counter``) lowers the counter."""


class TargetMismatch(OtaError):
    """The bundle is not built for this board's target."""


class AgentTooOld(OtaError):
    """The bundle needs a newer device agent."""


# --- payloads ------------------------------------------------------------------------------
class HashMismatch(OtaError):
    """A payload's (or reconstructed file's) SHA-256 differs from the signed one."""


class BaseMismatch(OtaError):
    """A delta bundle was applied to a base other than the one it was made from."""
