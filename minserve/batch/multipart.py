"""A streaming multipart/form-data reader for uploads (RFC 7578): fed the body chunk by chunk,
it writes the file part straight to disk and keeps the small text fields, so an upload never sits
in memory whole. Every size is bounded; anything malformed is a MultipartError (a 400)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import BinaryIO

MAX_HEADER_BYTES = 16 * 1024
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{1,70}")
_PARAM = re.compile(r';\s*([a-zA-Z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    pass


class FileTooLarge(MultipartError):
    pass


def boundary_of(content_type: bytes) -> bytes:
    """The boundary parameter of a multipart/form-data Content-Type."""
    ctype, _, params = content_type.decode("latin-1").partition(";")
    if ctype.strip().lower() != "multipart/form-data":
        raise MultipartError("Content-Type must be multipart/form-data")
    boundary = _params(params).get("boundary", "").encode("latin-1")
    if not _BOUNDARY.fullmatch(boundary) or boundary.endswith(b" "):
        raise MultipartError("multipart/form-data needs a valid boundary parameter")
    return boundary


def _params(text: str) -> dict[str, str]:
    """'; name="a b"; filename=x' -> {"name": "a b", "filename": "x"}."""
    return {k.lower(): _unquote(v) for k, v in _PARAM.findall(";" + text)}


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None      # set when the file part was present
    file_bytes: int = 0


class MultipartReader:
    """reader = MultipartReader(boundary, file_field="file", out=open(tmp, "wb"),
    max_file_bytes=N); reader.feed(chunk) ...; upload = reader.close()."""

    def __init__(self, boundary: bytes, file_field: str, out: BinaryIO,
                 max_file_bytes: int) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.file_field = file_field
        self.out = out
        self.max_file_bytes = max_file_bytes
        self.upload = Upload()
        # prepend CRLF so the first boundary looks like every other delimiter
        self._buf = bytearray(b"\r\n")
        self._state = "preamble"      # preamble -> after_delim -> headers -> body -> ... -> end
        self._part: str | None = None   # the current part's field name
        self._is_file = False
        self._value = bytearray()
        self._num_parts = 0

    def feed(self, data: bytes) -> None:
        self._buf += data
        while self._step():
            pass

    def close(self) -> Upload:
        if self._state != "end":
            raise MultipartError("the multipart body ended before its closing boundary")
        return self.upload

    def _step(self) -> bool:
        """Consume what the buffer allows; False when more data is needed."""
        buf = self._buf
        if self._state == "preamble":
            at = buf.find(self.delimiter)
            if at < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MultipartError("no multipart boundary found")
                return False
            del buf[:at + len(self.delimiter)]
            self._state = "after_delim"
            return True
        if self._state == "after_delim":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = "end"
                buf.clear()             # an epilogue is ignored
                return False
            if buf[:2] != b"\r\n":
                raise MultipartError("malformed multipart boundary line")
            del buf[:2]
            self._state = "headers"
            return True
        if self._state == "headers":
            at = buf.find(b"\r\n\r\n")
            if at < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise MultipartError("multipart part headers are too long")
                return False
            self._start_part(bytes(buf[:at]))
            del buf[:at + 4]
            self._state = "body"
            return True
        if self._state == "body":
            at = buf.find(self.delimiter)
            if at < 0:
                # keep what could be the start of a delimiter split across chunks
                keep = len(self.delimiter) - 1
                if len(buf) > keep:
                    self._write(bytes(buf[:len(buf) - keep]))
                    del buf[:len(buf) - keep]
                return False
            self._write(bytes(buf[:at]))
            del buf[:at + len(self.delimiter)]
            self._end_part()
            self._state = "after_delim"
            return True
        if self._state == "end":
            buf.clear()
        return False

    def _start_part(self, raw: bytes) -> None:
        self._num_parts += 1
        if self._num_parts > MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} multipart parts")
        disposition = None
        for line in raw.decode("utf-8", errors="replace").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value
        if disposition is None:
            raise MultipartError("a multipart part has no Content-Disposition header")
        kind, _, params = disposition.partition(";")
        found = _params(params)
        if kind.strip().lower() != "form-data" or "name" not in found:
            raise MultipartError("a multipart part must be form-data with a name")
        self._part = found["name"]
        self._is_file = self._part == self.file_field
        if self._is_file:
            if self.upload.filename is not None:
                raise MultipartError(f"more than one {self.file_field!r} part")
            self.upload.filename = found.get("filename") or "upload.jsonl"
        elif self._part in self.upload.fields:
            raise MultipartError(f"the field {self._part!r} is given twice")
        self._value.clear()

    def _write(self, data: bytes) -> None:
        if not data:
            return
        if self._is_file:
            self.upload.file_bytes += len(data)
            if self.upload.file_bytes > self.max_file_bytes:
                raise FileTooLarge(f"the file is larger than the limit of "
                                   f"{self.max_file_bytes} bytes")
            self.out.write(data)
        else:
            self._value += data
            if len(self._value) > MAX_FIELD_BYTES:
                raise MultipartError(f"the field {self._part!r} is too long")

    def _end_part(self) -> None:
        if not self._is_file:
            try:
                self.upload.fields[self._part] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise MultipartError(f"the field {self._part!r} is not UTF-8") from None
        self._part, self._is_file = None, False
