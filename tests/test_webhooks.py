"""Webhook URLs: public http(s) addresses only, checked at submission and again at send time."""

from __future__ import annotations

import ipaddress
import socket
import threading
import uuid
from contextlib import nullcontext, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from celery.exceptions import Retry

from app.jobs.service import Webhook
from app.webhooks import (
    SIGNATURE_HEADER,
    IPNetwork,
    WebhookRefused,
    WebhookUnresolved,
    check_url,
    verify,
)
from workers import tasks
from workers.tasks import deliver_webhook

PUBLIC = "93.184.215.14"


def resolving(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> None:
    """Names resolve by `table` (literal addresses as themselves), with no DNS."""

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        addresses = table.get(host)
        if addresses is None:
            try:
                addresses = [str(ipaddress.ip_address(host))]
            except ValueError:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8000/hook", "loopback"),
        ("http://127.8.9.10/", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://10.1.2.3/", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://[fc00::1]/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "reserved"),
        ("http://100.64.0.1/", "non-public"),
        ("http://[64:ff9b::7f00:1]/", "loopback"),  # NAT64 of 127.0.0.1
        ("http://[2002:a00:1::]/", "private"),  # 6to4 of 10.0.0.1
        ("http://localhost:9000/", "loopback"),
        ("https://intranet.example.com/", "private"),
        ("https://mixed.example.com/", "private"),  # one bad address among good ones is enough
        ("ftp://hooks.example.com/", "http or https"),
        ("http://user:secret@hooks.example.com/", "user info"),
        ("http:///hook", "host"),
        ("https://nowhere.invalid/", "does not resolve"),
    ],
)
def test_refused_urls(monkeypatch: pytest.MonkeyPatch, url: str, reason: str) -> None:
    resolving(
        monkeypatch,
        {
            "localhost": ["127.0.0.1", "::1"],
            "intranet.example.com": ["10.0.0.7"],
            "mixed.example.com": [PUBLIC, "192.168.0.2"],
            "hooks.example.com": [PUBLIC],
        },
    )
    with pytest.raises(WebhookRefused, match=reason) as refused:
        check_url(url)
    assert "10.0.0.7" not in str(refused.value)  # no internal address in what users see


def test_localhost_resolves_to_loopback_for_real() -> None:
    with pytest.raises(WebhookRefused, match="loopback"):
        check_url("http://localhost/")


def test_an_unknown_name_is_unresolved(monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {})
    with pytest.raises(WebhookUnresolved):
        check_url("https://hooks.example.com/")


def test_public_addresses_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(
        monkeypatch, {"hooks.example.com": [PUBLIC, "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]}
    )
    url, addresses = check_url("https://hooks.example.com/kma?x=1")
    assert url.host == "hooks.example.com"
    assert [str(a) for a in addresses] == [PUBLIC, "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    check_url("http://8.8.8.8:8080/")


def test_allowed_networks_let_their_addresses_through(monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"hooks.internal": ["10.20.1.5"]})
    allow: list[IPNetwork] = [
        ipaddress.IPv4Network("127.0.0.0/8"),
        ipaddress.IPv4Network("10.20.0.0/16"),
    ]
    check_url("http://127.0.0.1:8000/hook", allow)
    check_url("http://[::ffff:127.0.0.1]/", allow)
    check_url("http://hooks.internal/", allow)
    with pytest.raises(WebhookRefused, match="private"):
        check_url("http://10.21.0.1/", allow)
    with pytest.raises(WebhookRefused, match="loopback"):
        check_url("http://[::1]/", allow)  # IPv6 loopback is not in 127.0.0.0/8


# --- sending --------------------------------------------------------------------------------------


class Hook:
    """An httpx transport that records every request and answers `status`."""

    def __init__(self, status: int = 204, headers: dict[str, str] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.answer)
        self.status, self.headers = status, headers or {}

    def answer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, headers=self.headers)


def test_delivery_goes_to_the_address_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"hooks.example.com": [PUBLIC]})
    hook = Hook()
    deliver_webhook(
        "https://hooks.example.com:8443/kma", b'{"a": 1}', "k", transport=hook.transport
    )
    (request,) = hook.requests
    assert str(request.url) == f"https://{PUBLIC}:8443/kma"
    assert request.headers["Host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert verify(request.content, request.headers[SIGNATURE_HEADER], "k")


def test_delivery_to_an_allowed_local_receiver() -> None:
    received: list[tuple[str | None, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers["Host"], body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        deliver_webhook(url, b"{}", "k", [ipaddress.IPv4Network("127.0.0.0/8")])
    finally:
        server.shutdown()
    assert received == [(f"127.0.0.1:{server.server_port}", b"{}")]


def test_a_name_rebound_to_a_private_address_is_not_called(monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"hooks.example.com": [PUBLIC]})
    check_url("https://hooks.example.com/kma")  # as at submission
    resolving(monkeypatch, {"hooks.example.com": ["127.0.0.1"]})  # the name moved since
    hook = Hook()
    with pytest.raises(WebhookRefused, match="loopback"):
        deliver_webhook("https://hooks.example.com/kma", b"{}", "k", transport=hook.transport)
    assert hook.requests == []


def test_a_redirect_is_a_failed_delivery_not_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    resolving(monkeypatch, {"hooks.example.com": [PUBLIC]})
    hook = Hook(302, {"Location": "http://169.254.169.254/latest/meta-data/"})
    with pytest.raises(httpx.HTTPStatusError):
        deliver_webhook("https://hooks.example.com/kma", b"{}", "k", transport=hook.transport)
    assert len(hook.requests) == 1


@pytest.mark.parametrize(
    ("table", "retried"),
    [({"hooks.example.com": ["127.0.0.1"]}, False), ({}, True)],
    ids=["refused-not-retried", "unresolved-retried"],
)
def test_the_task_refuses_for_good_or_retries(
    monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]], retried: bool
) -> None:
    resolving(monkeypatch, table)
    monkeypatch.setattr(tasks, "get_sessionmaker", lambda: lambda: nullcontext())
    webhook = Webhook("https://hooks.example.com/kma", b"{}", "secret")
    monkeypatch.setattr(tasks.jobs_service, "webhook_of", lambda session, job_id: webhook)
    sent: list[httpx.Request] = []
    monkeypatch.setattr(httpx.Client, "send", lambda self, request, **_: sent.append(request))
    retries: list[Any] = []

    def retry(**options: Any) -> Retry:
        retries.append(options)
        return Retry()

    monkeypatch.setattr(tasks.send_webhook, "retry", retry)
    with suppress(Retry):
        tasks.send_webhook.run(str(uuid.uuid4()))
    assert (sent, bool(retries)) == ([], retried)
