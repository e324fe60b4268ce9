"""Every safetensors file goes through one header check that accepts nothing the safetensors
library refuses, and every write is durable: synced, renamed, synced, or gone without a trace."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from erasekit import checkpoints
from erasekit.errors import ModelFileError

W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}  # one 2-float tensor: 8 bytes of data


def _write(path, header, data=b"\0" * 8, length=None) -> str:
    """A safetensors file by hand: 8-byte little-endian header length, header bytes, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def _library_accepts(path: str) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
            f.metadata()
        return True
    except Exception:
        return False


def _nested(depth: int) -> bytes:
    return b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + b"[" * depth + b"]" * depth + b"}}"


MALFORMED = {  # name: (header, data, header length written) -- each one refused
    "truncated data": ({"w": {**W, "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None),
    "header length past the end": (b"{}", b"", 4096),
    "header length huge": (b"{}", b"", 2**63),
    "header length 1": (b"{", b"", None),
    "not JSON": (b"this is not json", b"", None),
    "JSON array": (b"[1, 2, 3]", b"", None),
    "JSON string": (b'"{}"', b"", None),
    "nested 200 deep": (_nested(200), b"\0" * 8, None),
    "nested 100000 deep (RecursionError)": (_nested(100_000), b"\0" * 8, None),
    "metadata value not text": ({"__metadata__": {"steps": 5}, "w": W}, b"\0" * 8, None),
    "metadata value an object": ({"__metadata__": {"x": {"y": "z"}}, "w": W}, b"\0" * 8, None),
    "metadata a list": ({"__metadata__": ["x"], "w": W}, b"\0" * 8, None),
    "unknown dtype": ({"w": {**W, "dtype": "F33"}}, b"\0" * 8, None),
    "lower-case dtype": ({"w": {**W, "dtype": "f32"}}, b"\0" * 8, None),
    "dtype a number": ({"w": {**W, "dtype": 7}}, b"\0" * 8, None),
    "negative shape": ({"w": {**W, "shape": [-2]}}, b"\0" * 8, None),
    "float shape": ({"w": {**W, "shape": [2.0]}}, b"\0" * 8, None),
    "boolean shape": ({"w": {**W, "shape": [True, 2]}}, b"\0" * 8, None),
    "shape not a list": ({"w": {**W, "shape": 2}}, b"\0" * 8, None),
    "shape overflowing before a zero": ({"w": {**W, "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}}, b"", None),
    "missing shape": ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8, None),
    "tensor entry a list": ({"w": [0, 8]}, b"\0" * 8, None),
    "offsets reversed": ({"w": {**W, "data_offsets": [8, 0]}}, b"\0" * 8, None),
    "offsets negative": ({"w": {**W, "data_offsets": [-8, 0]}}, b"\0" * 8, None),
    "offsets three": ({"w": {**W, "data_offsets": [0, 8, 8]}}, b"\0" * 8, None),
    "offsets past the end": ({"w": {**W, "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 12, None),
    "tensors overlapping": ({"w": W, "v": W}, b"\0" * 8, None),
    "gap before a tensor": ({"w": {**W, "data_offsets": [8, 16]}}, b"\0" * 16, None),
    "bytes after the last tensor": ({"w": W}, b"\0" * 12, None),
    "size mismatch": ({"w": {**W, "shape": [3]}}, b"\0" * 8, None),
    "4-bit tensor ending mid-byte": ({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0" * 2, None),
    "6-bit dtype no torch holds": ({"w": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, b"\0" * 3, None),
    "duplicate tensor key": (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                             b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8, None),
    "duplicate metadata key": (b'{"__metadata__": {"a": "1", "a": "2"}}', b"", None),
    "invalid UTF-8": (b'{"__metadata__": {"a": "\xff\xfe"}}', b"", None),
    "UTF-8-encoded surrogate": (b'{"__metadata__": {"a": "\xed\xa0\x80"}}', b"", None),
    "lone surrogate escape": (b'{"__metadata__": {"a": "\\ud800"}}', b"", None),
    "UTF-8 byte-order mark": (b'\xef\xbb\xbf{}', b"", None),
    "UTF-16 header": ('{"__metadata__": {"a": "b"}}'.encode("utf-16-le"), b"", None),
    "NaN literal": (b'{"__metadata__": {"a": "b"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], '
                    b'"x": NaN}}', b"\0" * 8, None),
    "control character in a string": (b'{"__metadata__": {"a": "b\x01"}}', b"", None),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_header_is_refused_with_a_sentence(tmp_path, case):
    header, data, length = MALFORMED[case]
    path = _write(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(ModelFileError) as err:
        checkpoints.read_header(path)
    msg = str(err.value)
    assert "bad.safetensors" in msg and "not a valid safetensors file" in msg and "\n" not in msg
    with pytest.raises(ModelFileError):  # the loader every weights file goes through
        checkpoints.load_file(path)


@pytest.mark.parametrize("data", [b"", b"\x05\0\0"], ids=["empty file", "shorter than 8 bytes"])
def test_a_file_without_a_header_length_is_refused(tmp_path, data):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    assert not _library_accepts(str(path))
    with pytest.raises(ModelFileError, match="bad.safetensors' is not a valid safetensors file"):
        checkpoints.read_header(str(path))


@pytest.mark.parametrize("case", MALFORMED)
def test_the_reader_accepts_nothing_the_library_refuses(tmp_path, case):
    """The library's verdict on each malformed file, next to ours: where it refuses, we refuse."""
    header, data, length = MALFORMED[case]
    path = _write(tmp_path / "bad.safetensors", header, data, length)
    library = _library_accepts(path)
    try:
        checkpoints.read_header(path)
        ours = True
    except ModelFileError:
        ours = False
    assert library or not ours, f"{case}: the library refuses it, our reader accepts it"
    # the cases are real: the library refuses each, but duplicate keys (it keeps the last one silently)
    assert not library or case.startswith("duplicate"), f"{case}: the library accepts it"


ODD_BUT_VALID = {  # files the library accepts: so do we, with the same shapes
    "no tensors": (b"{}", b""),
    "null metadata": ({"__metadata__": None, "w": W}, b"\0" * 8),
    "metadata only": ({"__metadata__": {"a": "b"}}, b""),
    "scalar": ({"w": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, b"\0" * 4),
    "zero elements": ({"e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [0, 0]}, "w": W}, b"\0" * 8),
    "padded header": (json.dumps({"w": W}).encode() + b"        ", b"\0" * 8),
    "unknown field in an entry": ({"w": {**W, "note": [1, {"a": 2}]}}, b"\0" * 8),
    "several dtypes": ({"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]},
                        "h": {"dtype": "BF16", "shape": [1], "data_offsets": [2, 4]},
                        "q": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8),
    "4-bit pairs": ({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2),
    "paired surrogate escape": (b'{"__metadata__": {"a": "\\ud83d\\ude00"}}', b""),
}


@pytest.mark.parametrize("case", ODD_BUT_VALID)
def test_odd_but_valid_files_are_read_like_the_library_reads_them(tmp_path, case):
    header, data = ODD_BUT_VALID[case]
    path = _write(tmp_path / "ok.safetensors", header, data)
    assert _library_accepts(path)
    shapes, metadata = checkpoints.read_header(path)
    with safe_open(path, framework="pt") as f:
        assert shapes == {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        assert metadata == (f.metadata() or {})
    if case == "several dtypes":
        tensors, _ = checkpoints.load_file(path)
        assert tensors["b"].dtype == torch.bool and tensors["q"].shape == (4,)


# ----------------------------------------------------------------------------- durable writes


def test_a_write_interrupted_midway_leaves_no_temp_file_and_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "lora.safetensors"
    checkpoints.save_file_atomic({"w": torch.zeros(2)}, str(target))

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_file_atomic({"w": torch.ones(2)}, str(target))
    assert os.listdir(tmp_path) == ["lora.safetensors"]
    assert torch.equal(checkpoints.load_file(str(target))[0]["w"], torch.zeros(2))


def test_the_file_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_ino, os.path.exists(tmp_path / "card.md")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = checkpoints.write_text_atomic("# card\n", str(tmp_path / "card.md"))
    assert synced == [(os.stat(path).st_ino, False), (os.stat(tmp_path).st_ino, True)]
    # where a folder cannot be opened (Windows), the file is still written and synced
    synced.clear()
    real_open = os.open

    def no_folders(p, flags, *args):
        if os.path.isdir(p):
            raise PermissionError(13, "Access is denied")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", no_folders)
    checkpoints.write_text_atomic("# card 2\n", path)
    assert len(synced) == 1 and open(path).read() == "# card 2\n"


def test_a_failed_sync_is_a_failed_write(tmp_path, monkeypatch):
    target = tmp_path / "w.safetensors"
    checkpoints.save_file_atomic({"w": torch.zeros(2)}, str(target))

    def broken_disk(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_disk)
    with pytest.raises(ModelFileError, match=r"Could not write '.*w.safetensors' \(Input/output error\)"):
        checkpoints.save_file_atomic({"w": torch.ones(2)}, str(target))
    assert os.listdir(tmp_path) == ["w.safetensors"]
    monkeypatch.undo()
    assert torch.equal(checkpoints.load_file(str(target))[0]["w"], torch.zeros(2))


def test_written_files_follow_the_umask_not_safetensors_0600(tmp_path):
    """safetensors creates its files readable by their owner only; a LoRA for a ComfyUI under another
    account must be readable as any other file this process writes (0666 minus the umask)."""
    import os
    import stat

    import torch

    from erasekit.checkpoints import _umask, save_file_atomic

    path = save_file_atomic({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()
    old = os.umask(0o022)
    os.umask(old)
    assert _umask() == old  # read from /proc, unchanged
