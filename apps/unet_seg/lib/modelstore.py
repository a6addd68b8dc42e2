"""The model store: the one place that reads and writes model files, with versions and a serving pointer.

Layout (one folder per model under the model dir)::

    <model_dir>/<model>/registry.json      which version serves, the serving history, one record per version
    <model_dir>/<model>/versions/v<N>.pt   {"model": state_dict, "meta": CheckpointMeta}
    <model_dir>/<model>/.lock              flock'ed around every change (server and training processes share it)

* A version is written to ``versions/.tmp-<pid>-<random>.pt`` first; renaming it to ``v<N>.pt``
  and recording it in the registry happen under the lock, and the registry itself is replaced
  atomically, so switching the serving version is one rename: a reader sees the old or the new
  version, never half of one.
* States: ``training`` (a run still improves it), ``serving``, ``candidate`` (kept, not served;
  the record says why), ``retired`` (served before), ``fold`` (a cross-validation member).
* ``recover()`` (server start, training start) removes temp files of dead writers, version
  files never recorded, records whose file is gone, and marks ``training`` versions of runs that
  died as candidates. Legacy single files ``<model>.pt`` / ``<model>_fold<k>.pt`` are imported as
  versions (the first one serves).
* The last ``keep`` versions (plus the serving one, pinned ones, the newest of each fold and
  any still training) are kept; older files are deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import re
import secrets
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .checkpoints import CheckpointMeta, MetaError, now_iso, read_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

REGISTRY_SCHEMA = 1
STATES = ("training", "serving", "candidate", "retired", "fold")
VERSION_ID = re.compile(r"^v([1-9][0-9]{0,8})$")
#: fault injection for the crash tests: "version-written" (temp file written, not yet recorded) or
#: "before-switch" (recorded, pointer not yet switched) makes the writing process kill -9 itself there
FAILPOINT_ENV = "UNET_SEG_STORE_FAILPOINT"


class StoreError(ValueError):
    """A store operation that cannot be done as asked (nothing to roll back to, a version still training...)."""


class UnknownVersion(StoreError):
    """The model has no version of that id."""


@dataclass
class VersionRecord:
    """What the registry knows about one version (the meta block stays in the file)."""

    id: str
    created: str
    source: str
    state: str
    reason: str = ""
    pinned: bool = False
    val_mean_dice: float | None = None
    val_cases: int = 0
    parent: str | None = None
    fold: int | None = None
    run_id: str | None = None
    epoch: int | None = None
    gate: dict[str, Any] = field(default_factory=dict)

    @property
    def number(self) -> int:
        """The N of ``v<N>``."""
        return int(self.id[1:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _failpoint(name: str) -> None:
    if os.environ.get(FAILPOINT_ENV) == name:
        logger.warning(f"model store failpoint {name}: killing this process (-9)")
        os.kill(os.getpid(), signal.SIGKILL)


class ModelStore:
    """Versions of one model (see module docstring). Safe across threads and processes."""

    _thread_locks: dict[str, threading.RLock] = {}

    def __init__(self, model_dir: str, model: str, keep: int = 5) -> None:
        self.model = model
        self.root = os.path.join(os.path.abspath(model_dir), model)
        self.model_dir = os.path.abspath(model_dir)
        self.versions_dir = os.path.join(self.root, "versions")
        self.registry_path = os.path.join(self.root, "registry.json")
        self.keep = max(1, int(keep))
        os.makedirs(self.versions_dir, exist_ok=True)
        self._tlock = ModelStore._thread_locks.setdefault(self.root, threading.RLock())
        self._meta_cache: dict[str, tuple[tuple[int, int], CheckpointMeta]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (trainers travel to spawned training processes): locks and caches are per process."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_tlock", "_meta_cache")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tlock = ModelStore._thread_locks.setdefault(self.root, threading.RLock())
        self._meta_cache = {}

    # ---- registry ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of the registry under the thread and file locks; written back atomically."""
        with self._tlock, open(os.path.join(self.root, ".lock"), "a+") as lockfile:
            fcntl.flock(lockfile, fcntl.LOCK_EX)
            try:
                reg = self._read()
                before = json.dumps(reg, sort_keys=True)
                yield reg
                if json.dumps(reg, sort_keys=True) != before:
                    self._write(reg)
            finally:
                fcntl.flock(lockfile, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.registry_path, encoding="utf-8") as f:
                reg = json.load(f)
        except FileNotFoundError:
            reg = {}
        reg.setdefault("schema", REGISTRY_SCHEMA)
        reg.setdefault("model", self.model)
        reg.setdefault("serving", None)
        reg.setdefault("history", [])
        reg.setdefault("next", 1)
        reg.setdefault("versions", {})
        return reg

    def _write(self, reg: dict[str, Any]) -> None:
        tmp = os.path.join(self.root, f".registry.json.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(reg, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.registry_path)

    @staticmethod
    def _record(reg: Mapping[str, Any], vid: str) -> VersionRecord:
        return VersionRecord(**reg["versions"][vid])

    # ---- reading ----------------------------------------------------------------------------
    def records(self) -> list[VersionRecord]:
        """Every recorded version, newest first."""
        reg = self._read()
        return sorted((VersionRecord(**r) for r in reg["versions"].values()), key=lambda r: -r.number)

    def get(self, vid: str) -> VersionRecord:
        """The record of ``vid`` (StoreError if unknown)."""
        reg = self._read()
        if vid not in reg["versions"]:
            known = ", ".join(r.id for r in self.records()) or "none"
            raise UnknownVersion(f"model '{self.model}' has no version {vid!r}; versions: {known}")
        return self._record(reg, vid)

    def serving(self) -> VersionRecord | None:
        """The version that serves, or None."""
        reg = self._read()
        vid = reg["serving"]
        return self._record(reg, vid) if vid in reg["versions"] else None

    def path(self, vid: str) -> str:
        """File of a version."""
        if not VERSION_ID.match(vid):
            raise StoreError(f"invalid version id {vid[:40]!r} (expected v<N>)")
        return os.path.join(self.versions_dir, f"{vid}.pt")

    def meta(self, vid: str) -> CheckpointMeta:
        """Typed meta of a version, cached by file identity (cheap for /info and every /infer)."""
        path = self.path(vid)
        st = os.stat(path)
        key = (st.st_mtime_ns, st.st_size)
        cached = self._meta_cache.get(vid)
        if cached and cached[0] == key:
            return cached[1]
        _, raw = read_checkpoint(path)
        meta = CheckpointMeta.from_dict(raw)
        self._meta_cache[vid] = (key, meta)
        return meta

    def load(self, vid: str) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
        """Weights and meta of a version."""
        state, raw = read_checkpoint(self.path(vid))
        return state, CheckpointMeta.from_dict(raw)

    def latest_per_fold(self) -> dict[int, VersionRecord]:
        """The newest version of each cross-validation fold."""
        out: dict[int, VersionRecord] = {}
        for rec in reversed(self.records()):  # oldest first, so newer ones win
            if rec.fold is not None and rec.state != "training":
                out[rec.fold] = rec
        return out

    # ---- writing ----------------------------------------------------------------------------
    def _write_temp(self, state: Mapping[str, torch.Tensor], meta: CheckpointMeta) -> str:
        tmp = os.path.join(self.versions_dir, f".tmp-{os.getpid()}-{secrets.token_hex(6)}.pt")
        try:
            save_checkpoint(tmp, state, meta)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return tmp

    def add(
        self,
        state: Mapping[str, torch.Tensor],
        meta: CheckpointMeta,
        state_name: str = "candidate",
        reason: str = "",
        serve: bool = False,
    ) -> VersionRecord:
        """Record a new version (the id is written into its meta); ``serve`` switches to it in the same step."""
        if state_name not in STATES or state_name == "serving":
            raise StoreError(f"cannot add a version in state {state_name!r}")
        with self._locked() as reg:
            vid = f"v{reg['next']}"
            reg["next"] += 1
        meta.version = vid
        meta.created = meta.created or now_iso()
        tmp = self._write_temp(state, meta)
        _failpoint("version-written")
        try:
            with self._locked() as reg:
                os.replace(tmp, self.path(vid))
                val = meta.validation
                rec = VersionRecord(
                    id=vid,
                    created=meta.created,
                    source=meta.source,
                    state=state_name,
                    reason=reason,
                    val_mean_dice=meta.val_mean_dice,
                    val_cases=len(val.cases) if val else 0,
                    parent=meta.parent,
                    fold=meta.fold,
                    run_id=meta.run_id,
                    epoch=meta.epoch,
                )
                reg["versions"][vid] = asdict(rec)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        logger.info(f"{self.model}: recorded {vid} ({meta.source}, {state_name}{': ' + reason if reason else ''})")
        _failpoint("before-switch")
        if serve:
            rec = self.promote(vid, reason)
        self.prune()
        return rec

    def update(self, vid: str, state: Mapping[str, torch.Tensor], meta: CheckpointMeta) -> VersionRecord:
        """Replace the weights of a version still in training (a better epoch of the same run)."""
        meta.version = vid
        tmp = self._write_temp(state, meta)
        try:
            with self._locked() as reg:
                if vid not in reg["versions"] or reg["versions"][vid]["state"] not in ("training", "serving"):
                    raise StoreError(f"{vid} is no longer being trained")
                if reg["versions"][vid]["state"] == "serving" and reg["versions"][vid]["run_id"] != meta.run_id:
                    raise StoreError(f"{vid} belongs to another run")
                os.replace(tmp, self.path(vid))
                r = reg["versions"][vid]
                r.update(
                    val_mean_dice=meta.val_mean_dice,
                    val_cases=len(meta.validation.cases) if meta.validation else 0,
                    epoch=meta.epoch,
                )
                return VersionRecord(**r)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def set_state(
        self, vid: str, state_name: str, reason: str = "", gate: Mapping[str, Any] | None = None
    ) -> VersionRecord:
        """Mark a non-serving version (candidate, fold...) with the reason."""
        if state_name not in STATES or state_name == "serving":
            raise StoreError(f"use promote() to serve a version; cannot set state {state_name!r}")
        with self._locked() as reg:
            self._require(reg, vid)
            if reg["serving"] == vid:
                raise StoreError(f"{vid} is serving; promote or roll back to another version first")
            reg["versions"][vid].update(
                state=state_name, reason=reason, **({"gate": dict(gate)} if gate is not None else {})
            )
            return self._record(reg, vid)

    def _require(self, reg: Mapping[str, Any], vid: str) -> None:
        self.path(vid)  # the id's form
        if vid not in reg["versions"]:
            known = ", ".join(sorted(reg["versions"], key=lambda v: int(v[1:]))) or "none"
            raise UnknownVersion(f"model '{self.model}' has no version {str(vid)[:40]!r}; versions: {known}")

    def promote(self, vid: str, reason: str = "", gate: Mapping[str, Any] | None = None) -> VersionRecord:
        """Serve ``vid`` from the next request on (one atomic registry replace); the previous one is retired."""
        with self._locked() as reg:
            self._require(reg, vid)
            if not os.path.exists(self.path(vid)):
                raise StoreError(f"{vid}: its file is missing")
            old = reg["serving"]
            if old == vid:  # already serving (e.g. the first model, served while it trained): record why
                reg["versions"][vid].update(
                    reason=reason or reg["versions"][vid]["reason"],
                    **({"gate": dict(gate)} if gate is not None else {}),
                )
                return self._record(reg, vid)
            if old in reg["versions"]:
                reg["versions"][old].update(state="retired", reason=f"replaced by {vid}")
            reg["versions"][vid].update(
                state="serving", reason=reason or "promoted", **({"gate": dict(gate)} if gate is not None else {})
            )
            reg["serving"] = vid
            reg["history"] = [v for v in reg["history"] if v != vid] + [vid]
            logger.info(f"{self.model}: {vid} serves now (was {old}); {reason}")
            return self._record(reg, vid)

    def rollback(self) -> VersionRecord:
        """Serve the version that served before the current one."""
        with self._locked() as reg:
            current = reg["serving"]
            previous = [v for v in reg["history"][:-1] if v in reg["versions"] and os.path.exists(self.path(v))]
            if current is None or not previous:
                raise StoreError(f"model '{self.model}': no earlier serving version to roll back to")
            back = previous[-1]
            reg["versions"][current].update(state="candidate", reason=f"rolled back to {back}")
            reg["versions"][back].update(state="serving", reason=f"rolled back from {current}")
            reg["serving"] = back
            reg["history"] = [v for v in reg["history"] if v != current and v != back] + [back]
            logger.info(f"{self.model}: rolled back from {current} to {back}")
            return self._record(reg, back)

    def pin(self, vid: str, pinned: bool = True) -> VersionRecord:
        """Pinned versions are never pruned."""
        with self._locked() as reg:
            self._require(reg, vid)
            reg["versions"][vid]["pinned"] = bool(pinned)
            return self._record(reg, vid)

    def prune(self) -> list[str]:
        """Delete versions beyond the newest ``keep`` (never serving, pinned, training, or a fold's newest)."""
        removed = []
        with self._locked() as reg:
            keep = set(sorted(reg["versions"], key=lambda v: -int(v[1:]))[: self.keep])
            keep |= {reg["serving"]} | {f.id for f in self._fold_heads(reg)}
            for vid, rec in list(reg["versions"].items()):
                if vid in keep or rec.get("pinned") or rec.get("state") == "training":
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path(vid))
                del reg["versions"][vid]
                removed.append(vid)
            reg["history"] = [v for v in reg["history"] if v in reg["versions"]]
        if removed:
            logger.info(f"{self.model}: pruned {', '.join(removed)} (keep_versions={self.keep})")
        return removed

    @staticmethod
    def _fold_heads(reg: Mapping[str, Any]) -> list[VersionRecord]:
        heads: dict[int, VersionRecord] = {}
        for vid in sorted(reg["versions"], key=lambda v: int(v[1:])):
            rec = VersionRecord(**reg["versions"][vid])
            if rec.fold is not None:
                heads[rec.fold] = rec
        return list(heads.values())

    # ---- start-up ---------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Clean what interrupted writes left (see module docstring); returns what was done, one line each.

        Call where no run of this model can be training: server start-up and the start of a training.
        """
        done: list[str] = []
        with self._locked() as reg:
            for tmp in glob.glob(os.path.join(self.versions_dir, ".tmp-*")) + glob.glob(
                os.path.join(self.root, ".registry.json.tmp-*")
            ):
                m = re.search(r"\.tmp-(\d+)-", os.path.basename(tmp))
                if m and int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1))):
                    continue  # another live process is writing it
                os.remove(tmp)
                done.append(f"removed the temp file of an interrupted write ({os.path.basename(tmp)})")
            for path in glob.glob(os.path.join(self.versions_dir, "v*.pt")):
                vid = os.path.basename(path)[:-3]
                if vid not in reg["versions"]:
                    os.remove(path)
                    done.append(f"removed {vid}.pt, written but never recorded")
            for vid, rec in list(reg["versions"].items()):
                if not os.path.exists(self.path(vid)):
                    del reg["versions"][vid]
                    done.append(f"dropped the record of {vid}: its file is missing")
                elif rec["state"] == "training":
                    rec.update(state="candidate", reason="its training run stopped before it finished (not compared)")
                    done.append(f"{vid}: training was interrupted; kept as a candidate")
            reg["history"] = [v for v in reg["history"] if v in reg["versions"]]
            if reg["serving"] not in reg["versions"]:
                if reg["serving"] is not None:
                    done.append(f"serving version {reg['serving']} is gone")
                reg["serving"] = reg["history"][-1] if reg["history"] else None
                if reg["serving"]:
                    reg["versions"][reg["serving"]].update(state="serving", reason="the newer serving version was lost")
        for line in done:
            logger.warning(f"{self.model}: {line}")
        return done

    def import_file(
        self, path: str, source: str = "imported", serve: bool = False, fold: int | None = None, move: bool = False
    ) -> VersionRecord:
        """Add a single model file (legacy layout, ``pretrained`` conf, upload) as a version.

        ``move`` removes the file.
        """
        state, raw = read_checkpoint(path)
        meta = CheckpointMeta.from_dict(raw, strict=source == "uploaded")
        meta.source, meta.version = source, None
        if fold is not None:
            meta.fold = fold
        rec = self.add(
            state,
            meta,
            state_name="fold" if fold is not None else "candidate",
            reason=f"{source} from {os.path.basename(path)}",
            serve=serve,
        )
        if move:
            os.remove(path)
        return rec

    def import_legacy(self) -> list[str]:
        """Import ``<model>.pt`` (serves if nothing does) and ``<model>_fold<k>.pt`` from the model dir."""
        done = []
        for leftover in glob.glob(os.path.join(self.model_dir, ".publish_*")):  # temp files of the single-file layout
            with contextlib.suppress(FileNotFoundError):  # every model's store looks at the same folder
                os.remove(leftover)
                done.append(f"removed {os.path.basename(leftover)}, left by an interrupted write of the old layout")
                logger.warning(f"{self.model}: {done[-1]}")
        main = os.path.join(self.model_dir, f"{self.model}.pt")
        folds = sorted(glob.glob(os.path.join(self.model_dir, f"{self.model}_fold*.pt")))
        for path in [main, *folds] if os.path.exists(main) else folds:
            m = re.search(r"_fold(\d+)\.pt$", path)
            fold = int(m.group(1)) if m else None
            try:
                rec = self.import_file(path, serve=fold is None and self.serving() is None, fold=fold, move=True)
            except (MetaError, OSError, RuntimeError) as e:
                logger.warning(f"{self.model}: cannot import {os.path.basename(path)} ({e}); left where it is")
                continue
            done.append(f"imported {os.path.basename(path)} as {rec.id}")
            logger.info(f"{self.model}: {done[-1]}")
        return done

    def describe(self) -> list[dict[str, Any]]:
        """Versions for /info and the CLI: id, created, Dice, state, reason, source, pinned."""
        return [
            {
                "id": r.id,
                "created": r.created,
                "val_mean_dice": r.val_mean_dice,
                "val_cases": r.val_cases,
                "state": r.state,
                "reason": r.reason,
                "source": r.source,
                "pinned": r.pinned,
                "parent": r.parent,
                "fold": r.fold,
                "epoch": r.epoch,
                **({"gate": r.gate} if r.gate else {}),
            }
            for r in self.records()
        ]
