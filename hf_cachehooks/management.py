"""Look after a cache root over the one entry contract: list, size, prune by age, clear, verify, explain.

Management finds entries by their manifests (`entry.MARK`, the first bytes of every manifest) in
folders marked as this library's cache: a CACHEDIR.TAG of ours in the folder or in a parent below
the root. `ls`, `du`, `prune` and `clear` read only each manifest's head (`heads.read_summary`: kind, key
digest and the `summary` the contract wrote), so this module knows no kind but the store link; `verify`
and `explain` open entries through the contract. It deletes an entry whole through `entry.remove_entry`,
which touches only the files the manifest lists that still hold the bytes recorded, and otherwise only a
writer's own leftovers (temp files, lock and trash files of dead writers, older than an hour, whose real
path lies under the root; on a remote root, lease objects named by their URL, never by a local path).
Deleting is two steps, as in huggingface_hub: build a frozen `Plan` (what would go, how many bytes), then
`execute()` it; `--dry-run` prints the plan only.

An activation store written outside the root (`cache-activations --output`) is known there by a link,
an entry of kind "store-link" that lists no files (`<root>/activations/link-*.json`, written by the
store's writer). `ls`, `du` and `verify` show the store it names, opened through the contract, as the
store itself; `prune` and `clear` remove only the link, never a file outside the root. A link whose
store is gone or is no longer a valid store is shown as a stale "store-link" entry, which `prune` removes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ._core import remote
from ._core.entry import Entry, inspect, remove_entry
from ._core.heads import Head, head_of, read_head
from ._core.keys import diff_inputs, flatten
from ._core.kinds import BOOKKEEPING, LINKED_KIND, LINKED_MANIFEST, MISS_KIND
from ._core.kinds import LINK_KIND as LINK
from ._core.roots import root_at
from .errors import ConfigError

_LEFTOVER_GRACE = 3600.0  # a temp, lock or trash file this old belongs to a dead writer (live locks beat every 5 s)


@dataclass(frozen=True)
class EntryInfo:
    """One cache entry as `ls` shows it, from its manifest's `summary`: `path` is its manifest, `size` the bytes of
    the manifest and everything it lists, `examples` its items (rows, samples, tokens), `created_at` when it was
    made and `last_used` when it was last read (what `prune` ages by; for most kinds, when it was made).

    `link`: for an activation store outside the root, the root's link to it (what `prune` and `clear`
    remove); `path` is then the store's own manifest, and a stale link has the kind "store-link".
    """

    kind: str
    model: str
    path: Path
    size: int
    created_at: float
    last_used: float
    key: str
    examples: int
    link: Path | None = None
    pinned: bool = False


@dataclass(frozen=True)
class Plan:
    """Entries (manifests) and leftover files a delete would remove, with the bytes it frees.

    `leases` are dead writers' lease objects on a remote root, by URL: they are deleted on the store and
    never become a local path. `kept` maps each planned link to the activation store folder it names,
    which stays. Nothing happens until `execute()`.
    """

    entries: tuple[Path, ...] = ()
    leftovers: tuple[Path, ...] = ()
    size: int = 0
    leases: tuple[str, ...] = ()
    root: Path | None = None
    kept: dict[Path, Path] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path | str]:
        return [*self.entries, *self.leftovers, *self.leases]

    def execute(self) -> int:
        """Delete the planned entries whole, then the leftovers; return how many items were removed.

        A local leftover is unlinked only when its real path lies under the root's real path (a linked
        `.locks` folder never leads outside).
        """
        for path in self.entries:
            remove_entry(path)
        for url in self.leases:
            remote.remove_object(url)
        top = os.path.join(os.path.realpath(self.root), "") if self.root is not None else None
        for path in self.leftovers:
            if top is None or not os.path.realpath(path).startswith(top):
                continue
            with contextlib.suppress(OSError):
                path.unlink()
        return len(self.paths)


def is_cache(root: Path) -> bool:
    """True when `root` is, or holds, a folder marked as this library's cache (on a remote root: in the bucket)."""
    return root_at(root).is_cache()


def _folder_kind(root: Path, path: Path) -> str:
    return path.relative_to(root).parts[0] if path.parent != root else ""


def shown(path: Path) -> str:
    """A path as users know it: the URL for an entry of a remote root (s3://...), else the path."""
    return remote.url_of(path) or str(path)


def _store_manifest(link: Entry) -> Path | None:
    folder = link.doc.get("folder")
    return Path(folder) / LINKED_MANIFEST if isinstance(folder, str) and os.path.isabs(folder) else None


def _linked(link: Entry, check: str) -> tuple[Entry | None, str | None]:
    """The activation store a link names, opened through the contract: (store, None), or (None, why it is stale)."""
    path = _store_manifest(link)
    if path is None:
        return None, f"malformed folder {link.doc.get('folder')!r:.80}"
    found, problem = inspect(path, check=check)
    if found is None or found.kind != LINKED_KIND:
        why = problem or ("missing" if found is None else f"a {found.kind} entry, not {LINKED_KIND}")
        return None, f"the linked activation store {path.parent} is {why}; `clear --kind {LINK}` forgets the link"
    return found, None


def _readable(root: Path, spare: list[Path] | None = None) -> Iterator[tuple[Head, Path, Path | None]]:
    """(head, path, link) of every readable entry. A link (a few per root) is read whole with the store it
    names, whose files' sizes are checked: the store's head, its manifest and the link; a stale link's own head."""
    for head in root_at(root).heads(spare):
        if head.kind != LINK:
            yield head, head.path, None
            continue
        link, _ = inspect(head.path, check="size")
        store = _linked(link, "size")[0] if link is not None else None
        if store is None:
            yield head, (_store_manifest(link) if link is not None else None) or head.path, head.path
        else:
            yield head_of(store.path, store.doc, store.path.stat().st_size), store.path, head.path


def _entries(
    root: Path, kind: str | None, bookkeeping: bool = True, spare: list[Path] | None = None
) -> Iterator[EntryInfo]:
    """Readable entries (their heads: `verify` hashes), filtered by entry kind or top folder."""
    for head, path, link in _readable(root, spare):
        if kind is None and not bookkeeping and head.kind in BOOKKEEPING:
            continue
        if kind is not None and kind not in (head.kind, _folder_kind(root, link or path)):
            continue
        summary = head.summary
        yield EntryInfo(
            head.kind,
            summary["model"],
            path,
            head.size,
            head.created,
            head.last_used,
            head.digest[:12],
            summary["items"],
            link,
            summary.get("pinned") is True,
        )


def _check_kind(root: Path, kind: str | None) -> None:
    if kind is None:
        return
    known: set[str] = set()
    for head, path, link in _readable(root):
        known |= {head.kind, _folder_kind(root, link or path)}
    if kind not in known:
        present = ", ".join(sorted(known - {""})) or "none"
        raise ConfigError(f"No cache kind {kind!r} under {root} (present: {present}).")


def _matching(
    root: Path, kind: str | None, bookkeeping: bool = True, spare: list[Path] | None = None
) -> list[EntryInfo]:
    """`_entries` in one scan; an empty result for a named kind is the unknown-kind error (a second scan only then)."""
    found = list(_entries(root, kind, bookkeeping, spare))
    if not found:
        _check_kind(root, kind)
    return found


def list_entries(root: Path, kind: str | None = None, bookkeeping: bool = False) -> list[EntryInfo]:
    """Every entry (of one kind or top folder, if given), last used first; memos only with `bookkeeping`."""
    return sorted(_matching(root, kind, bookkeeping), key=lambda e: -e.last_used)


def disk_usage(root: Path) -> dict[str, int]:
    """Bytes used per entry kind (manifests and every file they list, as their summaries record them)."""
    usage: dict[str, int] = {}
    for info in _entries(root, None):
        usage[info.kind] = usage.get(info.kind, 0) + info.size
    return dict(sorted(usage.items()))


def _require_cache(root: Path) -> None:
    if not is_cache(root):
        raise ConfigError(
            f"{root} is not an hf_cachehooks cache (no CACHEDIR.TAG of ours in it or its folders); "
            "nothing was deleted. Check the root argument or HF_CACHEHOOKS_HOME."
        )


@dataclass
class _Draft:
    """A plan being built (`Plan` is frozen once built)."""

    root: Path
    entries: list[Path] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)
    kept: dict[Path, Path] = field(default_factory=dict)
    size: int = 0

    def add(self, info: EntryInfo) -> None:
        """Plan removing `info`: the entry whole, or for a store outside the root its link only (the store stays)."""
        if info.link is None:
            self.entries.append(info.path)
            self.size += info.size
            return
        self.entries.append(info.link)
        with contextlib.suppress(OSError):
            self.size += info.link.stat().st_size
        if info.kind != LINK:
            self.kept[info.link] = info.path.parent

    def plan(self) -> Plan:
        return Plan(tuple(self.entries), tuple(self.leftovers), self.size, tuple(self.leases), self.root, self.kept)


def _leftovers(root: Path, now: float, plan: _Draft, spare: list[Path]) -> None:
    """Temp files of dead writers, and lock and trash files their holders left, older than an hour.

    `spare`: the candidates the root's `heads` met in its walk (of a remote root: of its local copy).
    """
    for url, size in root_at(root).dead_leases(now, _LEFTOVER_GRACE):  # a bucket's dead leases (none when local)
        plan.leases.append(url)
        plan.size += size
    top = os.path.join(os.path.realpath(root), "")
    for path in spare:
        if not os.path.realpath(path).startswith(top):  # a linked `.locks` leads outside: not ours
            continue
        with contextlib.suppress(OSError):
            st = path.stat()
            if now - st.st_mtime > _LEFTOVER_GRACE:
                plan.leftovers.append(path)
                plan.size += st.st_size


def plan_clear(root: Path, kind: str | None = None) -> Plan:
    """Every entry (of one kind or top folder), plus dead writers' leftovers when clearing everything.

    Raises:
        ConfigError: `root` is not a cache of this library, or holds no such kind.
    """
    _require_cache(root)
    draft = _Draft(root)
    spare: list[Path] = []  # leftovers met in the same walk
    for info in _matching(root, kind, spare=spare):
        draft.add(info)
    if kind is None:
        _leftovers(root, time.time(), draft, spare)
    return draft.plan()


def plan_prune(root: Path, older_than: float, now: float | None = None, kind: str | None = None) -> Plan:
    """Entries last used (`EntryInfo.last_used`) more than `older_than` seconds ago, stale links, and dead
    writers' leftovers.

    Pinned entries stay; of a store outside the root only its link goes.
    """
    _require_cache(root)
    now = time.time() if now is None else now
    draft = _Draft(root)
    spare: list[Path] = []  # leftovers met in the same walk
    for info in _matching(root, kind, spare=spare):
        if (now - info.last_used > older_than or info.kind == LINK) and not info.pinned:
            draft.add(info)
    _leftovers(root, now, draft, spare)
    return draft.plan()


def verify(root: Path, kind: str | None = None) -> tuple[int, list[tuple[Path, str]]]:
    """Hash every file of every entry against its manifest. Returns (entries checked, [(manifest, problem)]).

    A link is checked as the store it names (one verdict, reported at the link): a stale link is a problem.
    """
    _check_kind(root, kind)
    checked, problems = 0, []
    scanned = root_at(root).scan("hash")  # on a remote root every object streamed through xxh3, nothing kept
    for path, found, problem in scanned:
        if found is not None and kind not in (None, found.kind, _folder_kind(root, path)):
            continue
        if found is None and kind not in (None, _folder_kind(root, path)):
            continue
        checked += 1
        if found is not None and found.kind == LINK:
            problem = _linked(found, "hash")[1]
        if problem:
            problems.append((path, problem))
    return checked, problems


def find_entry(ref: str, root: Path) -> Path:
    """The manifest `ref` names: an entry file, or a key prefix as `ls` prints it (KEY column).

    A prefix is matched among the entries `ls` lists by default (an activation store outside the root as the
    store itself); the memos `ls --all` adds (identity, file-hashes, last-miss: a last-miss record has the key
    of the entry it missed) only when no other entry matches.

    Raises:
        ConfigError: `ref` names no entry, or several.
    """
    path = Path(ref)
    if path.is_file():
        return path
    entries: dict[Path, str] = {}
    memos: dict[Path, str] = {}
    for head, found, _ in _readable(root) if ref else ():
        if head.digest.startswith(ref.lower()):
            (memos if head.kind in BOOKKEEPING else entries)[found] = head.kind
    matches = entries or memos
    if len(matches) == 1:
        return next(iter(matches))
    if not matches:
        raise ConfigError(
            f"{ref!r} is neither an entry file nor the key of an entry under {root}. Give a key as "
            "`hf-cachehooks ls` prints it (KEY column; `ls --all` adds the memos) or a manifest's path."
        )
    names = ", ".join(f"{shown(m)} ({kind})" for m, kind in sorted(matches.items())[:5])
    raise ConfigError(f"{ref!r} names {len(matches)} entries under {root}: {names}. Give a longer key or a file path.")


def _opened(ref: str, root: Path) -> Entry:
    path = find_entry(ref, root)
    found, problem = inspect(path, check="size")
    if found is None or not isinstance(found.key.get("inputs"), dict):
        raise ConfigError(
            f"{path} is not a readable cache entry ({problem or 'no key inputs'}); run `hf-cachehooks verify`."
        )
    return found


def _misses(root: Path, digest: str | None = None) -> list[str]:
    """Lines for each recorded last miss (of the key `digest` only, when given)."""
    lines = []
    for path in root_at(root).manifests():  # only the heads are read to find the last-miss records
        head = read_head(path)
        if head is None or head[0] != MISS_KIND or (digest is not None and head[1].get("digest") != digest):
            continue
        found = inspect(path, check="size")[0]
        if found is None:
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.created_at))
        lines.append(
            f"Last {found.key['kind']} miss ({when}, key {found.key['digest'][:12]}): {found.doc.get('reason')}"
        )
        lines += [f"  {c}" for c in found.doc.get("changes", [])]
    return lines


def explain(root: Path, a: str | None = None, b: str | None = None) -> list[str]:
    """Lines saying which key fields differ between entries `a` and `b`, what entry `a` was made from (with the
    last miss recorded for its key), or, with neither, why the last lookups missed.

    `a` and `b` are entry files or key prefixes as `ls` prints them (`find_entry`).

    Raises:
        ConfigError: a reference that names no entry or several, or `b` without `a`.
    """
    if b and not a:
        raise ConfigError("explain takes entry A, or entries A and B; got B alone.")
    if a and b:
        first, second = _opened(a, root), _opened(b, root)
        changes = diff_inputs(first.key["inputs"], second.key["inputs"])
        return [f"{first.path.name} → {second.path.name}:"] + ([f"  {c}" for c in changes] or ["  same key inputs"])
    if a:
        found = _opened(a, root)
        digest = str(found.key.get("digest", ""))
        lines = [f"{shown(found.path)} ({found.kind}, key {digest[:12]}) was made from:"]
        lines += [f"  {name} = {_value(value)}" for name, value in sorted(flatten(found.key["inputs"]).items())]
        return lines + (_misses(root, digest) if found.kind != MISS_KIND else [])
    return _misses(root) or [f"No recorded miss under {root}."]


def _value(value: object) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= 100 else text[:70] + "…" + text[-20:]


def to_json(infos: list[EntryInfo]) -> bytes:
    """Entries as JSON data for `ls --format json`."""
    return orjson.dumps(
        [{**e.__dict__, "path": shown(e.path), "link": e.link and shown(e.link)} for e in infos],
        option=orjson.OPT_INDENT_2,
    )
