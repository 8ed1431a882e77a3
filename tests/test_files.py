"""Files written through a temporary name: a failed write leaves the previous file."""

import pytest


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    from mimkit.files import atomic_write, atomic_write_text

    path = atomic_write_text(tmp_path / "result.json", "old")

    def dies(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    atomic_write(path, lambda tmp: tmp.write_text("new"), sync=True)
    assert path.read_text() == "new"
