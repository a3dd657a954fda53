"""Text extraction per format, and the errors users see for files we cannot index."""

from __future__ import annotations

import pytest

from retrieval import CorruptFileError, ParseError, UnsupportedFileError, extract_text


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF, one line of Helvetica text per page, with a correct xref."""
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources "
                       f"<< /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def test_plain_text_is_kept_verbatim() -> None:
    doc = extract_text("Caf\u00e9 menu\r\n\r\nsoup  of the day\n".encode(), "menu.txt")
    assert doc == type(doc)("Caf\u00e9 menu\r\n\r\nsoup  of the day\n", "text")


def test_utf8_bom_is_dropped() -> None:
    assert extract_text(b"\xef\xbb\xbfhello", "a.txt").text == "hello"


def test_markdown_keeps_its_source_so_offsets_point_into_the_file() -> None:
    source = "# Title\n\nSome *emphasis* and a [link](http://x).\n"
    doc = extract_text(source.encode(), "README.md")
    assert (doc.text, doc.format) == (source, "markdown")
    assert extract_text(source.encode(), "notes.markdown").format == "markdown"


def test_unknown_extension_that_is_text_is_read_as_text() -> None:
    doc = extract_text(b"name,age\nada,36\n", "people.csv")
    assert (doc.text, doc.format) == ("name,age\nada,36\n", "text")


def test_html_drops_scripts_keeps_blocks_and_unescapes() -> None:
    page = (b"<html><head><title>T</title><style>p {color: red}</style>"
            b"<script>alert('x')</script></head><body><h1>Fish &amp; chips</h1>"
            b"<p>First   paragraph\nwraps.</p><ul><li>one</li><li>two&nbsp;items</li></ul>"
            b"<p>caf&eacute; <b>bold</b> end<br>next line</p></body></html>")
    doc = extract_text(page, "page.HTML")
    assert doc.format == "html"
    assert doc.text == ("T\n\nFish & chips\n\nFirst paragraph wraps.\n\none\n\ntwo items"
                        "\n\ncaf\u00e9 bold end\nnext line")


def test_html_honours_a_declared_charset() -> None:
    page = '<meta charset="iso-8859-1"><p>d\u00e9j\u00e0 vu</p>'.encode("latin-1")
    assert extract_text(page, "old.htm").text == "d\u00e9j\u00e0 vu"


def test_pdf_pages_are_joined_with_blank_lines() -> None:
    doc = extract_text(make_pdf(["Hello PDF world", "Second page"]), "report.pdf")
    assert (doc.text, doc.format) == ("Hello PDF world\n\nSecond page", "pdf")


def test_pdf_is_recognised_without_its_extension() -> None:
    assert extract_text(make_pdf(["Sniffed"]), "download").format == "pdf"


def test_unsupported_binary_file() -> None:
    with pytest.raises(UnsupportedFileError) as info:
        extract_text(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "photo.png")
    assert info.value.code == "unsupported_file"
    assert str(info.value).startswith("Could not parse photo.png: '.png' files are not "
                                      "supported")


def test_corrupt_pdf() -> None:
    with pytest.raises(CorruptFileError) as info:
        extract_text(b"%PDF-1.4\nthis is not really a pdf", "report.pdf")
    assert info.value.code == "invalid_file"
    assert str(info.value).startswith("Could not parse report.pdf: the PDF is corrupt (")


def test_pdf_without_text() -> None:
    with pytest.raises(CorruptFileError, match="no extractable text"):
        extract_text(make_pdf([""]), "scan.pdf")


@pytest.mark.parametrize("name", ["empty.txt", "blank.md", "empty.html", "x.json"])
def test_empty_files(name: str) -> None:
    with pytest.raises(CorruptFileError, match=f"Could not parse {name}: the file contains no "
                                               "extractable text"):
        extract_text(b" \n\t " if name != "empty.html" else b"<p> </p>", name)


def test_non_utf8_text() -> None:
    with pytest.raises(CorruptFileError) as info:
        extract_text(b"caf\xe9 au lait", "menu.txt")
    assert str(info.value) == ("Could not parse menu.txt: the file is not valid UTF-8 text "
                               "(invalid byte at position 3).")
    assert isinstance(info.value, ParseError) and isinstance(info.value, ValueError)


def test_non_utf8_bytes_with_unknown_extension_are_unsupported() -> None:
    with pytest.raises(UnsupportedFileError):
        extract_text(b"\x80\x81\xfa binary", "blob.bin")


def test_utf16_text_with_a_bom() -> None:
    assert extract_text("h\u00e9llo".encode("utf-16"), "win.txt").text == "h\u00e9llo"
