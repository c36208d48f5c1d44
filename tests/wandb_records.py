"""Read an offline W&B run back from its binary `run-*.wandb` log.

Offline runs keep no summary JSON; the log is LevelDB's record format (32 KiB blocks, 7-byte record
headers: crc32c, little-endian length, type) after a 7-byte ":W&B" file header, and each record is a
`wandb_internal_pb2.Record`. Parsing it here checks what W&B really received.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        elif kind == 0 and length == 0:
            continue
        else:
            raise ValueError(f"unknown record type {kind} at byte {pos}")


def read_run(run_dir: Path) -> dict:
    """{"id", "name", "group", "job_type", "tags", "config", "history": [row, ...], "summary": {...}, "exit_code"}."""
    logs = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, f"expected one offline W&B run under {run_dir}, found {logs}"
    run = {"history": [], "summary": {}, "exit_code": None}
    for payload in _payloads(logs[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, name=r.display_name, group=r.run_group, job_type=r.job_type, tags=list(r.tags))
            run["config"] = {item.key: json.loads(item.value_json) for item in r.config.update}
        elif kind == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            run["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run
