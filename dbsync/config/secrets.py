"""Secrets: read only when needed, never written in the configuration, never shown.

The configuration can be shown, diffed and backed up freely because it holds no
secret: a :class:`~dbsync.config.schema.SecretRef` names a file or a systemd
credential, and only :func:`read_secret` opens it, when the daemon starts or reloads
and when ``dbsync check-config`` runs. The values it returns live in
:class:`Credentials`, whose ``repr`` and ``str`` never show them, and errors name the
key and the path of a secret, never its content.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from dbsync.config.schema import Config, Destination, IngestSettings, SecretRef
from dbsync.errors import ConfigError

__all__ = [
    "ONE_CREDENTIAL_MODE",
    "ONE_SECRET_SOURCE",
    "Credentials",
    "check_secrets",
    "load_credentials",
    "load_ingest_token",
    "read_secret",
    "secret_refs",
]

# The two rules about secret references, worded once: the loader's cross-field checks
# and the readers below both refuse with these words.
ONE_SECRET_SOURCE = 'set exactly one of file = "path" or credential = "name"'
ONE_CREDENTIAL_MODE = (
    "set either token (the legacy API token) or client_id and client_secret (an API key set)"
)


# Keys the credential fingerprints: they can be compared within this process, and
# cannot be used elsewhere to confirm a guessed secret.
_FINGERPRINT_KEY = os.urandom(16)


class Credentials:
    """A destination's secrets, once read: ``token``, or ``client_id`` and ``client_secret``.

    ``repr`` and ``str`` name the secrets present, never their values. A plain class
    rather than a Struct or a dataclass, which msgspec would encode field by field: the
    log formatter falls back to ``str``, so credentials passed to a log call stay hidden.
    """

    __slots__ = ("client_id", "client_secret", "token")

    token: str | None
    """The legacy API token, sent as ``Authorization: Bearer <token>``."""

    client_id: str | None
    """The API key set's client id, traded with the secret at ``POST /auth/v1/token``."""

    client_secret: str | None
    """The API key set's client secret."""

    def __init__(
        self,
        *,
        token: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
    ) -> None:
        self.token = token
        self.client_id = client_id
        self.client_secret = client_secret

    def __repr__(self) -> str:
        present = [f"{name}=<redacted>" for name in self.__slots__ if getattr(self, name)]
        return f"Credentials({', '.join(present)})"

    @property
    def fingerprint(self) -> str:
        """A digest that changes when any secret does, for noticing a rotation on reload.

        Keyed per process: stable within this process only, and of no use to anyone
        trying to confirm a guessed secret.
        """
        digest = hashlib.blake2b(key=_FINGERPRINT_KEY, digest_size=8)
        for value in (self.token, self.client_id, self.client_secret):
            digest.update(b"-" if value is None else b"+" + value.encode() + b"\0")
        return digest.hexdigest()


def read_secret(ref: SecretRef, *, key: str) -> str:
    """The secret ``ref`` points to; ``key`` is the reference's own dotted path.

    Raises:
        ConfigError: the file or credential is missing, unreadable, empty or not one
            line; the error names ``<key>.file`` or ``<key>.credential`` and the path,
            never the content.
    """
    if ref.file is not None:
        return _read_secret_file(ref.file, key=f"{key}.file", private=True)
    if ref.credential is not None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"{key}.credential",
                f"systemd credential {ref.credential!r} cannot be read: $CREDENTIALS_DIRECTORY"
                " is not set (systemd sets it for a unit with LoadCredential=)",
            )
        return _read_secret_file(Path(directory, ref.credential), key=f"{key}.credential")
    raise ConfigError(key, ONE_SECRET_SOURCE)


def load_credentials(destination: Destination, index: int) -> Credentials:
    """Read the secrets of ``destination``, the ``index``-th of the file (for error keys)."""
    key = f"destinations[{index}].credentials"
    refs = destination.credentials
    if refs.token is not None:
        return Credentials(token=read_secret(refs.token, key=f"{key}.token"))
    if refs.client_id is not None and refs.client_secret is not None:
        return Credentials(
            client_id=read_secret(refs.client_id, key=f"{key}.client_id"),
            client_secret=read_secret(refs.client_secret, key=f"{key}.client_secret"),
        )
    raise ConfigError(key, ONE_CREDENTIAL_MODE)


def load_ingest_token(ingest: IngestSettings) -> str | None:
    """The bearer token ingest requests must carry, or None when none is configured."""
    if ingest.token_file is None:
        return None
    return _read_secret_file(ingest.token_file, key="ingest.token_file", private=True)


def check_secrets(config: Config) -> list[str]:
    """Read every secret ``config`` refers to, as the daemon will when it starts.

    Returns a note for each secret that cannot be checked from here: a systemd
    credential, outside the service that receives it.

    Raises:
        ConfigError: the first secret that is missing, unreadable or empty.
    """
    notes: list[str] = []
    for key, ref in secret_refs(config):
        if ref.credential is not None and not os.environ.get("CREDENTIALS_DIRECTORY"):
            notes.append(
                f"{key}.credential: systemd credential {ref.credential!r} not checked"
                " ($CREDENTIALS_DIRECTORY is set only inside the service)"
            )
        else:
            read_secret(ref, key=key)
    load_ingest_token(config.ingest)
    return notes


def _read_secret_file(path: Path, *, key: str, private: bool = False) -> str:
    """The one line of secret in ``path``.

    ``private``: the file is the operator's, not systemd's (whose credentials are
    private by construction), so it is refused, as ssh refuses a private key, unless
    only its owner can read it and that owner is the daemon's user or root: anyone
    else could read the secret, or change it.
    """
    try:
        with path.open("rb") as file:
            if private:
                _check_private(path, os.fstat(file.fileno()), key=key)
            data = file.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read secret {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode()
    except UnicodeDecodeError:
        # Not chained: the decode error quotes bytes of the secret.
        raise ConfigError(key, f"secret {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(key, f"secret {path} is empty")
    if "\n" in text or "\r" in text:
        raise ConfigError(key, f"secret {path} has more than one line")
    if text != text.strip():
        # An HTTP server strips such spaces, and the token would then fail for no
        # visible reason.
        raise ConfigError(key, f"secret {path} starts or ends with white space")
    return text


def _check_private(path: Path, status: os.stat_result, *, key: str) -> None:
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        raise ConfigError(
            key,
            f"permissions {mode:04o} for {path} are too open: a secret file must not be"
            f" accessible by group or others (chmod 600 {path})",
        )
    if status.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            key,
            f"{path} is owned by uid {status.st_uid}: a secret file must belong to the"
            f" daemon's user (uid {os.geteuid()}) or root",
        )


def secret_refs(config: Config) -> Iterator[tuple[str, SecretRef]]:
    """Every secret reference of ``config``, with its dotted key (for error messages)."""
    for index, destination in enumerate(config.destinations):
        refs = destination.credentials
        for name in ("token", "client_id", "client_secret"):
            ref: SecretRef | None = getattr(refs, name)
            if ref is not None:
                yield f"destinations[{index}].credentials.{name}", ref
