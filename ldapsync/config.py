"""Load and check the YAML configuration; every error names the file and the key.

Relative paths are resolved against the config file's directory, so a config is portable
with the files it names. Unknown keys are errors: a typo must not silently disable a guard.

Each default is written once, on its dataclass field. To add a key: give the dataclass a
field with its default, read the key with ``section.get(name, type)`` (no default: an absent
key reads as None) and pass it to ``_build``, which leaves None out so the field default
applies. Validators (``_positive``, ``_choice``, ``_ratio``) pass None through.
"""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ldapsync import schema
from ldapsync.errors import ConfigError
from ldapsync.routing.types import GroupSettings, MailboxSettings, Settings

T = TypeVar("T")

DEFAULT_CONFIG = Path("/etc/ldapsync/ldapsync.yaml")
MAP_TYPES = ("hash", "btree", "lmdb", "cdb", "texthash", "none")
WATCH_MODES = ("auto", "syncrepl", "psearch", "poll")


@dataclass(frozen=True, slots=True)
class LdapSource:
    uris: tuple[str, ...]
    base_dn: str
    filter: str = "(objectClass=*)"
    scope: str = "sub"
    start_tls: bool = False
    tls_verify: bool = True
    ca_file: Path | None = None
    bind_dn: str | None = None
    bind_password_file: Path | None = None
    page_size: int = 500
    timeout: float = 10.0
    watch: str = "auto"
    poll_interval: float = 60.0
    connect_rounds: int = 3  # a one-shot run tries every uri this often while none answers


@dataclass(frozen=True, slots=True)
class LdifSource:
    path: Path
    base_dn: str | None = None


@dataclass(frozen=True, slots=True)
class ExporterSpec:
    kind: str
    name: str
    path: Path
    map_type: str | None
    owner: int | None
    group: int | None
    mode: int | None
    options: Mapping[str, Any]
    key: str  # "exporters[3]", for error messages


@dataclass(frozen=True, slots=True)
class Hooks:
    check: tuple[tuple[str, ...], ...] = ()
    reload: tuple[tuple[str, ...], ...] = ()
    timeout: float = 60.0
    # per reload command: the output names it serves; None (or a missing entry) = every output
    reload_outputs: tuple[tuple[str, ...] | None, ...] = ()

    def reload_serves(self, index: int, output: str) -> bool:
        """Whether reload command `index` is run when `output` changed."""
        names = self.reload_outputs[index] if index < len(self.reload_outputs) else None
        return names is None or output in names


@dataclass(frozen=True, slots=True)
class Safety:
    max_deletions: int = 500
    max_deletion_ratio: float = 0.2
    allow_empty: bool = False
    max_changes: int = 1000
    max_change_ratio: float = 0.2
    window: float = 6 * 3600.0  # seconds over which deletions and changes are summed; 0: per sync only


@dataclass(frozen=True, slots=True)
class Agent:
    debounce: float = 0.1
    max_delay: float = 2.0
    reconnect_max: float = 60.0
    retry_initial: float = 1.0
    retry_max: float = 60.0


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    routing: Settings  # domains, attributes, groups, mailboxes: everything the routing model reads
    source: LdapSource | LdifSource
    state_dir: Path
    exporters: tuple[ExporterSpec, ...]
    static: Path | None = None
    hooks: Hooks = field(default_factory=Hooks)
    safety: Safety = field(default_factory=Safety)
    agent: Agent = field(default_factory=Agent)
    keep_generations: int = 10
    postmap: str = "postmap"
    postfix_config_dir: Path | None = None
    metrics_textfile: Path | None = None
    log_format: str = "auto"
    log_level: str = "info"


class _Section:
    """A mapping read with type checks; remembers which keys were used to flag the rest."""

    def __init__(self, data: object, file: Path, prefix: str):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("must be a mapping", file=file, key=prefix or None)
        self.data: dict[str, Any] = data
        self.file = file
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, key=self.key(name))

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: Any = None) -> Any:
        """The value of `name`, type-checked; `default` only for values no dataclass holds."""
        self.used.add(name)
        value = self.data.get(name, default)
        if value is None:
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and kind in (int, float):
            raise self.error(name, f"must be a number, not {value!r}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.error(name, f"must be of type {names}, not {type(value).__name__}")
        return value

    def require(self, name: str, kind: type[T]) -> T:
        value: T | None = self.get(name, kind)
        if value is None:
            raise self.missing(name)
        return value

    def missing(self, name: str) -> ConfigError:
        """`name is required`, naming a misspelt key present in its place (`statedir:`)."""
        near = difflib.get_close_matches(name, [k for k in self.data if isinstance(k, str) and k != name], 1, 0.75)
        hint = f" (found {self.key(near[0])!r}: a misspelling of {name!r}?)" if near else ""
        return self.error(name, "is required" + hint)

    def path(self, name: str) -> Path | None:
        value = self.get(name, str)
        if value is None:
            return None
        p = Path(value).expanduser()
        # Lexically normalised, so messages and status show /etc/postfix/maps, not etc/../postfix/maps.
        return Path(os.path.normpath(p if p.is_absolute() else (self.file.parent / p)))

    def sub(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.data.get(name), self.file, self.key(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            near = difflib.get_close_matches(str(unknown[0]), sorted(self.used), 1, 0.75)
            hint = f"did you mean {near[0]!r}?" if near else "check the spelling"
            raise self.error(unknown[0], f"unknown key ({hint}; see docs/configuration.md)")


def load(path: Path) -> Config:
    """Read `path`; raise ConfigError naming file and key on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=path) from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", file=path) from e
    return parse(data, path.resolve())


def _reads_passwords(kind: str) -> bool:
    from ldapsync.exporters import exporter_class

    return exporter_class(kind).reads_passwords


def parse(data: object, path: Path) -> Config:
    top = _Section(data, path, "")
    domain = _domain(top, "domain", top.require("domain", str))
    aliases_raw = top.get("domain_aliases", list, [])
    domain_aliases = tuple(_domain(top, f"domain_aliases[{i}]", d) for i, d in enumerate(aliases_raw))
    if domain in domain_aliases or len(set(domain_aliases)) != len(domain_aliases):
        raise top.error("domain_aliases", "must not repeat the domain or each other")

    hosted = _hosted(top, domain, domain_aliases)

    source = _source(top.sub("source"))
    attrs = top.sub("attributes")
    attributes = schema.resolve(top.get("schema", str, "ud-ldap"), attrs.data, file=path)
    attrs.used.update(attrs.data)
    groups = _groups(top)
    if groups is not None:
        attributes = replace(attributes, extra=groups.ldap_attributes())
    mailbox = _mailbox(top)

    exporters_raw = top.get("exporters", list, [])
    if not exporters_raw:
        raise top.error("exporters", "at least one exporter is required")
    exporters = tuple(_exporter(_Section(e, path, f"exporters[{i}]")) for i, e in enumerate(exporters_raw))
    names = [e.name for e in exporters]
    for e in exporters:
        if names.count(e.name) > 1:
            raise ConfigError(f"duplicate exporter name {e.name!r}", file=path, key=f"{e.key}.name")
    paths = [os.path.normpath(e.path) for e in exporters]  # maps/../maps/a is maps/a
    for e in exporters:
        if paths.count(os.path.normpath(e.path)) > 1:
            raise ConfigError(f"two exporters write {e.path}", file=path, key=f"{e.key}.path")
        if e.kind == "dovecot-userdb" and mailbox is None:
            raise ConfigError("dovecot-userdb needs a mailbox: section (home, home_root)", file=path, key=e.key)
    if attributes.mail_password and not any(_reads_passwords(e.kind) for e in exporters):
        # Least privilege, and less to read: a host without a passwd-file never fetches hashes.
        attributes = replace(attributes, mail_password=None)

    hooks_s = top.sub("hooks")
    reload, reload_outputs = _reload_hooks(hooks_s, names)
    hooks = _build(
        Hooks,
        check=_commands(hooks_s, "check"),
        reload=reload,
        timeout=_positive(hooks_s, "timeout"),
        reload_outputs=reload_outputs,
    )
    hooks_s.done()

    safety_s = top.sub("safety")
    safety = _build(
        Safety,
        max_deletions=_count(safety_s, "max_deletions"),
        max_deletion_ratio=_ratio(safety_s, "max_deletion_ratio"),
        allow_empty=safety_s.get("allow_empty", bool),
        max_changes=_count(safety_s, "max_changes"),
        max_change_ratio=_ratio(safety_s, "max_change_ratio"),
        window=_positive(safety_s, "window", allow_zero=True),
    )
    safety_s.done()

    agent_s = top.sub("agent")
    agent = _build(
        Agent,
        debounce=_positive(agent_s, "debounce", allow_zero=True),
        max_delay=_positive(agent_s, "max_delay"),
        reconnect_max=_positive(agent_s, "reconnect_max"),
        retry_initial=_positive(agent_s, "retry_initial"),
        retry_max=_positive(agent_s, "retry_max"),
    )
    if agent.retry_max < agent.retry_initial:
        raise agent_s.error("retry_max", f"must be >= retry_initial ({agent.retry_initial:g})")
    agent_s.done()

    postfix_s = top.sub("postfix")
    postmap = postfix_s.get("postmap", str)
    postfix_dir = postfix_s.path("config_dir")
    postfix_s.done()

    metrics_s = top.sub("metrics")
    metrics_textfile = metrics_s.path("textfile")
    metrics_s.done()

    log_s = top.sub("log")
    log_format = _choice(log_s, "format", ("auto", "console", "json"))
    log_level = _choice(log_s, "level", ("debug", "info", "warning", "error"), fold=True)
    log_s.done()

    passwords_s = top.sub("passwords")
    weak_passwords = _choice(passwords_s, "weak", ("warn", "refuse"))
    login_by_address = passwords_s.get("login_by_address", bool)
    passwords_s.done()

    keep = top.get("keep_generations", int)
    if keep is not None and keep < 1:
        raise top.error("keep_generations", "must be >= 1")
    state_dir = top.path("state_dir")
    if state_dir is None:
        raise top.missing("state_dir")
    config = _build(
        Config,
        path=path,
        routing=_build(
            Settings,
            domain=domain,
            domain_aliases=domain_aliases,
            attributes=attributes,
            weak_passwords=weak_passwords,
            login_by_address=login_by_address,
            hosted=hosted,
            groups=groups,
            mailbox=mailbox,
        ),
        source=source,
        static=top.path("static"),
        state_dir=state_dir,
        exporters=exporters,
        hooks=hooks,
        safety=safety,
        agent=agent,
        keep_generations=keep,
        postmap=postmap,
        postfix_config_dir=postfix_dir,
        metrics_textfile=metrics_textfile,
        log_format=log_format,
        log_level=log_level,
    )
    top.done()
    return config


def _hosted(top: _Section, domain: str, domain_aliases: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """`domains:`: further hosted domains, each with its own alias domains; no domain twice."""
    raw = top.get("domains", dict, {})
    seen = {d: "domain" for d in (domain, *domain_aliases)}
    out: dict[str, tuple[str, ...]] = {}
    for name, alias_list in raw.items():
        key = f"domains.{name}"
        hosted_domain = _domain(top, key, name)
        if alias_list is None:
            alias_list = []
        if not isinstance(alias_list, list):
            raise ConfigError("must be a list of alias domains", file=top.file, key=key)
        alias_domains = tuple(_domain(top, f"{key}[{i}]", d) for i, d in enumerate(alias_list))
        for i, d in enumerate((hosted_domain, *alias_domains)):
            if d in seen:
                where = key if i == 0 else f"{key}[{i - 1}]"
                raise ConfigError(f"{d} is already configured by {seen[d]}", file=top.file, key=where)
            seen[d] = key
        out[hosted_domain] = alias_domains
    return out


def _attr_names(s: _Section, name: str) -> tuple[str, ...] | None:
    """A list of LDAP attribute names (one name may be written alone); None if absent."""
    raw = s.get(name, (list, str))
    if raw is None:
        return None
    values = [raw] if isinstance(raw, str) else raw
    for i, v in enumerate(values):
        if not isinstance(v, str) or not schema._is_attr_name(v):
            raise s.error(f"{name}[{i}]", f"{v!r} is not an LDAP attribute name")
    return tuple(values)


def _groups(top: _Section) -> GroupSettings | None:
    if top.data.get("groups") is None:
        top.used.add("groups")
        return None
    g = top.sub("groups")
    name_attr = g.get("name_attribute", str)
    if name_attr is not None and not schema._is_attr_name(name_attr):
        raise g.error("name_attribute", f"{name_attr!r} is not an LDAP attribute name")
    settings = _build(
        GroupSettings,
        object_classes=_attr_names(g, "object_classes"),
        name_attribute=name_attr,
        member_attributes=_attr_names(g, "member_attributes"),
        address_attributes=_attr_names(g, "address_attributes"),
        base_dn=g.get("base_dn", str),
        members_send_as_group=g.get("members_send_as_group", bool),
    )
    if not settings.object_classes:
        raise g.error("object_classes", "at least one object class is required")
    if not settings.member_attributes and not settings.address_attributes:
        raise g.error("member_attributes", "groups need member_attributes or address_attributes")
    g.done()
    return settings


_HOME_FIELDS = ("login", "domain")


def _mailbox(top: _Section, *, file_key: str = "mailbox") -> MailboxSettings | None:
    from ldapsync import validate

    if top.data.get(file_key) is None:
        top.used.add(file_key)
        return None
    m = top.sub(file_key)
    root = m.require("home_root", str)
    try:
        validate.home(root.rstrip("/") or "/")
    except validate.Invalid as e:
        raise m.error("home_root", f"{root!r} {e}") from e
    template = m.get("home", str, root.rstrip("/") + "/{domain}/{login}")
    sample = _template(m, "home", template, _HOME_FIELDS)
    try:
        validate.home(sample)
    except validate.Invalid as e:
        raise m.error("home", f"{template!r} {e}") from e
    if not sample.startswith(root.rstrip("/") + "/"):
        raise m.error("home", f"{template!r} is not under home_root {root}")
    range_raw = m.get("id_range", list)
    if range_raw is not None and (
        len(range_raw) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in range_raw)
        or not 1 <= range_raw[0] <= range_raw[1] <= validate.MAX_ID
    ):
        raise m.error("id_range", "must be [first, last] with 1 <= first <= last (root never owns mail)")
    settings = _build(
        MailboxSettings,
        home=template,
        home_root=root.rstrip("/"),
        uid=m.get("uid", int),
        gid=m.get("gid", int),
        id_range=tuple(range_raw) if range_raw is not None else None,
    )
    lo, hi = settings.id_range
    for name, value in (("uid", settings.uid), ("gid", settings.gid)):
        if value is not None and not lo <= value <= hi:
            raise m.error(name, f"{value} is outside id_range {lo}-{hi}")
    m.done()
    return settings


def _template(s: _Section, name: str, template: str, allowed: tuple[str, ...]) -> str:
    """Check a {placeholder} template; return it filled with sample values."""
    import string

    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise s.error(name, f"{template!r}: {e}") from e
    for _, field_name, spec, conv in parts:
        if field_name is None:
            continue
        if field_name not in allowed or spec or conv:
            raise s.error(name, f"unknown placeholder {{{field_name}}} (allowed: {', '.join(allowed)})")
    return template.format(**{f: "sample" for f in allowed})


def _domain(section: _Section, key: str, value: object) -> str:
    from ldapsync.validate import is_domain

    if not isinstance(value, str) or not is_domain(value.lower()):
        raise ConfigError(f"{value!r} is not a domain name", file=section.file, key=key)
    return value.lower()


def _build(cls: type[T], **values: Any) -> T:
    """`cls` from the keys the file sets; a key it leaves out (None) takes the field default.

    Only fields that have a default may be left out; a required one is a bug here, not in
    the file, so it fails loudly.
    """
    unknown = set(values) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {sorted(unknown)[0]}")
    return cls(**{k: v for k, v in values.items() if v is not None})


def _positive(s: _Section, name: str, *, allow_zero: bool = False) -> float | None:
    value: float | None = s.get(name, float)
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise s.error(name, f"must be {'>= 0' if allow_zero else '> 0'}")
    return value


def _count(s: _Section, name: str) -> int | None:
    value: int | None = s.get(name, int)
    if value is not None and value < 0:
        raise s.error(name, "must be >= 0")
    return value


def _ratio(s: _Section, name: str) -> float | None:
    value: float | None = s.get(name, float)
    if value is not None and not 0 <= value <= 1:
        raise s.error(name, "must be between 0 and 1")
    return value


def _choice(s: _Section, name: str, choices: tuple[str, ...], *, fold: bool = False) -> str | None:
    value: str | None = s.get(name, str)
    if value is None:
        return None
    if fold:
        value = value.lower()
    if value not in choices:
        raise s.error(name, "must be one of " + ", ".join(choices[:-1]) + f" or {choices[-1]}")
    return value


def _source(s: _Section) -> LdapSource | LdifSource:
    has_ldap, has_ldif = s.data.get("ldap") is not None, s.data.get("ldif") is not None
    if has_ldap == has_ldif:
        raise ConfigError("exactly one of source.ldap / source.ldif is required", file=s.file, key="source")
    if has_ldif:
        raw = s.data["ldif"]
        if isinstance(raw, str):
            s.used.add("ldif")
            s.done()
            return LdifSource(path=s.path("ldif") or Path(raw))
        ls = s.sub("ldif")
        result = _build(LdifSource, path=_required_path(ls, "path"), base_dn=ls.get("base_dn", str))
        ls.done()
        s.done()
        return result
    ls = s.sub("ldap")
    uri_raw = ls.get("uri", (str, list))
    uris = (uri_raw,) if isinstance(uri_raw, str) else tuple(uri_raw or ())
    if not uris:
        raise ls.error("uri", "is required (one URI or a list, in failover order)")
    for i, uri in enumerate(uris):
        if not isinstance(uri, str) or not uri.lower().startswith(("ldap://", "ldaps://", "ldapi://")):
            key = f"uri[{i}]" if len(uris) > 1 else "uri"
            raise ls.error(key, f"{uri!r} is not an ldap://, ldaps:// or ldapi:// URI")
    if "bind_password" in ls.data:
        raise ls.error("bind_password", "passwords are never inline: use bind_password_file")
    bind_dn = ls.get("bind_dn", str)
    pw_file = ls.path("bind_password_file")
    if bind_dn and pw_file is None:
        raise ls.error("bind_password_file", "is required with bind_dn")
    page_size = ls.get("page_size", int)
    if page_size is not None and not 1 <= page_size <= 100000:
        raise ls.error("page_size", "must be between 1 and 100000")
    rounds = ls.get("connect_rounds", int)
    if rounds is not None and not 1 <= rounds <= 10:
        raise ls.error("connect_rounds", "must be between 1 and 10")
    filt = ls.get("filter", str)
    if filt is not None and not (filt.startswith("(") and filt.endswith(")")):
        raise ls.error("filter", "must be an LDAP filter in parentheses")
    ldap = _build(
        LdapSource,
        uris=uris,
        base_dn=ls.require("base_dn", str),
        filter=filt,
        scope=_choice(ls, "scope", ("sub", "one", "base")),
        start_tls=ls.get("start_tls", bool),
        tls_verify=ls.get("tls_verify", bool),
        ca_file=ls.path("ca_file"),
        bind_dn=bind_dn,
        bind_password_file=pw_file,
        page_size=page_size,
        timeout=_positive(ls, "timeout"),
        watch=_choice(ls, "watch", WATCH_MODES),
        poll_interval=_positive(ls, "poll_interval"),
        connect_rounds=rounds,
    )
    ls.done()
    s.done()
    return ldap


def _required_path(s: _Section, name: str) -> Path:
    p = s.path(name)
    if p is None:
        raise s.error(name, "is required")
    return p


def _exporter(s: _Section) -> ExporterSpec:
    from ldapsync.exporters import exporter_class

    kind = s.require("kind", str)
    cls = exporter_class(kind, file=s.file, key=s.key("kind"))
    path = _required_path(s, "path")
    map_type: str | None = None
    if cls.postfix_map:
        map_type = s.get("map_type", str, "hash")
        if map_type not in MAP_TYPES:
            raise s.error("map_type", f"must be one of {', '.join(MAP_TYPES)}")
    owner = _user(s, "owner")
    group = _group(s, "group")
    mode_raw = s.get("mode", (str, int))
    mode: int | None = None
    if isinstance(mode_raw, int):
        # YAML 1.1 reads an unquoted 0640 as the number 416: guessing would install 0416 or worse.
        raise s.error("mode", f'write the mode as a quoted octal string like "0640", not the number {mode_raw}')
    if mode_raw is not None:
        try:
            mode = int(mode_raw, 8)
        except ValueError as e:
            raise s.error("mode", f'{mode_raw!r} is not an octal mode like "0640"') from e
        if not 0 <= mode <= 0o777:
            raise s.error("mode", "must be between 0000 and 0777")
    name = s.get("name", str, kind)
    options = {k: v for k, v in s.data.items() if k not in s.used and k != "name"}
    cls.check_options(options, file=s.file, key=s.prefix)
    s.used.update(options)
    return ExporterSpec(kind, name, path, map_type, owner, group, mode, options, s.prefix)


def _user(s: _Section, name: str) -> int | None:
    value = s.get(name, (str, int))
    if value is None or isinstance(value, int):
        return value
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError as e:
        raise s.error(name, f"no such user {value!r}") from e


def _group(s: _Section, name: str) -> int | None:
    value = s.get(name, (str, int))
    if value is None or isinstance(value, int):
        return value
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError as e:
        raise s.error(name, f"no such group {value!r}") from e


def _commands(s: _Section, name: str) -> tuple[tuple[str, ...], ...]:
    raw = s.get(name, list, [])
    return tuple(_argv(s, f"{name}[{i}]", cmd) for i, cmd in enumerate(raw))


def _argv(s: _Section, key: str, cmd: object) -> tuple[str, ...]:
    if isinstance(cmd, str):
        argv = shlex.split(cmd)
    elif isinstance(cmd, list) and all(isinstance(a, str) for a in cmd):
        argv = list(cmd)
    else:
        raise s.error(key, "must be a command string or a list of strings")
    if not argv:
        raise s.error(key, "is empty")
    return tuple(argv)


def _reload_hooks(
    s: _Section, outputs: list[str]
) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...] | None, ...]]:
    """`reload:` items are commands (run for every output) or `{command: ..., outputs: [names]}`."""
    commands: list[tuple[str, ...]] = []
    serves: list[tuple[str, ...] | None] = []
    for i, item in enumerate(s.get("reload", list, [])):
        key = f"reload[{i}]"
        if not isinstance(item, dict):
            commands.append(_argv(s, key, item))
            serves.append(None)
            continue
        hook = _Section(item, s.file, s.key(key))
        if "command" not in item:
            raise hook.missing("command")
        hook.used.add("command")
        commands.append(_argv(s, f"{key}.command", item["command"]))
        names = hook.get("outputs", list)
        if names is not None:
            if not names:
                raise hook.error("outputs", "is empty (leave it out to reload for every output)")
            for j, n in enumerate(names):
                if n not in outputs:
                    near = difflib.get_close_matches(str(n), outputs, 1)
                    hint = f"; did you mean {near[0]!r}?" if near else f" (outputs: {', '.join(outputs)})"
                    raise hook.error(f"outputs[{j}]", f"{n!r} is not an exporter name{hint}")
            names = tuple(names)
        serves.append(names)
        hook.done()
    return tuple(commands), tuple(serves)
