"""Turn an uploaded file's bytes into the plain text we chunk and index.

Offsets of chunks point into `Document.text`: for text and Markdown that is the file itself
(decoded), so a citation can be found in the original; for HTML and PDF it is the extracted
text. Failures raise a `ParseError` whose message is shown to the user as the vector-store
file's `last_error.message`, so it names the file and says what is wrong in plain words.
"""

from __future__ import annotations

import codecs
import io
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePosixPath

__all__ = ["CorruptFileError", "Document", "ParseError", "UnsupportedFileError", "extract_text"]

_MARKDOWN = frozenset({".md", ".markdown"})
_HTML = frozenset({".html", ".htm"})
_SUPPORTED = ".txt, .md, .markdown, .html, .htm, .pdf and other UTF-8 text files"


class ParseError(ValueError):
    """A file we cannot index; `code` is the OpenAI-style error code for `last_error`."""

    code = "invalid_file"

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"Could not parse {filename or 'the file'}: {reason}.")
        self.filename = filename
        self.reason = reason

    def __reduce__(self) -> tuple[type[ParseError], tuple[str, str]]:
        return type(self), (self.filename, self.reason)  # survives pickling (Celery)


class UnsupportedFileError(ParseError):
    """A file type we do not extract text from (images, archives, office documents...)."""

    code = "unsupported_file"


class CorruptFileError(ParseError):
    """A supported type whose content is broken, undecodable, or holds no text."""

    code = "invalid_file"


@dataclass(frozen=True)
class Document:
    """Extracted text and the format it came from: "text", "markdown", "html" or "pdf"."""

    text: str
    format: str


def extract_text(data: bytes, filename: str) -> Document:
    """The text of `data`, chosen by `filename`'s extension (sniffed when it is unknown)."""
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    if suffix == ".pdf":
        doc = Document(_pdf_text(data, filename), "pdf")
    elif suffix in _HTML:
        doc = Document(_html_text(_decode_html(data, filename)), "html")
    elif suffix in _MARKDOWN:
        doc = Document(_decode(data, filename), "markdown")
    elif suffix == ".txt":
        doc = Document(_decode(data, filename), "text")
    elif data.startswith(b"%PDF-"):
        doc = Document(_pdf_text(data, filename), "pdf")
    else:
        # Unknown extensions (.csv, .json, .py, none...) are fine when they are text.
        if not _looks_like_text(data):
            kind = f"'{suffix}' files" if suffix else "files of this type"
            raise UnsupportedFileError(
                filename, f"{kind} are not supported (supported: {_SUPPORTED})")
        doc = Document(_decode(data, filename), "text")
    if not doc.text.strip():
        raise CorruptFileError(filename, "the file contains no extractable text")
    return doc


def _looks_like_text(data: bytes) -> bool:
    """UTF-8 without NUL bytes; an unknown type is not guessed to be UTF-16."""
    if b"\x00" in data[:8192]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decode(data: bytes, filename: str) -> str:
    """UTF-8 (a BOM is dropped); UTF-16 only when a BOM says so. Nothing else is guessed."""
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            text = data.decode("utf-16")
        else:
            text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(
            filename, f"the file is not valid UTF-8 text (invalid byte at position {exc.start})"
        ) from None
    if "\x00" in text:
        raise CorruptFileError(filename, "the file contains binary data, not text")
    return text


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def _decode_html(data: bytes, filename: str) -> str:
    """UTF-8 unless the page declares another charset in a <meta> tag."""
    declared = _META_CHARSET.search(data[:4096])
    if declared:
        name = declared.group(1).decode("ascii")
        try:
            if codecs.lookup(name).name != "utf-8":
                return data.decode(name)
        except LookupError:
            pass
        except UnicodeDecodeError:
            raise CorruptFileError(
                filename, f"the page is not valid {name} text as it declares") from None
    return _decode(data, filename)


_BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "br", "caption", "dd", "details", "dialog",
    "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3",
    "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section",
    "summary", "table", "tbody", "thead", "tfoot", "title", "tr", "ul",
})
_SKIPPED_TAGS = frozenset({"script", "style", "noscript", "template"})
_CELL_TAGS = frozenset({"td", "th"})


class _HTMLText(HTMLParser):
    """Visible text with blocks on their own lines; whitespace collapsed outside <pre>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self._skip += 1
        elif tag == "pre":
            self._pre += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")
        elif tag in _CELL_TAGS:
            self.parts.append("\t")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))


def _html_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    lines = (line.strip(" \t") for line in "".join(parser.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _pdf_text(data: bytes, filename: str) -> str:
    # Imported here: pypdf is only needed by the ingestion worker.
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise CorruptFileError(filename, "the PDF is password-protected")
        pages = [page.extract_text() or "" for page in reader.pages]
    except ParseError:
        raise
    except (FileNotDecryptedError, DependencyError, NotImplementedError) as exc:
        raise CorruptFileError(filename, f"the PDF is encrypted ({exc})") from None
    except Exception as exc:  # pypdf raises many types (not only PdfReadError) on broken input
        detail = str(exc) or type(exc).__name__
        raise CorruptFileError(filename, f"the PDF is corrupt ({detail})") from None
    text = "\n\n".join(p.strip().replace("\x00", "") for p in pages if p.strip())
    if not text:
        raise CorruptFileError(
            filename, "the PDF has no extractable text (scanned pages are not supported)")
    return text
