"""Artifact files: paths kept inside the folder, tensors as whole buffers, codes bit-packed, atomic replace.

Example:
    >>> import torch
    >>> codes = torch.tensor([1, 2, 3, 0, 15, 7], dtype=torch.uint8)
    >>> pack_codes(codes, 4)
    b'!\\x03\\x7f\\x00'
    >>> unpack_codes(pack_codes(codes, 4), 4, 6).tolist()
    [1, 2, 3, 0, 15, 7]
"""
from __future__ import annotations

import contextlib

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from . import artifact_schema as S
from .artifact_schema import fail
from .errors import ArtifactError
from .qweight import PackedCodes

FORMAT = "fxquant-artifact"
ALIGN = 64                                   # every tensor starts at a multiple of 64 bytes in weights.bin
ENTRIES = frozenset(
    {"manifest.json", "weights.bin", "selftest.bin", "forward.py", "kernels", "kernels.txt", "parts"}
)
TENSOR_FILES = ("weights.bin", "selftest.bin")
_SEGMENT = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+\-]{0,199}\Z")


# ------------------------------------------------------------------------------------------- paths
def check_relpath(rel: object, where: str) -> str:
    """A relative path of at most 3 plain segments (no '..', no absolute path, no hidden names)."""
    if not isinstance(rel, str) or len(rel) > 400:
        raise fail(where, "a file entry is a relative path string")
    parts = rel.split("/")
    if len(parts) > 3 or not all(_SEGMENT.match(p) and ".." not in p for p in parts):
        raise fail(where, f"{rel[:80]!r} is not a plain relative path inside the artifact folder")
    return rel


def inside(root: Path, rel: str, where: str) -> Path:
    """root/rel after checking that no component is a symlink and that it resolves inside root."""
    path = root
    for part in rel.split("/"):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise ArtifactError(f"{root} is missing {rel}; the artifact is incomplete") from None
        if stat.S_ISLNK(mode):
            raise ArtifactError(
                f"{root}/{rel} is a symbolic link; artifacts hold regular files only "
                f"(a link could make fxquant read files outside the folder)"
            )
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise ArtifactError(f"{root}/{rel} is not a regular file: tampered artifact")
    if root.resolve() not in path.resolve().parents:
        raise fail(where, f"{rel!r} leaves the artifact folder")
    return path


def open_inside(root: Path, rel: str, where: str = "files") -> BinaryIO:
    """Open root/rel for reading without following a symlink (checked again at open time)."""
    path = inside(root, rel, where)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ArtifactError(f"cannot open {path}: {exc.strerror}") from None
    return os.fdopen(fd, "rb")


def sha256_file(root: Path, rel: str) -> str:
    h = hashlib.sha256()
    with open_inside(root, rel) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ tensors
def tensor_buffer(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as one buffer (no per-element Python work)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """b-bit codes -> a little-endian bit stream (8 codes fill `bits` bytes), vectorised."""
    flat = codes.detach().reshape(-1).cpu().numpy().astype(np.uint8, copy=False)
    padded = np.zeros(-(-flat.size // 8) * 8, dtype=np.uint8)
    padded[: flat.size] = flat
    if bits == 8:
        return padded.tobytes()
    if bits in (2, 4):
        per = 8 // bits
        g = padded.reshape(-1, per)
        out = np.zeros(g.shape[0], dtype=np.uint8)
        for i in range(per):
            out |= (g[:, i] & ((1 << bits) - 1)) << (bits * i)
        return out.tobytes()
    g = padded.reshape(-1, 8).astype(np.uint64)
    word = np.zeros(g.shape[0], dtype=np.uint64)
    for i in range(8):
        word |= g[:, i] << np.uint64(bits * i)
    return word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].tobytes()


def unpack_codes(data: bytes | memoryview | np.ndarray, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_codes: `numel` uint8 codes."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy(raw[:numel].copy())
    mask = (1 << bits) - 1
    if bits in (2, 4):
        per = 8 // bits
        out = np.empty((raw.size, per), dtype=np.uint8)
        for i in range(per):
            out[:, i] = (raw >> (bits * i)) & mask
        return torch.from_numpy(out.reshape(-1)[:numel].copy())
    b = np.zeros((raw.size // bits, 8), dtype=np.uint8)
    b[:, :bits] = raw[: raw.size // bits * bits].reshape(-1, bits)
    word = b.view("<u8").reshape(-1)
    out = np.empty((word.size, 8), dtype=np.uint8)
    for i in range(8):
        out[:, i] = (word >> np.uint64(bits * i)) & np.uint64(mask)
    return torch.from_numpy(out.reshape(-1)[:numel].copy())


def packed_nbytes(numel: int, bits: int | None, itemsize: int) -> int:
    return -(-numel // 8) * bits if bits else numel * itemsize


def write_tensor(blob: BinaryIO, offset: int, t: torch.Tensor, bits: int | None) -> tuple[int, int]:
    """Append `t` (bit-packed when `bits`) at the next aligned offset; returns (offset, nbytes)."""
    pad = (-offset) % ALIGN
    if pad:
        blob.write(b"\0" * pad)
        offset += pad
    data = pack_codes(t, bits) if bits else tensor_buffer(t)
    blob.write(data)
    return offset, len(data)


def read_blob(root: Path, rel: str, digest: str) -> torch.Tensor:
    """The whole of root/rel as one uint8 tensor (read at disk speed), checked against its sha256."""
    with open_inside(root, rel) as f:
        size = os.fstat(f.fileno()).st_size
        blob = torch.empty(size, dtype=torch.uint8)
        view = memoryview(blob.numpy())
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise ArtifactError(f"{root}/{rel} shrank while it was read; load it again")
            got += n
    if hashlib.sha256(view).hexdigest() != digest:
        raise ArtifactError(
            f"{root}/{rel} does not match its checksum in manifest.json: the file is corrupted or "
            f"was modified; re-save the artifact"
        )
    return blob


def tensor_from_blob(
    blob: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple, bits: int | None
) -> torch.Tensor:
    """One tensor (its own storage) from the checked bytes blob[offset:offset+nbytes]."""
    numel = 1
    for d in shape:
        numel *= d
    raw = blob[offset : offset + nbytes]
    if bits:
        return unpack_codes(raw.numpy(), bits, numel).view(shape)
    if dtype == torch.bfloat16:
        return raw.clone().view(torch.int16).view(torch.bfloat16).view(shape)
    return raw.clone().view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)


def load_tensors(directory: Path, table: Any, files: dict) -> dict[str, torch.Tensor | PackedCodes]:
    """Every tensor of the table, read from weights.bin / selftest.bin (each read once, hash-checked).

    Bit-packed [N, K] codes come back as PackedCodes over the bytes as read (views of the weights.bin
    buffer, see `unpin`); every other tensor has its own storage."""
    S.want_dict(table, "tensors", free_keys=True)
    specs = {}
    for name, spec in table.items():
        where = f"tensors.{S.dotted(name, 'tensors key')}"
        if isinstance(spec, dict) and "alias" in spec:
            S.want_dict(spec, where, required=("alias",))
            if (
                not isinstance(spec["alias"], str)
                or spec["alias"] not in specs
                or "alias" in specs[spec["alias"]]
            ):
                raise S.fail(
                    where, f"aliases {str(spec['alias'])[:80]!r}, which is not a tensor stored before it"
                )
            specs[name] = spec
            continue
        S.want_dict(spec, where, required=("dtype", "shape", "offset", "nbytes"), optional=("bits", "file"))
        file = S.want_enum(spec.get("file", "weights.bin"), TENSOR_FILES, f"{where}.file")
        if file not in files:
            raise S.fail(f"{where}.file", f"{file} is not listed in files")
        dtype, shape = S.dtype(spec["dtype"], f"{where}.dtype"), S.shape(spec["shape"], f"{where}.shape")
        bits = spec.get("bits")
        if bits is not None and (S.want_int(bits, f"{where}.bits", 2, 8) and dtype != torch.uint8):
            raise S.fail(f"{where}.bits", "only uint8 codes are bit-packed")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = packed_nbytes(math.prod(shape), bits, itemsize)
        offset = S.want_int(spec["offset"], f"{where}.offset", 0)
        if S.want_int(spec["nbytes"], f"{where}.nbytes", 0) != nbytes or offset % itemsize:
            raise S.fail(where, f"{list(shape)} {spec['dtype']} needs {nbytes} bytes at an aligned offset")
        specs[name] = dict(spec, dtype=dtype, shape=shape, nbytes=nbytes, offset=offset, file=file)
    out: dict[str, torch.Tensor] = {}
    for file in TENSOR_FILES:
        mine = {n: s for n, s in specs.items() if s.get("file") == file}
        if not mine:
            continue
        blob = read_blob(directory, file, files[file])
        if sum(s["nbytes"] for s in mine.values()) > blob.numel():
            raise S.fail("tensors", f"claim more bytes than {file} holds: truncated or tampered artifact")
        for name, s in mine.items():
            if s["offset"] + s["nbytes"] > blob.numel():
                raise S.fail(f"tensors.{name}", f"does not fit {file}: truncated or tampered artifact")
            if s.get("bits") and len(s["shape"]) == 2 and file == "weights.bin":
                # op codes stay the bit stream they were stored as (a view: no unpack, no re-pack)
                out[name] = PackedCodes(blob[s["offset"] : s["offset"] + s["nbytes"]], s["shape"], s["bits"])
                continue
            out[name] = tensor_from_blob(
                blob, s["offset"], s["nbytes"], s["dtype"], s["shape"], s.get("bits")
            )
        del blob
    for name, s in specs.items():
        if "alias" in s:
            out[name] = out[s["alias"]]
    return {name: out[name] for name in specs}


def plain(value: torch.Tensor | PackedCodes | None) -> torch.Tensor | None:
    """A tensor for every use but an op's codes (a bit-packed tensor named elsewhere is unpacked)."""
    return value.unpack().view(value.shape) if isinstance(value, PackedCodes) else value


def unpin(gm: torch.nn.Module, tensors: dict[str, Any]) -> None:
    """Ops whose codes are still views of the weights.bin buffer `load_tensors` read them from (`tensors`: its
    result; no kernel took the codes over: reference path, a tied embedding) get their own copy, so the whole
    file's buffer is not kept alive by them."""
    blob_ptrs = {t.data.untyped_storage().data_ptr() for t in tensors.values() if isinstance(t, PackedCodes)}
    copies: dict[int, PackedCodes] = {}          # ops sharing codes (tied weights) share the copy
    for mod in gm.modules():
        packed = mod.__dict__.get("_packed_codes")
        if isinstance(packed, PackedCodes) and packed.layout == "bits" and \
                packed.data.untyped_storage().data_ptr() in blob_ptrs:
            if id(packed) not in copies:
                copies[id(packed)] = PackedCodes(packed.data.clone(), packed.shape, packed.bits)
            mod._set_codes(copies[id(packed)])


# ------------------------------------------------------------------------------------------ folders
def is_artifact_dir(path: Path) -> bool:
    """True for an existing fxquant artifact folder that holds only artifact files."""
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        names = {p.name for p in path.iterdir()}
        if not names <= ENTRIES or "manifest.json" not in names:
            return False
        with open_inside(path, "manifest.json") as f:
            head = json.loads(f.read(64 << 20))
        return isinstance(head, dict) and head.get("format") == FORMAT
    except (OSError, ValueError, ArtifactError):
        return False


def check_destination(path: Path) -> None:
    """Refuse to replace anything but nothing, an empty folder, or an fxquant artifact."""
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise ArtifactError(f"{path} is a symbolic link; save to a real folder path")
    if not path.is_dir():
        raise ArtifactError(f"{path} exists and is a file; save the artifact to a new or empty folder")
    if any(path.iterdir()) and not is_artifact_dir(path):
        extra = sorted(p.name for p in path.iterdir() if p.name not in ENTRIES)
        what = f"it holds {extra[0]!r}" if extra else "its manifest.json is not an fxquant manifest"
        raise ArtifactError(
            f"{path} is a folder that is not an fxquant artifact ({what}); refusing to replace it. "
            f"Save to a new or empty folder"
        )


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")


def commit_dir(tmp: Path, final: Path, check=check_destination) -> None:
    """Move the finished folder `tmp` to `final`, replacing an old artifact there atomically.

    With renameat2 the old and new folders swap in one step; elsewhere the old one is renamed aside,
    the new one renamed in, and the old one deleted (a crash in between leaves both on disk).
    `check(final)` refuses destinations that may not be replaced (by default: anything but an artifact).
    """
    check(final)
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old artifact
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rename(final, aside / "old")
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside / "old", final)  # put the old artifact back
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(directory: Path, check=check_destination):
    """Yield a fresh folder beside `directory`; on success it replaces `directory` atomically (commit_dir),
    on any error it is deleted. Every artifact writer (module, submodules, Whisper bundle) saves through this.

    Example:
        >>> with staged_dir(Path("out/model")) as tmp:          # doctest: +SKIP
        ...     (tmp / "manifest.json").write_text("{}")
    """
    check(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        commit_dir(tmp, directory, check=check)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
