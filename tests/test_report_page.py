"""The report page: per-group counts, the page as served, and as a real browser shows it."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session
from websockets.sync.client import ClientConnection, connect

from app.audit.domain import Verdict, find_conflicts, summarize
from app.audit.schemas import (
    Audit,
    AuditConfig,
    Category,
    GroupCounts,
    Report,
    ReportCounts,
    SuggestedAction,
)
from app.datasets.domain import Example, parse_record
from app.jobs import repository as jobs_repository
from app.jobs import service
from app.models import Chunk, Dataset, Decision, Job, JobStatus, Review, Workspace, utcnow
from app.models import Example as ExampleRow
from app.models import Verdict as VerdictRow
from app.students.schemas import Student
from app.workspaces.domain import page_link_token
from tests.conftest import TEST_WORKSPACE, assert_documented, bearer, new_workspace

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
IDK = "No idea."
SCRIPT_QUESTION = "<script>alert('x')</script> Where is Tarn?"

H, M, W, U = Category.HIGHLY_KNOWN, Category.MAYBE_KNOWN, Category.WEAKLY_KNOWN, Category.UNKNOWN
KEEP, STUDENT, IDK_ACTION = (
    SuggestedAction.KEEP,
    SuggestedAction.RELABEL_STUDENT,
    SuggestedAction.RELABEL_IDK,
)

# record, category, suggested action, student answer, agreement, conflict
AUDITED: list[tuple[dict[str, Any], Category, SuggestedAction, str, float, bool]] = [
    ({"id": "a", "question": "Capital of Zorvania?", "answer": "Quell", "group": "P36"},
     H, KEEP, "Quell", 1.0, False),
    ({"id": "b", "question": "Who wrote Ombra?", "answers": ["Ann Vey", "A. Vey"]},
     U, STUDENT, "Bo Ek", 0.95, True),
    ({"id": "c", "question": SCRIPT_QUESTION, "answer": "Lutz", "group": "P131"},
     U, IDK_ACTION, "Vark", 0.3, False),
    ({"id": "d", "question": "Who founded Kell?", "answer": "Ora", "group": "P112"},
     W, KEEP, "Ora", 0.2, False),
    ({"id": "e", "question": "When was Ysk built?", "answer": "1820", "group": "P36"},
     M, KEEP, "1820", 0.6, False),
    ({"id": "f", "question": "Capital of Brenn?", "answer": "Sollo", "group": "P36"},
     U, STUDENT, "Marr & Co", 0.92, True),
    ({"id": "g", "question": "What river crosses Tarn?", "answer": "Vel", "group": "P131"},
     H, KEEP, "Vel", 1.0, False),
]  # fmt: skip


def make_audit(category: Category, action: SuggestedAction, answer: str, agreement: float) -> Audit:
    return Audit(
        category=category,
        flagged=category == U,
        p_greedy={H: 1.0, M: 0.5}.get(category, 0.0),
        p_sample=0.25 if category == W else 0.0,
        student_answer=answer,
        agreement=agreement,
        suggested_action=action,
        suggested_answer={KEEP: None, STUDENT: answer, IDK_ACTION: IDK}[action],
        generations={H: 10, M: 10, W: 25, U: 170}[category],
    )


def audited_examples() -> tuple[list[Example], list[Verdict]]:
    examples = [parse_record("qa", raw, i + 1) for i, (raw, *_) in enumerate(AUDITED)]
    verdicts = [Verdict(make_audit(c, a, s, g), k) for _, c, a, s, g, k in AUDITED]
    return examples, verdicts


def insert_audited_job(session: Session) -> uuid.UUID:
    """A dataset and a finished job over it, committed as the worker's finalize step leaves them."""
    config = AuditConfig(idk_text=IDK)
    workspace_id = new_workspace(session, TEST_WORKSPACE)
    dataset = Dataset(
        workspace_id=workspace_id,
        name="zorvania-facts.jsonl",
        format="qa",
        num_examples=len(AUDITED),
    )
    session.add(dataset)
    session.flush()
    examples, verdicts = audited_examples()
    started = utcnow() - timedelta(seconds=75)
    job = Job(
        workspace_id=workspace_id,
        dataset_id=dataset.id,
        status=JobStatus.SUCCEEDED,
        student={"name": "tiny-student", "engine": "hf", "model": "tiny-student"},
        config=config.model_dump(mode="json"),
        total=len(AUDITED),
        report=Report(
            **summarize(examples, verdicts).model_dump(),
            partial=False,
            total=len(AUDITED),
            generations=420,
            generations_cached=12,
            mode=config.mode,
            student=Student(name="tiny-student", model="tiny-student", engine="hf"),
            config=config,
            seconds=75.0,
        ).model_dump(mode="json"),
        started_at=started,
        finished_at=utcnow(),
    )
    session.add(job)
    session.flush()
    for position, ((raw, *_), example, verdict) in enumerate(
        zip(AUDITED, examples, verdicts, strict=True)
    ):
        session.add(
            ExampleRow(
                dataset_id=dataset.id,
                position=position,
                line=position + 1,
                record_id=example.id,
                group=example.group,
                raw=raw,
            )
        )
        session.add(
            VerdictRow(
                job_id=job.id,
                position=position,
                category=verdict.audit.category.value,
                flagged=verdict.audit.flagged,
                conflict=verdict.conflict,
                audit=verdict.audit.model_dump(mode="json"),
                answers={},
            )
        )
    session.flush()
    chunk = Chunk(job_id=job.id, start=0, stop=len(AUDITED), generations=420, cached_generations=12)
    jobs_repository.count_chunk(session, chunk)
    session.commit()
    return job.id


# --- the counts -------------------------------------------------------------------------------


def test_summarize_counts_per_group() -> None:
    examples, verdicts = audited_examples()
    counts = summarize(examples, verdicts)

    def group(flagged: int, **categories: int) -> GroupCounts:
        return GroupCounts(
            categories={c: categories.get(c.value, 0) for c in Category},
            flagged=flagged,
            examples=sum(categories.values()),
        )

    assert counts.groups == {
        "": group(1, Unknown=1),
        "P112": group(0, WeaklyKnown=1),
        "P131": group(1, HighlyKnown=1, Unknown=1),
        "P36": group(1, HighlyKnown=1, MaybeKnown=1, Unknown=1),
    }
    assert list(counts.groups) == sorted(counts.groups)
    assert counts.categories == {H: 2, M: 1, W: 1, U: 3}
    assert counts.suggested_actions == {KEEP: 4, STUDENT: 2, IDK_ACTION: 1}
    assert (counts.num_examples, counts.flagged, counts.conflicts) == (7, 3, 2)
    assert counts.generations_used == 2 * 10 + 10 + 25 + 3 * 170
    assert [c.id for c in find_conflicts(examples, verdicts)] == ["b", "f"]


def test_summarize_fills_every_category_and_action() -> None:
    counts = summarize([], [])
    assert counts.categories == dict.fromkeys(Category, 0)
    assert counts.suggested_actions == dict.fromkeys(SuggestedAction, 0)
    assert (counts.groups, counts.num_examples, counts.conflicts) == ({}, 0, 0)


def test_the_report_counted_in_sql_is_summarize(session: Session) -> None:
    """The service's report sums the verdicts in PostgreSQL; it must count what `summarize` does."""
    job = session.get_one(Job, insert_audited_job(session))
    report = service.build_report(session, job)
    examples, verdicts = audited_examples()
    assert ReportCounts.model_validate(report.model_dump()) == summarize(examples, verdicts)
    assert not report.partial
    assert report.total == len(AUDITED)
    assert report.student == Student(name="tiny-student", model="tiny-student", engine="hf")
    assert report.config == AuditConfig(idk_text=IDK)


# --- the page as served -----------------------------------------------------------------------


@pytest.fixture
def client(api: FastAPI, api_key: str) -> Iterator[TestClient]:
    with TestClient(api, headers=bearer(api_key)) as client:
        yield client


def test_report_page_waits_for_the_job(api: FastAPI, client: TestClient, session: Session) -> None:
    job_id = insert_audited_job(session)
    job = session.get_one(Job, job_id)
    job.status, job.report, job.finished_at = JobStatus.RUNNING, None, None
    session.commit()
    response = client.get(f"/v1/jobs/{job_id}/report.html")
    assert response.status_code == 409
    assert "running" in response.json()["detail"]
    missing = client.get(f"/v1/jobs/{uuid.uuid4()}/report.html")
    assert missing.status_code == 404
    for answer in (response, missing):  # errors are JSON, documented so, though the page is not
        assert answer.headers["content-type"] == "application/json"
        assert_documented(api, "GET /v1/jobs/{job_id}/report.html", answer)


def test_report_page_shows_the_audit(client: TestClient, session: Session) -> None:
    job_id = insert_audited_job(session)
    links = client.get(f"/v1/jobs/{job_id}").json()["links"]
    assert links["report_html"].startswith(f"/v1/jobs/{job_id}/report.html?access=")

    response = client.get(links["report_html"])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for href in (links["report"], links["self"], f"{links['examples']}?flagged=true"):
        assert f'href="{href}"' in page
    assert f'href="{links["export"]}?policy=suggested"' in page
    assert "zorvania-facts.jsonl" in page and "tiny-student" in page
    assert "3 · 42.9%" in page and "2 · 28.6%" in page  # Unknown, HighlyKnown
    for group in ("P36", "P131", "P112", "(no group)"):
        assert f'">{group}</td>' in page
    assert "Marr &amp; Co" in page  # a conflict and a flagged row, escaped
    assert "Bo Ek" in page and IDK in page
    assert "relabel_student" in page and "relabel_idk" in page
    assert "Capital of Zorvania?" not in page  # not flagged, not a conflict
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; Where is Tarn?" in page


def test_report_page_caps_the_flagged_rows(
    client: TestClient, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = insert_audited_job(session)
    monkeypatch.setattr(service, "REPORT_PAGE_ROWS", 2)
    page = client.get(f"/v1/jobs/{job_id}/report.html").text
    assert "Showing the first 2 flagged examples; 1 more" in page
    assert f'href="/v1/jobs/{job_id}/examples?flagged=true"' in page
    assert [texts[0] for _, texts in Dom(page).tables["flagged-table"]] == ["b", "c"]


def test_report_page_caps_the_conflicts(
    client: TestClient, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = insert_audited_job(session)
    monkeypatch.setattr(service, "REPORT_PAGE_CONFLICTS", 1)
    page = client.get(f"/v1/jobs/{job_id}/report.html").text
    assert "Showing the first 1 conflicts; 1 more" in page
    assert f'href="/v1/jobs/{job_id}/conflicts"' in page
    assert [texts[0] for _, texts in Dom(page).tables["conflict-table"]] == ["b"]


def test_report_page_of_an_older_report(client: TestClient, session: Session) -> None:
    """A report stored before reports were typed is counted again from the verdicts."""
    job_id = insert_audited_job(session)
    job = session.get_one(Job, job_id)
    job.report = {"num_examples": 7, "flagged": 3, "conflicts": []}
    session.commit()
    response = client.get(f"/v1/jobs/{job_id}/report.html")
    assert response.status_code == 200
    assert "3 · 42.9%" in response.text
    assert '">P36</td>' in response.text


def test_report_page_of_a_cancelled_job(client: TestClient, session: Session) -> None:
    """Cancelled part way: the page shows what was audited, said to be partial."""
    job_id = insert_audited_job(session)
    job = session.get_one(Job, job_id)
    job.status, job.report, job.total = JobStatus.CANCELLED, None, 10
    session.commit()
    response = client.get(f"/v1/jobs/{job_id}/report.html")
    assert response.status_code == 200
    assert "Partial report: the job was cancelled after auditing 7 of 10 examples" in response.text
    assert "Marr &amp; Co" in response.text


# --- the page in a browser --------------------------------------------------------------------


@pytest.fixture
def committed_job(db_engine: Engine) -> Iterator[uuid.UUID]:
    """The audited job, committed so a server with its own sessions reads it; deleted after."""
    with Session(db_engine) as session:
        job_id = insert_audited_job(session)
        dataset_id = session.get_one(Job, job_id).dataset_id
    yield job_id
    with Session(db_engine) as session:
        session.execute(delete(Dataset).where(Dataset.id == dataset_id))
        session.commit()


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--window-size=1280,1600",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class Dom(HTMLParser):
    """What a dumped DOM shows: table body rows (hidden?, cell texts), bar labels, spans by id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[bool, list[str]]]] = {}
        self.bars: dict[str, str] = {}
        self.spans: dict[str, str] = {}
        self._rows: list[tuple[bool, list[str]]] | None = None
        self._in_body = False
        self._in_cell = False
        self._bar: str | None = None
        self._span: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "table":
            self._rows = self.tables.setdefault(attr.get("id") or "", [])
        elif tag in ("thead", "tbody"):
            self._in_body = tag == "tbody"
        elif tag == "tr" and self._rows is not None and self._in_body:
            self._rows.append(("hidden" in attr, []))
        elif tag == "td" and self._rows and self._in_body:
            self._rows[-1][1].append("")
            self._in_cell = True
        elif tag == "g" and attr.get("data-category"):
            self._bar = attr["data-category"]
            self.bars[self._bar or ""] = ""
        elif tag == "span" and attr.get("id"):
            self._span = attr["id"]
            self.spans[self._span or ""] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._rows, self._in_body = None, False
        elif tag == "td":
            self._in_cell = False
        elif tag == "g":
            self._bar = None
        elif tag == "span":
            self._span = None

    def handle_data(self, data: str) -> None:
        if self._rows and self._in_cell:
            self._rows[-1][1][-1] += data
        if self._bar is not None:
            self.bars[self._bar] += data
        if self._span is not None:
            self.spans[self._span] += data


def cells(rows: list[tuple[bool, list[str]]]) -> list[list[str]]:
    return [[" ".join(text.split()) for text in texts] for _, texts in rows]


def test_a_report_link_opens_the_page_without_a_key(
    api: FastAPI, client: TestClient, session: Session
) -> None:
    job_id = insert_audited_job(session)
    link = client.get(f"/v1/jobs/{job_id}").json()["links"]["report_html"]
    with TestClient(api) as browser:  # sends no key
        assert browser.get(link).status_code == 200
        assert browser.get(f"/v1/jobs/{job_id}/report.html").status_code == 401
        expires, mac = link.split("access=")[1].split(".")
        forged = f"/v1/jobs/{job_id}/report.html?access={int(expires) + 3600}.{mac}"
        refused = browser.get(forged)
        assert refused.status_code == 401
        assert_documented(api, "GET /v1/jobs/{job_id}/report.html", refused)
        other = f"/v1/jobs/{uuid.uuid4()}/report.html?access={expires}.{mac}"
        assert browser.get(other).status_code == 401
        secret = session.get_one(Workspace, session.get_one(Job, job_id).workspace_id)
        stale = page_link_token(secret.webhook_secret, job_id, time.time() - 8 * 24 * 3600)
        expired = browser.get(f"/v1/jobs/{job_id}/report.html?access={stale}")
        assert expired.status_code == 401
        assert expired.json() == {"detail": "the link is invalid or has expired"}


def test_report_page_in_a_browser(
    tmp_path: Path, server_url: str, committed_job: uuid.UUID, db_engine: Engine
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium")
    with Session(db_engine) as session:  # the link a job's JSON gives: no key in a browser
        job = session.get_one(Job, committed_job)
        secret = session.get_one(Workspace, job.workspace_id).webhook_secret
    access = page_link_token(secret, committed_job, time.time())
    url = f"{server_url}/v1/jobs/{committed_job}/report.html?access={access}"
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report_page.png"
    screenshot.unlink(missing_ok=True)
    chromium(tmp_path, f"--screenshot={screenshot}", url)
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 1600)
    assert len(png) > 40_000  # a blank or error page compresses to a few kB

    # The DOM after the scripts ran, with the search box filled from ?q=.
    dom = Dom(chromium(tmp_path, "--dump-dom", f"{url}&q=tarn").stdout)
    assert {k: " ".join(v.split()) for k, v in dom.bars.items()} == {
        "HighlyKnown": "HighlyKnown 2 · 28.6%",
        "MaybeKnown": "MaybeKnown 1 · 14.3%",
        "WeaklyKnown": "WeaklyKnown 1 · 14.3%",
        "Unknown": "Unknown 3 · 42.9%",
    }
    groups = cells(dom.tables["group-table"])
    assert [row[:2] for row in groups] == [
        ["P36", "3"],
        ["P131", "2"],
        ["(no group)", "1"],
        ["P112", "1"],
    ]
    assert groups[0][2:8] == ["1", "1", "0", "1", "1", "33.3%"]

    flagged = dom.tables["flagged-table"]
    assert [(hidden, texts[0]) for hidden, texts in flagged] == [
        (True, "b"),
        (False, "c"),
        (True, "f"),
    ]
    assert cells(flagged)[1] == [
        "c", "P131", SCRIPT_QUESTION, "Lutz", "Vark", "30%", "Unknown", "relabel_idk", IDK,
        "not yet Accept Reject Override",
    ]  # fmt: skip
    assert cells(flagged)[0][7:9] == ["relabel_student", "Bo Ek"]
    assert dom.spans["flagged-count"] == "1 of 3 rows"
    assert dom.spans["conflict-count"] == "2 of 2 rows"
    assert [row[0] for row in cells(dom.tables["conflict-table"])] == ["b", "f"]


class Page:
    """A page of a headless Chromium, driven over the DevTools protocol: scripts run in it as
    a person's clicks and keys would."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.calls = 0

    def call(self, method: str, **params: Any) -> Any:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.calls:
                return message["result"]

    def run(self, script: str) -> Any:
        """The value of a script run in the page (awaited when it is a promise)."""
        result = self.call(
            "Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot")["data"]))

    def wait_for(self, script: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := self.run(script)):
            assert time.monotonic() < deadline, f"still false: {script}"
            time.sleep(0.1)
        return value


@contextmanager
def browser_page(tmp_path: Path, url: str) -> Iterator[Page]:
    """Chromium showing `url`, for as long as the block runs."""
    profile = tmp_path / "chromium-devtools"
    process = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1280,1600",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"  # its port, once it listens
        deadline = time.monotonic() + 60
        while not (active.exists() and len(active.read_text().splitlines()) == 2):
            assert process.poll() is None and time.monotonic() < deadline, "no DevTools port"
            time.sleep(0.1)
        port = active.read_text().splitlines()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = next(target for target in targets if target["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as socket:
            yield Page(socket)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_reviewing_from_the_page_in_a_browser(
    tmp_path: Path,
    server_url: str,
    committed_job: uuid.UUID,
    committed_key: str,
    db_engine: Engine,
) -> None:
    """A person opens the signed link, clicks Accept, gives the key once, then overrides
    another example: both decisions are stored under their key's name."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium")
    with Session(db_engine) as session:
        job = session.get_one(Job, committed_job)
        secret = session.get_one(Workspace, job.workspace_id).webhook_secret
    access = page_link_token(secret, committed_job, time.time())
    url = f"{server_url}/v1/jobs/{committed_job}/report.html?access={access}"
    row = "document.querySelector('#flagged-table tr[data-position=\"5\"]')"  # id "f"
    other = "document.querySelector('#flagged-table tr[data-position=\"2\"]')"  # id "c"
    with browser_page(tmp_path, url) as browser:
        browser.wait_for(f"document.readyState === 'complete' && !!{row}")
        assert browser.run(f"{row}.cells[0].textContent.trim()") == "f"
        assert browser.run("document.getElementById('review-key').hidden") is True
        browser.run(f"{row}.querySelector('button[data-decision=accept]').click()")
        # No key yet: the page asks for one, and has sent nothing.
        assert browser.run("document.getElementById('review-key').hidden") is False
        browser.run(
            "const form = document.getElementById('review-key');"
            f"form.elements.key.value = {json.dumps(committed_key)}; form.requestSubmit();"
        )
        browser.wait_for(
            f"{row}.querySelector('td.review .decision').textContent.includes('accept')"
        )
        assert browser.run(f"{row}.querySelector('td.review .decision').textContent") == (
            "acceptby reviewer"
        )
        browser.run(
            f"{other}.querySelector('td.review input').value = 'Lutz-on-Tarn';"
            f"{other}.querySelector('button[data-decision=override]').click();"
        )
        browser.wait_for(
            f"{other}.querySelector('td.review .decision').textContent.includes('override')"
        )
        assert browser.run("document.getElementById('review-key').hidden") is True  # asked once
        assert browser.run("sessionStorage.getItem('kma-api-key')") == committed_key
        assert browser.run("document.getElementById('review-status').textContent") == (
            "Saved: c override."
        )
        ARTIFACTS.mkdir(exist_ok=True)
        browser.run("document.getElementById('flagged').scrollIntoView()")
        browser.screenshot(ARTIFACTS / "report_page_reviewed.png")
    with Session(db_engine) as session:
        stored = {
            r.position: (r.decision, r.answer, r.reviewed_by)
            for r in session.scalars(select(Review).where(Review.job_id == committed_job))
        }
    assert stored == {
        5: (Decision.ACCEPT, None, "reviewer"),
        2: (Decision.OVERRIDE, "Lutz-on-Tarn", "reviewer"),
    }
