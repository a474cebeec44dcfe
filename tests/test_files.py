import os

import pytest

from early_exit.files import write_atomic, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    write_text(target, "old")

    def fail_halfway(file):
        file.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, fail_halfway)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]
    write_text(target, "new")
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) != oct(0o600)
