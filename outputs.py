"""What a run leaves in its output folder, and the rules that keep it whole: atomic writes (a
crash leaves the old file or the new one), one rule for whether a results.json is the one expected
there, train.py's checkpoints read back, the folder's lock, and room on its disk checked at start.

    save_atomic(ckpt, "out/last.pt")        # torch.save, atomically; a full disk is a UserError
    ckpt = load_checkpoint("out/last.pt")   # a UserError naming the file unless it is train.py's
    results_match(read_json("out/results.json"), dataset="dtd", seed=1)  # [] or keys that differ
    lock = acquire_output_lock("out")       # refused while another run holds the folder
    release_output_lock(lock)
"""
import contextlib
import fcntl
import json
import os
import pickle
import shutil
import socket
import time
import zipfile
from contextlib import nullcontext

from catalog import UserError

# torch (and clip_model) are imported where a checkpoint is written or read: the report reads
# results.json files through this module without loading torch.
MIN_FREE_BYTES = 2**20  # what an output folder needs at start: results.json (~100 KiB) and the log
CHECKPOINT_KINDS = ("train.py's best.pt or last.pt, or an authors' run folder (holding "
                    "prompt_learner/ and Memory/)")
# results.json "selection" -> what it means (train.py prints it at start; the report too).
SELECTIONS = {"best-val": "the epoch of best val accuracy",
              "best-test": "the epoch of best test accuracy on the evaluated classes, as released; "
                           "this selects on test data",
              "last": "the last epoch"}


def check_output_dir(path, flag="--output-dir", files=()):
    """At start, not after the work: path can become a writable folder on a disk with room, where
    none of the files the command writes there (`files`, names) is a folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a file, not a directory; choose another {flag}")
    existing = path
    while not os.path.exists(existing):
        if os.path.islink(existing):  # the folder would be created where the link points
            raise UserError(f"{flag} {path!r}: {existing} is a symbolic link to "
                            f"{os.readlink(existing)!r}, which does not exist; create that folder "
                            f"or choose another {flag}")
        existing = os.path.dirname(os.path.abspath(existing))
    for name in files:
        if os.path.isdir(os.path.join(path, name)):
            raise UserError(f"{flag} {path!r}: its {name} is a folder, where this command writes a "
                            f"file; move it away or choose another {flag}")
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path!r}: {existing} is not a writable directory")
    check_room(existing, MIN_FREE_BYTES, f"{flag} {path}", "results.json and the log need")


def check_room(folder, need, where, what):
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{where}: its disk has {free / 2**20:.1f} MiB free, {what} "
                        f"{need / 2**20:.1f} MiB; free space on that disk, or choose another "
                        f"folder on another disk")


def check_checkpoint_room(folder, size, best):
    """Room for each checkpoint a run keeps (last.pt, best.pt with best) of `size` bytes and one
    more being written beside them, less what the folder's checkpoints take (a resumed run
    rewrites them)."""
    kept = [os.path.join(folder, name) for name in ("last.pt", "best.pt")[:2 if best else 1]]
    taken = sum(os.path.getsize(p) for p in kept if os.path.isfile(p))
    check_room(folder, (len(kept) + 1) * size + MIN_FREE_BYTES - taken, f"--output-dir {folder}",
               f"the run's checkpoints ({size / 2**20:.1f} MiB each) need")


def replace_atomically(path, write, shared=False):
    """write(f) into a temporary file, flushed to the disk, then renamed over path: a crash leaves
    the old file or the new one. A failed write (a full disk: OSError, or torch.save's RuntimeError)
    is a UserError, path as it was. shared: no lock guards path (the report): a file per process."""
    tmp = f"{path}.{os.getpid()}.tmp" if shared else path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        name = os.path.basename(path)
        kept = f"the previous {name} is intact" if os.path.exists(path) else "nothing was written"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip()
        raise UserError(f"cannot write {path}: {reason.splitlines()[0][:200]}; {kept}; free space "
                        f"on that disk, then run the same command again") from None
    os.replace(tmp, path)


def save_atomic(obj, path):
    import torch
    replace_atomically(path, lambda f: torch.save(obj, f))


def write_json(obj, path, shared=False):
    replace_atomically(path, lambda f: f.write(json.dumps(obj, indent=2).encode()), shared)


def read_json(path):
    """The JSON object in path (results.json, .lock); None when absent, unreadable or no object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def results_match(result, **expected):
    """Whether a results.json is the one expected: the keys whose value differs ([]: it matches).
    A run flag (seed) is read from its "args"; a checkpoint is the one recorded at the recorded
    path (written again there: the results are its old ones) or with the recorded content (its
    SHA-256: a run folder moved or copied elsewhere); None is not compared."""
    flags = result.get("args") if isinstance(result.get("args"), dict) else {}

    def holds(key, value):
        found = result.get(key, flags.get(key))
        if key != "checkpoint" or not isinstance(found, str):
            return found == value
        if os.path.realpath(found) == os.path.realpath(value):
            return True
        import clip_model  # torch: only a run checked against a checkpoint needs it
        recorded = result.get("checkpoint_sha256")
        return bool(recorded) and os.path.isfile(value) and clip_model.sha256(value) == recorded
    return [key for key, value in expected.items() if value is not None and not holds(key, value)]


def rewind_log(path, record):
    """log.jsonl of a resumed run: the lines of the epochs before the checkpoint's, then its record
    (what a crash appended after it, or cut short, is dropped)."""
    kept = []
    with open(path) if os.path.exists(path) else nullcontext([]) as lines:
        for line in lines:
            try:
                if json.loads(line)["epoch"] < record["epoch"]:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a crash while appending
    kept.append(json.dumps(record) + "\n")
    replace_atomically(path, lambda f: f.write("".join(kept).encode()))


def load_checkpoint(path):
    """A checkpoint dict written by train.py; anything else is a UserError saying what it is."""
    import torch

    import clip_model
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} not found")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a complete checkpoint ({os.path.getsize(path)} bytes, no zip "
                        f"directory: cut short by a crash, a full disk or a copy?); expected "
                        f"{CHECKPOINT_KINDS}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds pickled objects, which train.py's checkpoints never do (an "
                        f"authors' .pth.tar file?); expected {CHECKPOINT_KINDS}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0][:200]}); expected "
                        f"{CHECKPOINT_KINDS}") from None
    if not (isinstance(ckpt, dict) and {"model", "args", "epoch"} <= ckpt.keys()):
        raise UserError(f"{path}: not a checkpoint of train.py (no 'model', 'args' and 'epoch' "
                        f"entries; a bare state dict?); expected {CHECKPOINT_KINDS}")
    if not (isinstance(ckpt["args"], dict) and isinstance(ckpt["args"].get("method", ""), str)):
        raise UserError(f"{path}: its 'args' name no --method (not a dict, or a method that is "
                        f"no name: an edited file?); expected {CHECKPOINT_KINDS}")
    for state in (ckpt["model"], ckpt.get("best_model") or {}):  # the models, not the optimizer's
        clip_model.check_finite(state, path, UserError)
    return ckpt


def lock_holder():
    """This process as a lock names it: a pid is one process on its host and in its pid namespace
    (containers that share a host name may not share pids)."""
    namespace = os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else None
    return dict(host=socket.gethostname(), pidns=namespace, pid=os.getpid())


def holder_gone(holder):
    """Whether the process a lock names has ended: only its own host and pid namespace can tell."""
    here = lock_holder()
    if (holder.get("host"), holder.get("pidns")) != (here["host"], here["pidns"]):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, OverflowError):
        pass  # alive (another user's), or not a pid at all
    return False


def acquire_output_lock(folder):
    """folder/.lock (folder created if absent) naming this process, linked whole from a file it
    wrote first (atomic on NFS too). A lock whose process has ended (kill -9) is removed by the one
    process holding an flock on it; any other is refused. Then a *.tmp in the folder is a write an
    earlier run left unfinished, and goes. -> the lock's path."""
    os.makedirs(folder, exist_ok=True)
    path, me = os.path.join(folder, ".lock"), lock_holder()
    mine = f"{path}-{me['host']}-{me['pid']}"
    with open(mine, "w") as f:
        json.dump(dict(me, since=time.strftime("%Y-%m-%d %H:%M:%S")), f)
    try:
        for _ in range(10):
            with contextlib.suppress(FileExistsError):
                os.link(mine, path)
                for name in os.listdir(folder):
                    if name.endswith(".tmp"):
                        os.remove(os.path.join(folder, name))
                return path
            with contextlib.suppress(FileNotFoundError), open(path) as held:  # gone: link again
                fcntl.flock(held, fcntl.LOCK_EX)  # one judge at a time, of the file still at path
                if os.fstat(held.fileno()).st_ino != os.stat(path).st_ino:
                    continue
                holder = read_json(path) or {}
                if not holder_gone(holder):
                    who = (f"pid {holder.get('pid')} on host {holder.get('host')} since "
                           f"{holder.get('since')}" if holder else "an unreadable lock")
                    raise UserError(f"--output-dir {folder} is in use by another run ({who}): wait "
                                    f"for it, or choose another --output-dir; if that run is dead "
                                    f"(e.g. on another node), delete {path}")
                print(f"removing the stale lock {path} of pid {holder['pid']} (no longer running)")
                os.remove(path)
        raise UserError(f"--output-dir {folder}: could not take {path} (it kept changing); retry")
    finally:
        os.remove(mine)


def release_output_lock(path):
    """Remove the lock if it is still this process's."""
    if {key: (read_json(path) or {}).get(key) for key in ("host", "pidns", "pid")} == lock_holder():
        os.remove(path)
