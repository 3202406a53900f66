"""Tests of node addresses (`dstfs.uri`): NBD URIs as nbd-uri.md defines
them, local paths, the `URI,size=SECTORS` node syntax, and `parse_size`.

Tables map text to the complete `NodeSpec` it must parse into, and bad text
to the `ValueError` message that must explain it.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dstfs.uri import NodeSpec, parse_node, parse_size, parse_uri


def nbd(uri: str, host: str, port: int = 10809, export: str = "") -> NodeSpec:
    return NodeSpec(kind="nbd", uri=uri, host=host, port=port, export=export)


def unix(uri: str, socket: str, export: str = "") -> NodeSpec:
    return NodeSpec(kind="nbd+unix", uri=uri, socket=socket, export=export)


def tls(spec: NodeSpec, **kw: object) -> NodeSpec:
    fields = {f"tls_{k}": v for k, v in kw.items()}
    return attrs.evolve(spec, tls=True, **fields)


def file(uri: str, path: str) -> NodeSpec:
    return NodeSpec(kind="file", uri=uri, path=path)


URIS = [
    ("nbd://example.com", nbd("nbd://example.com", "example.com")),
    ("nbd://example.com/", nbd("nbd://example.com/", "example.com")),
    ("nbd://example.com/disk", nbd("nbd://example.com/disk", "example.com", export="disk")),
    ("nbd://host:10810/export", nbd("nbd://host:10810/export", "host", 10810, "export")),
    ("nbd://192.0.2.7:1/e", nbd("nbd://192.0.2.7:1/e", "192.0.2.7", 1, "e")),
    ("nbd://[::1]:10810", nbd("nbd://[::1]:10810", "::1", 10810)),
    ("nbd://[fe80::1]/disk", nbd("nbd://[fe80::1]/disk", "fe80::1", export="disk")),
    ("nbd://h/hello%20world", nbd("nbd://h/hello%20world", "h", export="hello world")),
    ("nbd://h//disk", nbd("nbd://h//disk", "h", export="/disk")),
    ("nbd://h/a%2Cb", nbd("nbd://h/a%2Cb", "h", export="a,b")),
    ("nbd://user@h:2/e", nbd("nbd://user@h:2/e", "h", 2, "e")),
    ("nbd://h:/e", nbd("nbd://h:/e", "h", export="e")),
    ("NBD://Example.COM/Disk", nbd("NBD://Example.COM/Disk", "example.com", export="Disk")),
    ("  nbd://h/e\t", nbd("nbd://h/e", "h", export="e")),
    ("nbd+unix:///exp?socket=/tmp/s", unix("nbd+unix:///exp?socket=/tmp/s", "/tmp/s", "exp")),
    ("nbd+unix:///disk?socket=sock", unix("nbd+unix:///disk?socket=sock", "sock", "disk")),
    ("nbd+unix:///?socket=%00/abstract", unix("nbd+unix:///?socket=%00/abstract", "\x00/abstract")),
    ("nbds://h/e", tls(nbd("nbds://h/e", "h", export="e"))),
    ("NBDS://h:7/e", tls(nbd("NBDS://h:7/e", "h", 7, "e"))),
    (
        "nbds://h/e?tls-certificates=/etc/pki/x&tls-verify-peer=false",
        tls(
            nbd("nbds://h/e?tls-certificates=/etc/pki/x&tls-verify-peer=false", "h", export="e"),
            certificates="/etc/pki/x",
            verify=False,
        ),
    ),
    (
        "nbds://[::1]/?tls-verify-peer=1&tls-type=X509&tls-hostname=srv.example",
        tls(
            nbd("nbds://[::1]/?tls-verify-peer=1&tls-type=X509&tls-hostname=srv.example", "::1"),
            hostname="srv.example",
        ),
    ),
    (
        "nbds+unix:///e?socket=/s&tls-certificates=/c%2Cd",
        tls(
            unix("nbds+unix:///e?socket=/s&tls-certificates=/c%2Cd", "/s", "e"),
            certificates="/c,d",
        ),
    ),
    ("file:///path/disk.img", file("file:///path/disk.img", "/path/disk.img")),
    ("file://localhost/var/my%20disk", file("file://localhost/var/my%20disk", "/var/my disk")),
    ("/dev/sdb", file("file:///dev/sdb", "/dev/sdb")),
    ("/tmp/my disk.img", file("file:///tmp/my%20disk.img", "/tmp/my disk.img")),
    ("/tmp/a,b", file("file:///tmp/a%2Cb", "/tmp/a,b")),
    ("/srv/../srv/x", file("file:///srv/x", "/srv/x")),
]


@pytest.mark.parametrize(("text", "spec"), URIS)
def test_parse_uri(text: str, spec: NodeSpec) -> None:
    assert parse_uri(text) == spec


@pytest.mark.parametrize("text", ["disk.img", "./disk.img", "sub/../disk.img"])
def test_relative_path_is_made_absolute(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = os.path.join(os.getcwd(), "disk.img")
    assert parse_uri(text) == file("file://" + urllib.parse.quote(path), path)


NODES = [
    ("nbd://h/e", nbd("nbd://h/e", "h", export="e")),
    ("nbd://h/e,size=100", nbd("nbd://h/e", "h", export="e").with_size(100)),
    ("nbd://h/e size=100", nbd("nbd://h/e", "h", export="e").with_size(100)),
    ("nbd://h/e, size=100 ", nbd("nbd://h/e", "h", export="e").with_size(100)),
    ("/dev/sdb,size=2048", file("file:///dev/sdb", "/dev/sdb").with_size(2048)),
    ("nbd+unix:///e?socket=/s size=8", unix("nbd+unix:///e?socket=/s", "/s", "e").with_size(8)),
]


@pytest.mark.parametrize(("text", "spec"), NODES)
def test_parse_node(text: str, spec: NodeSpec) -> None:
    assert parse_node(text) == spec


BAD_URIS = [
    ("", "empty"),
    ("   ", "empty"),
    ("nbd://h/a\x00b", "control character"),
    ("http://example.com/disk", "unknown scheme 'http'"),
    ("ftp:///x", "unknown scheme 'ftp'"),
    ("nbd+unix:///exp", "need ?socket=PATH"),
    ("nbd+unix:///exp?socket=", "need ?socket=PATH"),
    ("nbd+unix://host/exp?socket=/s", "take no host"),
    ("nbd:///exp", "need a host"),
    ("nbd://user@/exp", "need a host"),
    ("nbd://h:abc/", "bad port"),
    ("nbd://h:65536/", "bad port"),
    ("nbd://h:0/", "port out of range"),
    ("nbds+unix:///e", "nbds+unix URIs need ?socket=PATH"),
    ("nbd://h/e?tls-certificates=/c", "tls-certificates needs a TLS URI (nbds://"),
    ("nbd+unix:///e?socket=/s&tls-verify-peer=0", "tls-verify-peer needs a TLS URI"),
    ("nbds://h/e?tls-certificates=rel/dir", "tls-certificates needs an absolute directory"),
    ("nbds://h/e?tls-verify-peer=maybe", "tls-verify-peer is true or false, not 'maybe'"),
    ("nbds://h/e?tls-type=psk", "tls-type 'psk' (only x509 is supported)"),
    ("nbds://h/e?tls-hostname=", "empty tls-hostname"),
    ("nbds://h/e?tls-verify-peer=0&tls-verify-peer=1", "'tls-verify-peer' given twice"),
    ("nbds://h/e?tls-psk-file=/k", "unsupported URI parameter 'tls-psk-file'"),
    ("example.com:10809", "not a URI"),
    ("file://otherhost/p", "local path"),
    ("nbd://h/" + "x" * 4097, "longer than 4096 bytes"),
]


@pytest.mark.parametrize(("text", "message"), BAD_URIS)
def test_bad_uri_is_a_value_error_that_says_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_uri(text)
    if message not in ("empty", "control character"):
        assert repr(text.strip())[:40] in str(info.value)  # names what was wrong


BAD_NODES = [
    ("nbd://h/e,size=0", "positive number of sectors, not '0'"),
    ("nbd://h/e,size=abc", "positive number of sectors, not 'abc'"),
    ("nbd://h/e size=-5", "positive number of sectors, not '-5'"),
    ("nbd://h/e,size=", "positive number of sectors"),
    ("nbd://h/e,foo=1", "unknown node option 'foo=1' (only size=SECTORS)"),
    ("nbd://h/e,size", "unknown node option 'size'"),
    ("nbd://h/e 100", "unknown node option '100'"),
    ("http://h/e,size=8", "unknown scheme 'http'"),
    (",size=8", "empty"),
]


@pytest.mark.parametrize(("text", "message"), BAD_NODES)
def test_bad_node_is_a_value_error_that_says_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_node(text)


@pytest.mark.parametrize(
    "text", ["nbd://h/e?foo=1", "nbd://h/e?socket=/s", "nbd://h/e?tls-type=x509"]
)
def test_unknown_query_parameter_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"foo|socket|tls-type"):
        parse_uri(text)


DESCRIBE = [
    ("nbd://h:1/e", "R: h:1"),
    ("nbd://example.com", "R: example.com:10809"),
    ("nbd://[::1]:10810", "R: [::1]:10810"),
    ("nbd+unix:///e?socket=/tmp/s", "R: unix:/tmp/s"),
    ("/dev/sdb", "L: /dev/sdb"),
    ("file:///p%20q", "L: /p q"),
]


@pytest.mark.parametrize(("text", "described"), DESCRIBE)
def test_describe(text: str, described: str) -> None:
    spec = parse_uri(text)
    assert spec.describe() == described
    assert spec.is_remote is described.startswith("R: ")


@pytest.mark.parametrize("text", [t for t, _ in URIS] + [t for t, _ in NODES])
def test_to_text_round_trips_through_parse_node(text: str) -> None:
    spec = parse_node(text) if "size=" in text else parse_uri(text)
    for sized in (spec, spec.with_size(4096)):
        assert parse_node(sized.to_text()) == sized


def test_to_text_appends_the_size() -> None:
    assert parse_node("nbd://h/e size=100").to_text() == "nbd://h/e,size=100"
    assert parse_uri("/dev/sdb").to_text() == "file:///dev/sdb"


@pytest.mark.parametrize("text", ["nbd://h/a,b", "nbd+unix:///e?socket=/tmp/a,b"])
def test_to_text_round_trips_a_raw_comma(text: str) -> None:
    spec = parse_uri(text)
    assert parse_node(spec.to_text()) == spec


EXPORTS = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)


@given(export=EXPORTS, size=st.none() | st.integers(1, 2**40))
def test_any_percent_encoded_export_round_trips(export: str, size: int | None) -> None:
    spec = parse_uri("nbd://h:7/" + urllib.parse.quote(export, safe="")).with_size(size)
    assert spec.export == export
    assert parse_node(spec.to_text()) == spec


NAMES = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00\n/"), min_size=1, max_size=40
)


@given(name=NAMES)
def test_any_absolute_path_round_trips(name: str) -> None:
    spec = parse_uri("/tmp/" + name)
    assert spec.kind == "file" and spec.path == os.path.abspath(("/tmp/" + name).strip())
    assert parse_node(spec.to_text()) == spec


def test_path_with_non_utf8_bytes_round_trips() -> None:
    path = os.fsdecode(b"/tmp/disk-\xff.img")
    spec = parse_uri(path)
    assert spec.path == path
    assert parse_node(spec.to_text()) == spec


SIZES = [
    ("4096", 4096),
    ("64K", 64 << 10),
    ("512M", 512 << 20),
    ("1G", 1 << 30),
    ("2T", 2 << 40),
    ("2g", 2 << 30),
    ("1KiB", 1 << 10),
    ("16MB", 16 << 20),
    (" 8k ", 8 << 10),
]


@pytest.mark.parametrize(("text", "value"), SIZES)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "bad size"),
        ("abc", "bad size 'abc'"),
        ("1.5G", "bad size"),
        ("-1", "bad size"),
        ("K", "bad size"),
        ("G1", "bad size"),
        ("1 G", "bad size"),
        ("0", "positive"),
        ("0K", "positive"),
    ],
)
def test_parse_size_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(text)
