"""The management commands: ls, du, prune, clear (asks first), verify, explain, push, pull. They print; the
library logs. A root given as a URL (s3://bucket/prefix) is managed on the store itself."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import management
from .._core import remote_sync
from .._core.freshness import describe_age, parse_duration
from .._core.store import is_url, url_of
from ..errors import ConfigError
from ..management import is_cache, shown


def human_bytes(n: float) -> str:
    """Bytes as the CLI prints them: `512 B`, `1.5 KB`, `3.2 MB`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def require_cache_root(root: Path) -> None:
    """Refuse a root that does not exist or holds no cache of ours: every management command says it this way.

    A real cache root with no entries in it (after `clear`, say) is not refused.

    Raises:
        ConfigError: naming the root and how to point at the right one.
    """
    remote_root = url_of(root) is not None
    if not remote_root and not root.is_dir():
        why = "the folder does not exist" if not root.exists() else "it is not a folder"
    elif not is_cache(root):
        where = "in that bucket prefix" if remote_root else "in it or its folders"
        why = f"it is not an hf_cachehooks cache: no CACHEDIR.TAG of ours {where}"
    else:
        return
    raise ConfigError(
        f"No cache at {shown(root)} ({why}). Point --cache-dir or $HF_CACHEHOOKS_HOME at your cache root."
    )


def _print_plan(plan: management.Plan, dry_run: bool, verb: str) -> None:
    for path in plan.entries:
        kept = plan.kept.get(path)  # a link to a store outside the root: the store stays where it is
        print(
            f"  {shown(path)}"
            + (
                f"  (a link: the activation store in {kept} stays; remove it with "
                f"`hf-cachehooks --cache-dir {kept} clear`)"
                if kept
                else ""
            )
        )
    for path in plan.leftovers:
        print(f"  {shown(path)}  (left by a dead writer)")
    for url in plan.leases:
        print(f"  {url}  (left by a dead writer)")
    if dry_run:
        print(f"Would {verb} {len(plan.paths)} item(s), freeing {human_bytes(plan.size)}. (dry run: nothing deleted)")
    else:
        plan.execute()
        print(f"{verb.capitalize()}d {len(plan.paths)} item(s), freed {human_bytes(plan.size)}.")


def _confirmed(plan: management.Plan, args: argparse.Namespace) -> bool:
    """`clear` deletes only after --yes, or a "y" typed at a terminal."""
    if args.dry_run or args.yes or not plan.paths:
        return True
    question = f"Delete {len(plan.paths)} item(s) ({human_bytes(plan.size)}) under {shown(args.root)}? [y/N] "
    if not sys.stdin.isatty():
        print(
            f"error: clear would delete {len(plan.paths)} item(s) ({human_bytes(plan.size)}) under "
            f"{shown(args.root)}; pass --yes to confirm, or --dry-run to list them.",
            file=sys.stderr,
        )
        return False
    return input(question).strip().lower() in ("y", "yes")


def cmd_ls(args: argparse.Namespace) -> int:
    require_cache_root(args.root)
    infos = management.list_entries(args.root, args.kind, bookkeeping=args.all or args.kind is not None)
    if args.format == "json":
        print(management.to_json(infos).decode())
        return 0
    now = time.time()
    print(f"{'KIND':<22} {'MODEL':<36} {'EXAMPLES':>8} {'SIZE':>9} {'AGE':>5} {'LAST USED':>9}  KEY")
    for e in infos:  # AGE: since it was made; LAST USED: since it was last read (what prune ages by)
        model = e.model if len(e.model) <= 36 else "…" + e.model[-35:]
        used = describe_age(now - e.last_used) + (" (pinned)" if e.pinned else "")
        print(
            f"{e.kind:<22} {model:<36} {e.examples or '-':>8} {human_bytes(e.size):>9} "
            f"{describe_age(now - e.created_at):>5} {used:>9}  {e.key}"
        )
    for e in infos:
        if e.kind == management.LINK:
            print(
                f"Stale link {shown(e.link or e.path)}: no valid activation store in {e.path.parent}; "
                f"`hf-cachehooks --cache-dir {shown(args.root)} clear --kind {management.LINK}` removes the link."
            )
    print(f"{len(infos)} entries under {shown(args.root)}")
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    require_cache_root(args.root)
    usage = management.disk_usage(args.root)
    for kind, size in usage.items():
        print(f"{human_bytes(size):>10}  {kind}")  # entries of each kind: manifests plus the files they list
    print(f"{human_bytes(sum(usage.values())):>10}  total ({shown(args.root)})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    require_cache_root(args.root)
    plan = management.plan_prune(args.root, parse_duration(args.older_than).total_seconds(), kind=args.kind)
    _print_plan(plan, args.dry_run, "remove")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    require_cache_root(args.root)
    plan = management.plan_clear(args.root, args.kind)
    if not _confirmed(plan, args):
        print("Nothing deleted.")
        return 1
    _print_plan(plan, args.dry_run, "remove")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if not args.path:
        require_cache_root(args.root)
    elif not is_url(args.path) and not Path(args.path).exists():
        raise ConfigError(
            f"{args.path} does not exist. Give an activation cache folder (cache-activations --output DIR)."
        )
    if args.path:
        from ..activations.store import verify_store

        problems_found = verify_store(args.path)
        for line in problems_found:
            print(f"CORRUPT {line}")
        print(f"{args.path}: {'OK' if not problems_found else f'{len(problems_found)} problem(s)'}")
        return 1 if problems_found else 0
    checked, problems = management.verify(args.root, args.kind)
    for path, problem in problems:
        print(f"CORRUPT {shown(path)}: {problem}")
    print(f"{checked} entries checked, {len(problems)} corrupt.")
    return 1 if problems else 0


def cmd_explain(args: argparse.Namespace) -> int:
    require_cache_root(args.root)
    for line in management.explain(args.root, args.a, args.b):
        print(line)
    return 0


def _copy_report(done: remote_sync.Copied, verb: str, dry_run: bool) -> int:
    for rel in done.copied:
        print(f"  {rel}")
    for rel, problem in done.skipped:
        print(f"  SKIPPED {rel}: {problem}")
    would = "Would copy" if dry_run else f"{verb.capitalize()}ed"
    print(
        f"{would} {len(done.copied)} entries ({human_bytes(done.bytes)}); {done.present} already there; "
        f"{len(done.skipped)} not usable."
    )
    return 1 if done.skipped else 0


def cmd_push(args: argparse.Namespace) -> int:
    if url_of(args.root) is not None or not is_url(args.url):
        raise ConfigError(
            "push copies from a local cache root (--cache-dir) to a remote one (a URL such as "
            f"s3://bucket/prefix); got --cache-dir {shown(args.root)} and {args.url!r}."
        )
    require_cache_root(args.root)
    return _copy_report(remote_sync.push(args.root, args.url, args.dry_run), "push", args.dry_run)


def cmd_pull(args: argparse.Namespace) -> int:
    if url_of(args.root) is not None or not is_url(args.url):
        raise ConfigError(
            "pull copies from a remote root (a URL such as s3://bucket/prefix) into a local cache "
            f"root (--cache-dir); got {args.url!r} and --cache-dir {shown(args.root)}."
        )
    return _copy_report(remote_sync.pull(args.url, args.root, args.dry_run), "pull", args.dry_run)
