"""API keys -> tenants -> the adapters each may use. A tenant can neither use nor list another
tenant's adapters: to it they do not exist. No keys file = open access (bind to localhost)."""

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftkit.errors import PeftkitError


@dataclass
class Caller:
    tenant: str | None  # None: open access
    patterns: list[str] = field(default_factory=lambda: ["*"])
    admin: bool = False

    def may_use(self, adapter_id: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter_id, p) for p in self.patterns)


class Tenancy:
    """keys file (YAML or JSON):
        admin_keys: [sk-admin]
        tenants:
          acme: {keys: [sk-acme-1], adapters: ["acme-*"]}
    """

    def __init__(self, path: str | None = None):
        self.open = path is None
        self.keys: dict[str, Caller] = {}
        if path is None:
            return
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise PeftkitError(f"{p}: cannot read API keys ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise PeftkitError(f"{p}: expected admin_keys and tenants")
        for key in raw.get("admin_keys") or []:
            self.keys[str(key)] = Caller(tenant="admin", admin=True)
        for name, spec in (raw.get("tenants") or {}).items():
            if not isinstance(spec, dict) or not spec.get("keys"):
                raise PeftkitError(f"{p}: tenant '{name}' needs keys: [...] and adapters: [...]")
            for key in spec["keys"]:
                self.keys[str(key)] = Caller(tenant=name, patterns=list(spec.get("adapters") or []))

    def caller(self, authorization: str | None) -> Caller | None:
        """The caller for an `Authorization: Bearer KEY` header; None when the key is wrong."""
        if self.open:
            return Caller(tenant=None, admin=True)
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        return self.keys.get(authorization[7:].strip())
