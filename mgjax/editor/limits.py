"""The editor's resource bounds: queued edits, stored uploads, free disk under --out_dir and open
event streams. Each refusal is one sentence with its HTTP status (429 for a full queue or too
many streams, 507 for a nearly full disk); /api/info shows the values."""

import dataclasses
import os
import shutil
import threading


@dataclasses.dataclass(frozen=True)
class Limits:
    max_queue: int = 16  # jobs waiting (the running one not counted)
    max_uploads: int = 64  # images and masks in the upload store
    upload_store_mb: int = 512  # their bytes
    min_free_disk_mb: int = 1024  # free space under --out_dir a new run needs
    max_event_streams: int = 32  # progress streams open at once (pages following jobs)

    def info(self) -> dict:
        return dataclasses.asdict(self)


class Refused(Exception):
    """A request refused for a bound: `status` and a one-sentence message."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def check_disk(folder: str, min_free_mb: int) -> None:
    """Refuse a new run when the disk under `folder` has less than min_free_mb free."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)  # the disk the folder will be made on
    free = shutil.disk_usage(existing).free / 2**20
    if free < min_free_mb:
        raise Refused(
            f"the disk under {folder} has {free:.0f} MB free, less than the {min_free_mb} MB a "
            "run needs (--min_free_disk_mb); free some space or choose another --out_dir",
            507,
        )


class Streams:
    """Counts open event streams; `open()` refuses past the bound."""

    def __init__(self, limit: int):
        self.limit, self.count, self.lock = limit, 0, threading.Lock()

    def open(self) -> None:
        with self.lock:
            if self.count >= self.limit:
                raise Refused(
                    f"{self.limit} progress streams are open already (--max_event_streams); "
                    "close other editor tabs and reload",
                    429,
                )
            self.count += 1

    def close(self) -> None:
        with self.lock:
            self.count -= 1
