"""API keys -> tenants -> the adapters each may use. A tenant can neither use nor list another
tenant's adapters: to it they do not exist. No keys file = open access (bind to localhost).

The keys file is validated strictly before the server starts: a plain string where a list
belongs would otherwise be read character by character (every letter of a key a valid key).
Keys are compared in constant time and never logged or echoed.
"""

import fnmatch
import hashlib
import hmac
import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftkit.errors import PeftkitError

log = logging.getLogger("peftkit.serve")
MIN_KEY_LENGTH = 8
TOP_FIELDS = ("admin_keys", "tenants")
TENANT_FIELDS = ("keys", "adapters")


@dataclass
class Caller:
    tenant: str | None  # None: open access
    patterns: list[str] = field(default_factory=lambda: ["*"])
    admin: bool = False

    def may_use(self, adapter_id: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter_id, p) for p in self.patterns)


class Tenancy:
    """keys file (YAML or JSON):
        admin_keys: [sk-admin-0123]
        tenants:
          acme: {keys: [sk-acme-0123], adapters: ["acme-*"]}
    """

    def __init__(self, path: str | None = None):
        self.open = path is None
        self._keys: list[tuple[bytes, Caller]] = []  # (sha256 of the key, caller)
        if path is None:
            return
        p = Path(path)
        try:
            mode = p.stat().st_mode
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise PeftkitError(f"{p}: cannot read API keys ({str(e).splitlines()[0]})") from None
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("%s is readable by other users (mode %o); chmod 600 it", p,
                        stat.S_IMODE(mode))
        for key, caller in _parse(raw, p):
            self._keys.append((_digest(key), caller))

    def claimed(self, name: str) -> bool:
        """Whether any tenant's adapter patterns cover `name` (open access: nothing is)."""
        return any(not who.admin and who.may_use(name) for _, who in self._keys)

    def caller(self, authorization: str | None) -> Caller | None:
        """The caller for an `Authorization: Bearer KEY` header; None when the key is wrong.
        Every configured key is compared (digests of equal length), so the time taken says
        nothing about which key, or how much of one, matched."""
        if self.open:
            return Caller(tenant=None, admin=True)
        if not authorization or not authorization[:7].lower() == "bearer ":
            return None
        given = _digest(authorization[7:].strip())
        found = None
        for digest, who in self._keys:
            if hmac.compare_digest(digest, given):
                found = who
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _parse(raw, p: Path) -> list[tuple[str, Caller]]:
    if not isinstance(raw, dict):
        raise PeftkitError(f"{p}: expected a mapping with admin_keys and tenants")
    unknown = [str(k) for k in raw if k not in TOP_FIELDS]
    if unknown:
        raise PeftkitError(f"{p}: unknown field '{unknown[0]}' (fields: {', '.join(TOP_FIELDS)})")
    out = [(k, Caller(tenant="admin", admin=True))
           for k in _strings(raw.get("admin_keys"), p, "admin_keys", key=True)]
    tenants = raw.get("tenants") or {}
    if not isinstance(tenants, dict):
        raise PeftkitError(f"{p}: tenants must be a mapping of name -> {{keys, adapters}}")
    for name, spec in tenants.items():
        where = f"tenants.{name}"
        if not isinstance(spec, dict):
            raise PeftkitError(f"{p}: {where} must be a mapping with keys: [...] and adapters: [...]")
        unknown = [str(k) for k in spec if k not in TENANT_FIELDS]
        if unknown:
            raise PeftkitError(f"{p}: {where}: unknown field '{unknown[0]}' "
                               f"(fields: {', '.join(TENANT_FIELDS)})")
        keys = _strings(spec.get("keys"), p, f"{where}.keys", key=True)
        if not keys:
            raise PeftkitError(f"{p}: {where}.keys: give at least one key")
        patterns = _strings(spec.get("adapters"), p, f"{where}.adapters")
        out += [(k, Caller(tenant=str(name), patterns=patterns)) for k in keys]
    seen = set()
    for key, _ in out:
        if key in seen:  # never echo the key itself
            raise PeftkitError(f"{p}: one key is listed twice; every key must name one caller")
        seen.add(key)
    if not out:
        raise PeftkitError(f"{p}: no keys; without keys, leave --api-keys out (open access)")
    return out


def _strings(value, p: Path, where: str, key: bool = False) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        got = type(value).__name__ if not isinstance(value, list) else "a list with non-strings"
        raise PeftkitError(f"{p}: {where} must be a list of strings, got {got}")
    for v in value:
        if key and (len(v) < MIN_KEY_LENGTH or v != v.strip() or any(c.isspace() for c in v)):
            raise PeftkitError(f"{p}: {where}: every key needs {MIN_KEY_LENGTH}+ characters and no "
                               "spaces")
        if not key and not v:
            raise PeftkitError(f"{p}: {where}: empty pattern")
    return list(value)

