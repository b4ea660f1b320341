"""Capacity conditions reach clients as what they are: a full store or disk is a 503 with Retry-After and no
server path, whether a deploy or a cold start met it; any other failed start is a 500 without a path."""

from __future__ import annotations

import errno

import pytest

from sllmd.checkpoint.errors import ConversionError, StoreFull, as_store_full
from sllmd.control.deployments import _bad_checkpoint
from sllmd.errors import EngineFailed, InvalidRequest
from sllmd.worker.admission import start_failure

STORE_PATH = "/var/lib/sllmd/store/.m-1a2b.partial/data-00000.bin"


@pytest.mark.parametrize(("error", "expected"), [
    (StoreFull("checkpoint needs 2.00 GiB"), StoreFull),
    (OSError(errno.ENOSPC, "No space left on device", STORE_PATH), StoreFull),
    (OSError(errno.EDQUOT, "Disk quota exceeded", STORE_PATH), StoreFull),
    (OSError(errno.EACCES, "Permission denied", STORE_PATH), EngineFailed),
    (ConversionError("unsupported dtype F4"), EngineFailed),
])
def test_a_failed_start_is_a_503_for_capacity_and_never_shows_a_path(error, expected):
    answer = start_failure("m", error)
    assert type(answer) is expected
    assert STORE_PATH not in answer.message and "/var/lib" not in answer.message
    if expected is StoreFull:
        assert answer.status == 503 and answer.retry_after_s and answer.code == "store_full"
    else:
        assert answer.status == 500 and answer.message.startswith("model 'm' failed to start: ")


@pytest.mark.parametrize(("error", "status"), [
    (StoreFull("checkpoint needs 2.00 GiB"), 503),
    (OSError(errno.ENOSPC, "No space left on device", STORE_PATH), 503),
    (OSError(errno.EIO, "Input/output error", STORE_PATH), 400),
    (ConversionError("unsupported dtype F4"), 400),
])
def test_a_deploy_that_cannot_store_its_checkpoint_says_why_without_a_path(error, status):
    answer = _bad_checkpoint("/models/m", error)
    assert answer.status == status and STORE_PATH not in answer.message
    assert isinstance(answer, StoreFull if status == 503 else InvalidRequest)


def test_only_a_full_disk_is_a_capacity_condition():
    assert as_store_full(OSError(errno.ENOENT, "No such file or directory")) is None
    assert as_store_full(ValueError("x")) is None
