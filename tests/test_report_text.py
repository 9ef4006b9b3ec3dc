"""Text that is not text (issue 30): reports and manifests in other encodings, reports of
control characters. Every input is written here, byte by byte."""
from __future__ import annotations

import codecs
import json

import pytest

from mmvae.data.io import load_report
from mmvae.data.manifest import group_cases, read_manifest
from mmvae.errors import InputError

GOOD = "Ring-enhancing lesion, left frontal. No midline shift."


def _manifest(tmp_path, report_bytes: bytes, name="report.txt"):
    (tmp_path / name).write_bytes(report_bytes)
    m = tmp_path / "manifest.jsonl"
    m.write_text(json.dumps({"case_id": "c042", "modality": "report", "path": name}) + "\n", encoding="utf-8")
    return group_cases(read_manifest(m))[0]


# ------------------------------------------------------------------ control characters
def test_report_of_nul_bytes_is_refused_naming_case_modality_and_file(tmp_path):
    case = _manifest(tmp_path, b"\x00" * 100)
    with pytest.raises(InputError) as e:
        case.read_report()
    msg = str(e.value)
    assert "case 'c042'" in msg and "modality 'report'" in msg and "report.txt" in msg
    assert "no readable text" in msg and "U+0000" in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["\x01\x02\x03 \x1b\x7f\n\t", "\ufffd\ufffd\ufffd", " \x00 \x00\x00 "])
def test_reports_without_a_printable_character_are_refused(tmp_path, text):
    p = tmp_path / "r.txt"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match="no readable text"):
        load_report(p)


def test_mostly_non_printable_report_is_refused(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text("Lesion" + "\x00\x07" * 10 + " in the left lobe.", encoding="utf-8")   # 20 of 41 characters
    with pytest.raises(InputError, match=r"not text: 20 of \d+ .*control") as e:
        load_report(p)
    assert "r.txt" in str(e.value)
    # a few stray control characters (at most 10 % of the non-blank characters) are accepted
    text = GOOD + "\x0c Second page.\x1b" + " Impression: abscess."    # a form feed and one escape
    p.write_text(text, encoding="utf-8")
    assert load_report(p) == text


def test_inline_manifest_report_of_control_characters_is_refused(tmp_path):
    m = tmp_path / "manifest.jsonl"
    m.write_text(json.dumps({"case_id": "c7", "modality": "report", "text": "\x00" * 40}) + "\n", encoding="utf-8")
    case = group_cases(read_manifest(m))[0]
    with pytest.raises(InputError, match=r"case 'c7', modality 'report'.*no readable text"):
        case.read_report()


# ------------------------------------------------------------------ encodings
@pytest.mark.parametrize("codec,bom", [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
                                       ("utf-32-le", codecs.BOM_UTF32_LE), ("utf-32-be", codecs.BOM_UTF32_BE)])
def test_report_with_a_utf16_or_utf32_byte_order_mark_is_read(tmp_path, codec, bom):
    p = tmp_path / "r.txt"
    p.write_bytes(bom + ("  " + GOOD + " Café, naïve.\r\n").encode(codec))
    assert load_report(p) == GOOD + " Café, naïve."


@pytest.mark.parametrize("codec,name", [("utf-16-le", "UTF-16 LE"), ("utf-16-be", "UTF-16 BE")])
def test_utf16_without_byte_order_mark_is_named(tmp_path, codec, name):
    case = _manifest(tmp_path, (GOOD + " Café.").encode(codec))
    with pytest.raises(InputError) as e:
        case.read_report()
    msg = str(e.value)
    assert "case 'c042'" in msg and "report.txt" in msg
    assert f"looks {name}" in msg and "re-save it as UTF-8" in msg and "\n" not in msg


def test_latin1_report_is_named(tmp_path):
    case = _manifest(tmp_path, ("Lésion frontale gauche, " * 3).encode("cp1252"))
    with pytest.raises(InputError) as e:
        case.read_report()
    msg = str(e.value)
    assert "not valid UTF-8" in msg and "byte 0xE9" in msg
    assert "Windows-1252" in msg and "re-save it as UTF-8" in msg and "case 'c042'" in msg


def test_binary_report_is_not_called_text(tmp_path):
    p = tmp_path / "scan.txt"
    p.write_bytes(bytes([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) + bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"scan.txt.*not valid UTF-8.*binary") as e:
        load_report(p)
    assert "UTF-16" not in str(e.value) and "Windows-1252" not in str(e.value)


# ------------------------------------------------------------------ manifests
def test_excel_csv_manifest_with_bom_is_read(tmp_path):
    (tmp_path / "r.txt").write_text(GOOD, encoding="utf-8")
    m = tmp_path / "manifest.csv"
    m.write_bytes(codecs.BOM_UTF8 + b"case_id,modality,path,label.class\r\nc1,report,r.txt,glioma\r\n")
    (e,) = read_manifest(m)
    assert e.case_id == "c1" and e.modality == "report" and e.labels == {"class": "glioma"}
    assert group_cases([e])[0].read_report() == GOOD


def test_jsonl_manifest_with_bom_is_read(tmp_path):
    m = tmp_path / "manifest.jsonl"
    m.write_bytes(codecs.BOM_UTF8 + json.dumps({"case_id": "c1", "modality": "report", "text": GOOD}).encode())
    assert [e.case_id for e in read_manifest(m)] == ["c1"]


def test_utf16_csv_manifest_is_read_or_named(tmp_path):
    rows = "case_id,modality,text\r\nc1,report,Lésion\r\n"
    m = tmp_path / "manifest.csv"
    m.write_bytes(codecs.BOM_UTF16_LE + rows.encode("utf-16-le"))      # Excel's "Unicode text"
    (e,) = read_manifest(m)
    assert (e.case_id, e.text) == ("c1", "Lésion")
    m.write_bytes(rows.encode("utf-16-le"))                            # no byte-order mark
    with pytest.raises(InputError, match=r"manifest.csv.*looks UTF-16 LE.*re-save it as UTF-8"):
        read_manifest(m)


def test_keyimages_labels_csv_with_bom_is_read(tmp_path):
    import numpy as np
    from PIL import Image
    from mmvae.data.scan import scan_folder_detailed
    root = tmp_path / "keyimages"
    for cid in ("c1", "c2"):
        (root / cid).mkdir(parents=True)
        Image.fromarray((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)).save(root / cid / "t2.png")
        (root / cid / "report.txt").write_text(GOOD, encoding="utf-8")
    (root / "labels.csv").write_bytes(codecs.BOM_UTF8 + b"case_id,class,age\r\nc1,glioma,61\r\nc2,abscess,40\r\n")
    res = scan_folder_detailed(root, "keyimages")
    labels = {e.case_id: e.labels for e in res.entries if e.labels}
    assert labels == {"c1": {"class": "glioma"}, "c2": {"class": "abscess"}}


def test_non_western_text_is_not_called_windows_1252(tmp_path):
    """cp1252 decodes almost any bytes: GBK-encoded Chinese must not be blamed on it."""
    p = tmp_path / "report.txt"
    p.write_bytes("脑部病变，水肿。右侧额叶见异常信号。".encode("gbk"))
    with pytest.raises(InputError, match="not valid UTF-8.*encoding is unknown") as e:
        load_report(p)
    assert "Windows-1252/Latin-1" not in str(e.value).split("not Western European")[0]


def test_trailing_nul_padding_and_one_stray_control_character_are_accepted(tmp_path):
    for i, text in enumerate(["Normal\x00\x00\x00\x00", "No acute\x1cinfarct."]):
        p = tmp_path / f"r{i}.txt"
        p.write_bytes(text.encode())
        assert load_report(p) == text
    p = tmp_path / "nul.txt"
    p.write_bytes(b"\x00" * 100)                    # all padding: still no readable text
    with pytest.raises(InputError, match="no readable text"):
        load_report(p)


def test_pacs_reports_csv_and_case_list_are_decoded_or_named(tmp_path):
    """The other text files a user hands over: PACS ingest's reports CSV and a case list."""
    from mmvae.data.dataset import read_case_list
    from mmvae.pacs.ingest import load_reports
    f = tmp_path / "reports.csv"
    f.write_bytes("key,report\nA1,Normal study\n".encode("utf-16"))          # with BOM: read
    assert load_reports(f) == {"A1": "Normal study"}
    f.write_bytes("key,report\nA1,Lésion\n".encode("utf-16-le"))             # no BOM: named
    with pytest.raises(InputError, match=r"reports.csv.*reports CSV looks UTF-16 LE"):
        load_reports(f)
    c = tmp_path / "cases.txt"
    c.write_bytes("case_id\nc1\nc2\n".encode("utf-16-le"))
    with pytest.raises(InputError, match=r"cases.txt.*case list looks UTF-16 LE"):
        read_case_list(c)
    c.write_bytes(b"\xef\xbb\xbfcase_id\nc1\n")
    assert read_case_list(c) == ["c1"]
